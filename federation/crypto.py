"""Thin, typed wrappers over libsodium via PyNaCl (Ed25519, X25519) and pycryptodome
(AES-256-GCM, HKDF-SHA256 per RFC 5869).

Nothing here is invented: these are the libraries' primitives with fixed parameters, so the
rest of the code never handles curve names, tag sizes or KDF contexts itself.

Speed matters here: the coordinator runs one X25519 + HKDF, one Ed25519 verification, one
AES-GCM decryption and one SHA-256 per update it ingests. libsodium's X25519 is ~8x faster
than pycryptodome's (which cost more than decrypting a 424 KB update). HKDF stays
pycryptodome's (~50 us; a hand-written one over hmac was ~10 us, but we do not hand-roll
crypto). Keys, shared secrets and derived keys are byte-for-byte those of the earlier code
(tests/test_crypto_interop.py checks both against each other and RFC 5869's vectors).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import nacl.bindings
import nacl.exceptions
import nacl.signing
from Crypto.Cipher import AES
from Crypto.Hash import SHA256
from Crypto.Protocol.KDF import HKDF
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
    """Return (private seed, raw public key), 32 bytes each (RFC 8032 seed, as pycryptodome's)."""
    key = nacl.signing.SigningKey.generate()
    return bytes(key), bytes(key.verify_key)


def ed25519_public(seed: bytes) -> bytes:
    return bytes(nacl.signing.SigningKey(seed).verify_key)


# Signing and verifying use libsodium (PyNaCl): about ten times faster than pycryptodome's
# Ed25519, and the coordinator verifies one device signature per update it ingests.
def ed25519_sign(seed: bytes, message: bytes) -> bytes:
    return bytes(nacl.signing.SigningKey(seed).sign(message).signature)


def ed25519_signer(seed: bytes) -> Callable[[bytes], bytes]:
    """``sign(message) -> signature`` with the key expanded once (for keys that sign often)."""
    key = nacl.signing.SigningKey(seed)

    def sign(message: bytes) -> bytes:
        return bytes(key.sign(message).signature)

    return sign


def ed25519_verify(public_key: bytes, message: bytes, signature: bytes) -> bool:
    try:  # libsodium refuses keys that are not points on the curve, or of small order
        nacl.signing.VerifyKey(public_key).verify(message, signature)
    except (ValueError, TypeError, nacl.exceptions.CryptoError):
        return False
    return True


# --- X25519 key agreement ------------------------------------------------------------------


def x25519_generate() -> tuple[bytes, bytes]:
    """Return (private seed, raw public key). The seed is 32 random bytes, clamped by X25519
    itself (RFC 7748), as in pycryptodome's keys: both libraries read each other's seeds."""
    seed = get_random_bytes(KEY_BYTES)
    return seed, x25519_public(seed)


def x25519_public(seed: bytes) -> bytes:
    if len(seed) != KEY_BYTES:
        raise CryptoError(f"an X25519 private key is {KEY_BYTES} bytes, not {len(seed)}")
    return bytes(nacl.bindings.crypto_scalarmult_base(seed))


def hkdf_sha256(secret: bytes, length: int, salt: bytes, context: bytes) -> bytes:
    """HKDF-SHA256 (RFC 5869): extract with ``salt``, expand with ``context`` as its info."""
    if not 0 < length <= 255 * 32:
        raise ValueError(f"HKDF-SHA256 output length {length} out of range")
    key = HKDF(secret, length, salt, SHA256, context=context)
    assert isinstance(key, bytes)  # one key asked for, so one bytes (not a tuple)
    return key


def x25519_shared_key(private_seed: bytes, peer_public: bytes, salt: bytes, context: bytes) -> bytes:
    """ECDH on Curve25519, then HKDF-SHA256 to a 32-byte AES key."""
    if len(peer_public) != KEY_BYTES or len(private_seed) != KEY_BYTES:
        raise CryptoError("bad X25519 public key: an X25519 key is 32 bytes")
    try:
        secret = nacl.bindings.crypto_scalarmult(private_seed, peer_public)
    except (RuntimeError, ValueError, TypeError, nacl.exceptions.CryptoError) as exc:
        # libsodium refuses a peer key of small order (the shared secret would be all zeros).
        raise CryptoError("bad X25519 public key: a point of small order") from exc
    return hkdf_sha256(bytes(secret), KEY_BYTES, salt, context)


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
