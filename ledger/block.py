"""Blocks: fields, canonical body, hash, proof of work and the wire/disk encoding."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import msgpack

from ledger import canonical
from ledger.canonical import CanonicalError
from ledger.keys import Signer

VERSION = 1
ZERO_HASH = bytes(32)
MAX_BLOCK_BYTES = 64 * 1024 * 1024


class BlockFormatError(ValueError):
    """Bytes that are not a well-formed block."""


@dataclass(frozen=True, slots=True)
class Block:
    """One ledger block.

    ``hash`` = SHA-256(canonical msgpack of [version, index, timestamp, data, prev_hash, nonce]);
    the coordinator's Ed25519 ``signature`` (key ``key_id``) is over ``hash``; both are empty in
    a block sealed by a later block's signature (see :attr:`unsigned`).
    ``body`` holds those canonical bytes so nothing is re-encoded to hash or send a block."""

    index: int
    timestamp: float
    data: dict[str, Any]
    prev_hash: bytes
    nonce: int
    hash: bytes
    key_id: str = ""
    signature: bytes = b""
    version: int = VERSION
    body: bytes = field(default=b"", repr=False, compare=False)

    @property
    def type(self) -> str:
        return str(self.data.get("type", ""))

    @property
    def unsigned(self) -> bool:
        """No signature of its own (empty ``key_id`` and ``signature``): a block inside a commit
        group, proven by the coordinator's signature on a later block of the group (docs/ledger.md)."""
        return not self.key_id and not self.signature

    def computed_hash(self) -> bytes:
        """SHA-256 of the canonical body (compare with :attr:`hash`)."""
        return hashlib.sha256(self.body).digest()

    def to_bytes(self) -> bytes:
        """Wire and disk encoding: msgpack [body, hash, key_id, signature]."""
        return msgpack.packb([self.body, self.hash, self.key_id, self.signature], use_bin_type=True)

    @classmethod
    def from_bytes(cls, raw: bytes) -> Block:
        """Parse a block; checks its shape and canonical body, not its hash or signature."""
        if len(raw) > MAX_BLOCK_BYTES:
            raise BlockFormatError(f"block of {len(raw)} bytes exceeds {MAX_BLOCK_BYTES}")
        try:
            outer = msgpack.unpackb(raw, raw=False, use_list=True)
        except Exception as exc:
            raise BlockFormatError(f"not msgpack: {type(exc).__name__}") from exc
        if (type(outer) is not list or len(outer) != 4 or type(outer[0]) is not bytes
                or type(outer[1]) is not bytes or type(outer[2]) is not str or type(outer[3]) is not bytes):
            raise BlockFormatError("expected [body: bin, hash: bin, key_id: str, signature: bin]")
        body, digest, key_id, signature = outer
        if len(digest) != 32:
            raise BlockFormatError(f"hash is {len(digest)} bytes, not 32")
        return _from_body(body, digest, key_id, signature)

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "index": self.index, "timestamp": self.timestamp, "data": self.data,
                "prev_hash": self.prev_hash, "nonce": self.nonce, "hash": self.hash, "key_id": self.key_id,
                "signature": self.signature}


def _from_body(body: bytes, digest: bytes, key_id: str, signature: bytes) -> Block:
    try:
        fields = canonical.decode(body)
    except CanonicalError as exc:
        raise BlockFormatError(f"body: {exc}") from exc
    if type(fields) is not list or len(fields) != 6:
        raise BlockFormatError("body must be [version, index, timestamp, data, prev_hash, nonce]")
    version, index, timestamp, data, prev_hash, nonce = fields
    if type(version) is not int or type(index) is not int or index < 0:
        raise BlockFormatError("version and index must be integers, index >= 0")
    if type(timestamp) is not float:
        raise BlockFormatError("timestamp must be a float")
    if type(data) is not dict or type(data.get("type")) is not str:
        raise BlockFormatError('data must be a map with a str "type"')
    if type(prev_hash) is not bytes or len(prev_hash) != 32:
        raise BlockFormatError("prev_hash must be 32 bytes")
    if type(nonce) is not int or nonce < 0:
        raise BlockFormatError("nonce must be an integer >= 0")
    return Block(index, timestamp, data, prev_hash, nonce, digest, key_id, signature, version, body)


def leading_zero_bits(digest: bytes) -> int:
    value = int.from_bytes(digest, "big")
    return len(digest) * 8 - value.bit_length()


def meets_difficulty(digest: bytes, difficulty: int) -> bool:
    return difficulty <= 0 or int.from_bytes(digest, "big") >> (len(digest) * 8 - difficulty) == 0


def mine(index: int, timestamp: float, data: dict[str, Any], prev_hash: bytes, difficulty: int = 0,
         *, version: int = VERSION, start_nonce: int = 0) -> tuple[int, bytes, bytes]:
    """Find the first nonce >= ``start_nonce`` whose hash has ``difficulty`` leading zero bits.

    Returns (nonce, body, hash). The body prefix is encoded once; only the nonce changes."""
    nonce, body, digest, _ = _mine(index, timestamp, data, prev_hash, difficulty, version=version,
                                   start_nonce=start_nonce)
    return nonce, body, digest


def _mine(index: int, timestamp: float, data: dict[str, Any], prev_hash: bytes, difficulty: int, *,
          version: int = VERSION, start_nonce: int = 0) -> tuple[int, bytes, bytes, dict[str, Any]]:
    """:func:`mine`, also returning the normalised ``data`` (what decoding the body gives back)."""
    if not 0 <= difficulty <= 256:
        raise ValueError("difficulty is a number of leading zero bits, 0..256")
    if len(prev_hash) != 32:
        raise ValueError("prev_hash must be 32 bytes")
    norm = canonical.normalize(data, "$data")
    if not isinstance(norm, dict) or not isinstance(norm.get("type"), str):
        raise CanonicalError('data must be a dict with a str "type"')
    prefix = b"\x96" + b"".join(canonical.pack_normalized(x) for x in
                                (int(version), int(index), float(timestamp), norm, bytes(prev_hash)))
    if not (timestamp == timestamp and abs(timestamp) != float("inf")):
        raise CanonicalError("timestamp must be finite")
    nonce = start_nonce
    sha256 = hashlib.sha256
    while True:
        body = prefix + canonical.pack_normalized(nonce)
        digest = sha256(body).digest()
        if meets_difficulty(digest, difficulty):
            return nonce, body, digest, norm
        nonce += 1


def make_block(index: int, timestamp: float, data: dict[str, Any], prev_hash: bytes, *,
               signer: Signer | None = None, difficulty: int = 0) -> Block:
    """Build (mine and sign) a block. Its fields are the normalised values the body encodes (the
    same as :meth:`Block.from_bytes` gives), without decoding the body again."""
    if type(index) is not int or index < 0 or len(prev_hash) != 32:
        raise ValueError("index must be an integer >= 0 and prev_hash 32 bytes")
    nonce, body, digest, norm = _mine(index, timestamp, data, prev_hash, difficulty)
    block = Block(index, float(timestamp), norm, bytes(prev_hash), nonce, digest, "", b"", VERSION, body)
    if signer is None:
        return block
    return sign_block(block, signer)


def sign_block(block: Block, signer: Signer) -> Block:
    """The same block with the signer's key id and signature over its hash."""
    return Block(block.index, block.timestamp, block.data, block.prev_hash, block.nonce, block.hash,
                 signer.key_id, signer.sign(block.hash), block.version, block.body)
