"""Ed25519 signing for blocks and device statements.

Signing and verifying go through libsodium (PyNaCl): its Ed25519 is about ten times faster
than pycryptodome's, which matters to a monitor checking every signature of a long chain.
Key files (PKCS#8 PEM) and point validation stay with pycryptodome.

A key id is the first 8 bytes of SHA-256 of the raw 32-byte public key, in hex (16 chars),
the same naming the rest of fledger uses.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol, runtime_checkable

import nacl.exceptions
import nacl.signing
from Crypto.PublicKey import ECC
from Crypto.Signature import eddsa


def key_id_of(public_key: bytes) -> str:
    """Short stable name of a raw Ed25519 public key."""
    return hashlib.sha256(public_key).hexdigest()[:16]


@runtime_checkable
class Signer(Protocol):
    """What the ledger needs from a block signer."""

    @property
    def key_id(self) -> str: ...

    @property
    def public_key(self) -> bytes: ...

    def sign(self, msg: bytes) -> bytes: ...


class Ed25519Signer:
    """An Ed25519 private key (RFC 8032, pure EdDSA)."""

    def __init__(self, seed: bytes) -> None:
        if len(seed) != 32:
            raise ValueError("an Ed25519 seed is 32 bytes")
        self._key = eddsa.import_private_key(bytes(seed))
        self._signer = nacl.signing.SigningKey(bytes(seed))
        self._public = bytes(self._signer.verify_key)
        self._key_id = key_id_of(self._public)

    @classmethod
    def generate(cls) -> Ed25519Signer:
        return cls(bytes(ECC.generate(curve="Ed25519").seed))

    @classmethod
    def from_pem(cls, pem: str | bytes) -> Ed25519Signer:
        key = ECC.import_key(pem)
        if key.curve != "Ed25519" or not key.has_private():
            raise ValueError("not an Ed25519 private key")
        return cls(bytes(key.seed))

    @classmethod
    def load(cls, path: str | Path) -> Ed25519Signer:
        return cls.from_pem(Path(path).read_bytes())

    def to_pem(self) -> str:
        return str(self._key.export_key(format="PEM"))

    def save(self, path: str | Path) -> None:
        """Write the private key as PKCS#8 PEM, readable by the owner only: a new file, never
        over an existing key (FileExistsError), fsynced before it is visible."""
        import os

        path = Path(path)
        if path.exists():
            raise FileExistsError(f"{path} exists; refusing to overwrite a private key")
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.fchmod(fd, 0o600)  # an old .tmp keeps its mode under O_CREAT: set it
            with os.fdopen(fd, "w") as handle:
                handle.write(self.to_pem())
                handle.flush()
                os.fsync(handle.fileno())
            os.link(tmp, path)  # fails if the key appeared meanwhile: never replaces one
        finally:
            tmp.unlink(missing_ok=True)

    @property
    def seed(self) -> bytes:
        return bytes(self._key.seed)

    @property
    def key_id(self) -> str:
        return self._key_id

    @property
    def public_key(self) -> bytes:
        return self._public

    def sign(self, msg: bytes) -> bytes:
        return bytes(self._signer.sign(msg).signature)


# The coordinator daemon constructs its block signer from a raw seed under this name.
LedgerSigner = Ed25519Signer


def public_key_to_pem(public_key: bytes) -> str:
    return str(eddsa.import_public_key(public_key).export_key(format="PEM"))


def public_key_from_pem(pem: str | bytes) -> bytes:
    key = ECC.import_key(pem)
    if key.curve != "Ed25519":
        raise ValueError("not an Ed25519 key")
    return bytes(key.public_key().export_key(format="raw"))


def valid_public_key(public_key: bytes) -> bool:
    """32 bytes encoding a point on the curve (pycryptodome decodes and checks it)."""
    try:
        eddsa.import_public_key(bytes(public_key))
    except (ValueError, TypeError):
        return False
    return True


class Verifier:
    """Signature checks with the public keys validated once and cached."""

    MAX_VOUCHED = 4096

    def __init__(self) -> None:
        self._cache: dict[bytes, nacl.signing.VerifyKey | None] = {}
        self._vouched: set[tuple[bytes, bytes, bytes]] = set()

    def vouch(self, public_key: bytes, msg: bytes, signature: bytes) -> None:
        """The caller has just verified exactly this signature (libsodium, as :meth:`verify`
        would): the next :meth:`verify` of these very bytes answers True without repeating
        it. Any other key, message or signature is verified as usual; a bounded set."""
        if len(self._vouched) >= self.MAX_VOUCHED:
            self._vouched.clear()
        self._vouched.add((bytes(public_key), bytes(msg), bytes(signature)))

    def _get(self, public_key: bytes) -> nacl.signing.VerifyKey | None:
        try:
            return self._cache[public_key]
        except KeyError:
            pass
        verifier: nacl.signing.VerifyKey | None = None
        if valid_public_key(public_key):  # a point on the curve, or refuse the key
            try:
                verifier = nacl.signing.VerifyKey(public_key)
            except (ValueError, TypeError, nacl.exceptions.CryptoError):
                verifier = None
        self._cache[public_key] = verifier
        return verifier

    def valid_key(self, public_key: bytes) -> bool:
        return isinstance(public_key, bytes) and len(public_key) == 32 and self._get(public_key) is not None

    def verify(self, public_key: bytes, msg: bytes, signature: bytes) -> bool:
        if len(signature) != 64:
            return False
        if self._vouched and (public_key, msg, signature) in self._vouched:
            self._vouched.discard((public_key, msg, signature))
            return True
        verifier = self._get(public_key)
        if verifier is None:
            return False
        try:
            verifier.verify(msg, signature)
        except nacl.exceptions.BadSignatureError:
            return False
        return True


Keyring = Mapping[str, bytes]
"""Key id -> raw 32-byte Ed25519 public key."""
