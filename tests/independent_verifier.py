"""An outsider's fledger ledger verifier, written from docs/ledger.md alone.

It imports nothing from fledger: the Python standard library, and PyNaCl for Ed25519. If this
file cannot check something, the documentation is missing a byte. Every check raises
:class:`Invalid` with the reason.
"""

from __future__ import annotations

import base64
import hashlib
import struct
import zlib
from typing import Any

import nacl.exceptions
import nacl.signing


class Invalid(Exception):
    """The ledger, proof or checkpoint does not verify."""


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


# -- the msgpack subset (docs: "msgpack subset") --------------------------------------------------


class _Reader:
    def __init__(self, data: bytes, canonical: bool) -> None:
        self.data, self.pos, self.canonical = data, 0, canonical

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise Invalid("msgpack: truncated")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def uint(self, n: int) -> int:
        return int.from_bytes(self.take(n), "big")

    def shortest(self, ok: bool) -> None:
        if self.canonical and not ok:
            raise Invalid("msgpack: not the shortest encoding")

    def value(self) -> Any:
        t = self.take(1)[0]
        if t <= 0x7F:
            return t
        if t >= 0xE0:
            return t - 0x100
        if 0xA0 <= t <= 0xBF:
            return self.text(t & 0x1F)
        if 0x90 <= t <= 0x9F:
            return self.array(t & 0x0F)
        if 0x80 <= t <= 0x8F:
            return self.map(t & 0x0F)
        if t in (0xC0, 0xC2, 0xC3):
            return {0xC0: None, 0xC2: False, 0xC3: True}[t]
        if t in (0xCC, 0xCD, 0xCE, 0xCF):
            size = {0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8}[t]
            v = self.uint(size)
            self.shortest(v >= (0x80 if size == 1 else 1 << (4 * size)))
            return v
        if t in (0xD0, 0xD1, 0xD2, 0xD3):
            size = {0xD0: 1, 0xD1: 2, 0xD2: 4, 0xD3: 8}[t]
            v = int.from_bytes(self.take(size), "big", signed=True)
            self.shortest(v < -32 and (size == 1 or v < -(1 << (8 * size // 2 - 1))))
            return v
        if t == 0xCB:
            return struct.unpack(">d", self.take(8))[0]
        if t in (0xD9, 0xDA, 0xDB):
            size = {0xD9: 1, 0xDA: 2, 0xDB: 4}[t]
            n = self.uint(size)
            self.shortest(n > (31 if size == 1 else (1 << (4 * size)) - 1))
            return self.text(n)
        if t in (0xC4, 0xC5, 0xC6):
            size = {0xC4: 1, 0xC5: 2, 0xC6: 4}[t]
            n = self.uint(size)
            self.shortest(size == 1 or n > (1 << (4 * size)) - 1)
            return self.take(n)
        if t in (0xDC, 0xDD):
            n = self.uint(2 if t == 0xDC else 4)
            self.shortest(n > (15 if t == 0xDC else 0xFFFF))
            return self.array(n)
        if t in (0xDE, 0xDF):
            n = self.uint(2 if t == 0xDE else 4)
            self.shortest(n > (15 if t == 0xDE else 0xFFFF))
            return self.map(n)
        raise Invalid(f"msgpack: type byte {t:#04x} is outside the documented subset")

    def text(self, n: int) -> str:
        try:
            return self.take(n).decode("utf-8")
        except UnicodeDecodeError:
            raise Invalid("msgpack: str is not UTF-8") from None

    def array(self, n: int) -> list[Any]:
        return [self.value() for _ in range(n)]

    def map(self, n: int) -> dict[Any, Any]:
        out: dict[Any, Any] = {}
        previous: str | None = None
        for _ in range(n):
            key = self.value()
            if self.canonical:
                if not isinstance(key, str) or (previous is not None and key <= previous):
                    raise Invalid("msgpack: map keys not str, sorted and unique")
                previous = key
            out[key] = self.value()
        return out


def unpack(data: bytes, *, canonical: bool = False) -> Any:
    reader = _Reader(data, canonical)
    value = reader.value()
    if reader.pos != len(data):
        raise Invalid("msgpack: trailing bytes")
    return value


# -- file, blocks and the chain --------------------------------------------------------------------


def read_frames(path: str) -> list[bytes]:
    """Payloads of a ledger file: "FLB1" | u32 length | u32 CRC-32(length bytes || payload) | payload."""
    with open(path, "rb") as handle:
        data = handle.read()
    payloads, pos = [], 0
    while pos < len(data):
        if data[pos:pos + 4] != b"FLB1" or pos + 12 > len(data):
            raise Invalid(f"frame {len(payloads)} at byte {pos}: no frame header")
        length, crc = struct.unpack(">II", data[pos + 4:pos + 12])
        payload = data[pos + 12:pos + 12 + length]
        if len(payload) != length or zlib.crc32(data[pos + 4:pos + 8] + payload) != crc:
            raise Invalid(f"frame {len(payloads)} at byte {pos}: CRC mismatch")
        payloads.append(payload)
        pos += 12 + length
    return payloads


def ed25519_ok(public_key: bytes, message: bytes, signature: bytes) -> bool:
    try:
        nacl.signing.VerifyKey(public_key).verify(message, signature)
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError, ValueError, TypeError):
        return False
    return True


def short_key_id(public_key: bytes) -> str:
    return sha256(public_key)[:8].hex()


def parse_block(wire: bytes) -> dict[str, Any]:
    outer = unpack(wire)
    if not (isinstance(outer, list) and len(outer) == 4 and isinstance(outer[0], bytes)
            and isinstance(outer[1], bytes) and isinstance(outer[2], str) and isinstance(outer[3], bytes)):
        raise Invalid("a block is [body: bin, hash: bin, key_id: str, signature: bin]")
    body, digest, key_id, signature = outer
    fields = unpack(body, canonical=True)
    if not isinstance(fields, list) or len(fields) != 6:
        raise Invalid("a body is [version, index, timestamp, data, prev_hash, nonce]")
    version, index, timestamp, data, prev_hash, nonce = fields
    if version != 1 or not isinstance(timestamp, float) or not isinstance(data, dict):
        raise Invalid("bad version, timestamp or data")
    return {"body": body, "hash": digest, "key_id": key_id, "signature": signature, "index": index,
            "timestamp": timestamp, "data": data, "prev_hash": prev_hash, "nonce": nonce}


def verify_chain(payloads: list[bytes], pinned_coordinator_key: bytes | None = None) -> list[dict[str, Any]]:
    """Checks 1-6 of docs/ledger.md for every block; returns the parsed blocks."""
    blocks: list[dict[str, Any]] = []
    coordinator_key = pinned_coordinator_key
    difficulty = 0
    device_keys: dict[str, tuple[str, bytes]] = {}  # key id -> (device, public key), unrevoked
    for i, wire in enumerate(payloads):
        b = parse_block(wire)
        if sha256(b["body"]) != b["hash"]:
            raise Invalid(f"block {i}: hash does not match its body")
        if b["index"] != i or b["prev_hash"] != (bytes(32) if i == 0 else blocks[-1]["hash"]):
            raise Invalid(f"block {i}: index or prev_hash does not link")
        data = b["data"]
        if i == 0:
            ck = data.get("coordinator_key", {})
            if data.get("type") != "genesis" or short_key_id(ck.get("public_key", b"")) != ck.get("key_id"):
                raise Invalid("block 0 is not a genesis block with a coordinator key")
            if coordinator_key is not None and ck["public_key"] != coordinator_key:
                raise Invalid("genesis coordinator key is not the pinned key")
            coordinator_key, difficulty = ck["public_key"], data["difficulty"]
        assert coordinator_key is not None
        if i and b["key_id"] == "" and b["signature"] == b"":
            pass  # sealed: proven by the next signed block's signature, through the prev_hash links
        elif b["key_id"] != short_key_id(coordinator_key) or not ed25519_ok(coordinator_key, b["hash"],
                                                                           b["signature"]):
            raise Invalid(f"block {i}: bad coordinator signature")
        if difficulty and int.from_bytes(b["hash"], "big") >> (256 - difficulty):
            raise Invalid(f"block {i}: proof of work")
        kind = data.get("type")
        if kind == "device.key":
            if short_key_id(data["public_key"]) != data["key_id"]:
                raise Invalid(f"block {i}: device key id does not match its key")
            device_keys[data["key_id"]] = (data["device"], data["public_key"])
        elif kind == "device.key_revoked":
            device_keys.pop(data["key_id"], None)
        elif kind == "update" or (kind == "dataset" and "statement" in data):
            registered = device_keys.get(data["key_id"])
            if registered is None or registered[0] != data["device"]:
                raise Invalid(f"block {i}: {kind} by an unregistered or revoked key")
            if not ed25519_ok(registered[1], data["statement"], data["device_sig"]):
                raise Invalid(f"block {i}: bad device signature")
        blocks.append(b)
    if blocks and blocks[-1]["signature"] == b"":
        raise Invalid(f"block {len(blocks) - 1}: the last block carries no signature (nothing proves the unsigned "
                      "blocks at the end)")
    return blocks


# -- Merkle trees (RFC 6962 hashing, RFC 9162 verification) -----------------------------------------


def leaf_hash(data: bytes) -> bytes:
    return sha256(b"\x00" + data)


def node_hash(left: bytes, right: bytes) -> bytes:
    return sha256(b"\x01" + left + right)


def mth(leaf_hashes: list[bytes]) -> bytes:
    """RFC 6962 §2.1 MTH over leaf hashes."""
    n = len(leaf_hashes)
    if n == 0:
        return sha256(b"")
    if n == 1:
        return leaf_hashes[0]
    k = 1 << ((n - 1).bit_length() - 1)
    return node_hash(mth(leaf_hashes[:k]), mth(leaf_hashes[k:]))


def chain_root(blocks: list[dict[str, Any]], size: int) -> bytes:
    return mth([leaf_hash(b["hash"]) for b in blocks[:size]])


def inclusion_ok(leaf: bytes, index: int, size: int, path: list[bytes], root: bytes) -> bool:
    """RFC 9162 §2.1.3.2."""
    if index >= size or any(len(h) != 32 for h in [leaf, root, *path]):
        return False
    fn, sn, r = index, size - 1, leaf
    for p in path:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            while fn and not fn & 1:
                fn, sn = fn >> 1, sn >> 1
        else:
            r = node_hash(r, p)
        fn, sn = fn >> 1, sn >> 1
    return sn == 0 and r == root


def consistency_ok(first: int, second: int, first_root: bytes, second_root: bytes, path: list[bytes]) -> bool:
    """RFC 9162 §2.1.4.2 (0 < first < second), and equal sizes with equal roots and no proof."""
    if any(len(h) != 32 for h in [first_root, second_root, *path]) or not 0 < first <= second:
        return False
    if first == second:
        return not path and first_root == second_root
    if not path:
        return False
    if first & (first - 1) == 0:
        path = [first_root, *path]
    fn, sn = first - 1, second - 1
    while fn & 1:
        fn, sn = fn >> 1, sn >> 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr, sr = node_hash(c, fr), node_hash(c, sr)
            while fn and not fn & 1:
                fn, sn = fn >> 1, sn >> 1
        else:
            sr = node_hash(sr, c)
        fn, sn = fn >> 1, sn >> 1
    return sn == 0 and fr == first_root and sr == second_root


def verify_round_proof(proof: dict[str, Any], blocks: list[dict[str, Any]]) -> None:
    """A `fledger ledger prove --json` output, against verified blocks."""
    statement, device_sig, leaf = (bytes.fromhex(proof[k]) for k in ("statement", "device_sig", "leaf"))
    expected_leaf = b"\x92" + _bin(statement) + _bin(device_sig)
    if leaf != expected_leaf:
        raise Invalid("leaf is not 0x92 || bin(statement) || bin(device_sig)")
    path, root = [bytes.fromhex(h) for h in proof["path"]], bytes.fromhex(proof["root"])
    if not inclusion_ok(leaf_hash(leaf), proof["leaf_index"], proof["tree_size"], path, root):
        raise Invalid("inclusion path does not lead to the root")
    aggregate = blocks[proof["aggregate_index"]]["data"]
    accepted = len(aggregate.get("participants", [])) + len(aggregate.get("excluded", {}))  # every leaf
    if (aggregate.get("type") != "aggregate" or aggregate.get("round") != proof["round"]
            or aggregate.get("merkle_root") != root or accepted != proof["tree_size"]):
        raise Invalid("the aggregate block does not hold this root for this round and size")
    update = blocks[proof["update_index"]]["data"]
    if update.get("statement") != statement or update.get("device_sig") != device_sig:
        raise Invalid("the update block does not hold this statement and signature")


def _bin(data: bytes) -> bytes:
    if len(data) < 256:
        return b"\xc4" + bytes([len(data)]) + data
    if len(data) < 65536:
        return b"\xc5" + struct.pack(">H", len(data)) + data
    return b"\xc6" + struct.pack(">I", len(data)) + data


def verify_consistency_output(out: dict[str, Any], blocks: list[dict[str, Any]] | None = None) -> None:
    """A `fledger ledger consistency` output: the proof between its roots; with our own copy of
    the blocks, also that the new root is what the blocks give."""
    old, new = out["old"], out["new"]
    old_root, new_root = bytes.fromhex(out["old_root"]), bytes.fromhex(out["new_root"])
    if not consistency_ok(old, new, old_root, new_root, [bytes.fromhex(h) for h in out["proof"]]):
        raise Invalid("consistency proof does not verify")
    if blocks is not None and chain_root(blocks, new) != new_root:
        raise Invalid("new root is not the root of these blocks")


# -- C2SP signed notes and checkpoints ---------------------------------------------------------------


def parse_vkey(vkey: str) -> tuple[str, bytes, bytes]:
    """<name>+<8 hex key id>+<base64(0x01 || public key)> -> (name, key id, public key)."""
    name, hex_id, encoded = vkey.strip().split("+", 2)
    raw = base64.b64decode(encoded, validate=True)
    if len(raw) != 33 or raw[0] != 1:
        raise Invalid("not an Ed25519 verifier key")
    kid = sha256(name.encode() + b"\n" + raw)[:4]
    if kid.hex() != hex_id.lower():
        raise Invalid("verifier key id mismatch")
    return name, kid, raw[1:]


def open_checkpoint(note: str, vkey: str) -> tuple[str, int, bytes]:
    """(origin, tree size, root) of a checkpoint note signed by the key ``vkey``."""
    name, kid, public_key = parse_vkey(vkey)
    if any(ord(c) < 0x20 and c != "\n" for c in note) or not note.endswith("\n"):
        raise Invalid("malformed note")
    split = note.rfind("\n\n")
    if split < 0:
        raise Invalid("no blank line in note")
    text, signature_lines = note[:split + 1], note[split + 2:].splitlines()
    verified = False
    for line in signature_lines:
        if not line.startswith("\u2014 "):
            raise Invalid("malformed signature line")
        signer, _, blob = line[2:].partition(" ")
        raw = base64.b64decode(blob, validate=True)
        if signer == name and raw[:4] == kid:
            if not ed25519_ok(public_key, text.encode(), raw[4:]):
                raise Invalid("bad note signature")
            verified = True
    if not verified:
        raise Invalid("note not signed by the key")
    lines = text[:-1].split("\n")
    origin, size, root = lines[0], lines[1], base64.b64decode(lines[2], validate=True)
    if origin != name or not size.isdigit() or (size != "0" and size.startswith("0")) or len(root) != 32:
        raise Invalid("malformed checkpoint")
    return origin, int(size), root


def expected_origin(blocks: list[dict[str, Any]]) -> str:
    """fledger/<fleet>/<first 8 bytes of the genesis hash, hex>."""
    return f"fledger/{blocks[0]['data']['fleet']}/{blocks[0]['hash'][:8].hex()}"
