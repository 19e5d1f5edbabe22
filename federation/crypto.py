"""Thin, typed wrappers over pycryptodome (X25519 + HKDF, AES-256-GCM, key generation) and
libsodium via PyNaCl (Ed25519 signing and verification).

Nothing here is invented: these are the library's primitives with fixed parameters, so the
rest of the code never handles curve names, tag sizes or KDF contexts itself.
"""

from __future__ import annotations

import hashlib

import nacl.exceptions
import nacl.signing
from Crypto.Cipher import AES
from Crypto.Hash import SHA256
from Crypto.Protocol.DH import import_x25519_private_key, import_x25519_public_key, key_agreement
from Crypto.Protocol.KDF import HKDF
from Crypto.PublicKey import ECC
from Crypto.Random import get_random_bytes

KEY_BYTES = 32
GCM_NONCE_BYTES = 12
GCM_TAG_BYTES = 16


class CryptoError(ValueError):
    """A signature, key or ciphertext did not check out."""


def random_bytes(n: int) -> bytes:
    return get_random_bytes(n)


def key_id_of(public_key: bytes) -> str:
    """Short stable name of a public key (first 8 bytes of its SHA-256, hex)."""
    return hashlib.sha256(public_key).hexdigest()[:16]


# --- Ed25519 -------------------------------------------------------------------------------


def ed25519_generate() -> tuple[bytes, bytes]:
    """Return (private seed, raw public key), 32 bytes each."""
    key = ECC.generate(curve="Ed25519")
    return bytes(key.seed), key.public_key().export_key(format="raw")


def ed25519_public(seed: bytes) -> bytes:
    return bytes(nacl.signing.SigningKey(seed).verify_key)


# Signing and verifying use libsodium (PyNaCl): about ten times faster than pycryptodome's
# Ed25519, and the coordinator verifies one device signature per update it ingests.
def ed25519_sign(seed: bytes, message: bytes) -> bytes:
    return bytes(nacl.signing.SigningKey(seed).sign(message).signature)


def ed25519_verify(public_key: bytes, message: bytes, signature: bytes) -> bool:
    try:  # libsodium refuses keys that are not points on the curve, or of small order
        nacl.signing.VerifyKey(public_key).verify(message, signature)
    except (ValueError, TypeError, nacl.exceptions.CryptoError):
        return False
    return True


# --- X25519 key agreement ------------------------------------------------------------------


def x25519_generate() -> tuple[bytes, bytes]:
    key = ECC.generate(curve="X25519")
    return bytes(key.seed), key.public_key().export_key(format="raw")


def x25519_public(seed: bytes) -> bytes:
    return import_x25519_private_key(seed).public_key().export_key(format="raw")


def x25519_shared_key(private_seed: bytes, peer_public: bytes, salt: bytes, context: bytes) -> bytes:
    """ECDH on Curve25519, then HKDF-SHA256 to a 32-byte AES key."""
    try:
        peer = import_x25519_public_key(peer_public)
    except ValueError as exc:
        raise CryptoError(f"bad X25519 public key: {exc}") from exc

    def kdf(secret: bytes) -> bytes:
        out = HKDF(secret, KEY_BYTES, salt, SHA256, context=context)
        assert isinstance(out, bytes)
        return out

    return bytes(
        key_agreement(static_priv=import_x25519_private_key(private_seed), static_pub=peer, kdf=kdf)
    )


# --- AES-256-GCM ---------------------------------------------------------------------------


def aes_gcm_encrypt(key: bytes, nonce: bytes, plaintext: bytes, aad: bytes) -> tuple[bytes, bytes]:
    cipher = AES.new(key, AES.MODE_GCM, nonce=nonce, mac_len=GCM_TAG_BYTES)
    cipher.update(aad)
    ciphertext, tag = cipher.encrypt_and_digest(plaintext)
    return ciphertext, tag


def aes_gcm_decrypt(key: bytes, nonce: bytes, ciphertext: bytes, tag: bytes, aad: bytes) -> bytes:
    if len(key) != KEY_BYTES or len(nonce) != GCM_NONCE_BYTES or len(tag) != GCM_TAG_BYTES:
        raise CryptoError("bad AES-GCM key, nonce or tag length")
    cipher = AES.new(key, AES.MODE_GCM, nonce=nonce, mac_len=GCM_TAG_BYTES)
    cipher.update(aad)
    try:
        return bytes(cipher.decrypt_and_verify(ciphertext, tag))
    except ValueError as exc:
        raise CryptoError("authentication failed: ciphertext or header was altered, or wrong key") from exc
