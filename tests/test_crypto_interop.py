"""The libsodium X25519 and HKDF in federation.crypto agree byte for byte with the pycryptodome
code they replaced, so existing keys and sealed updates keep working in both directions."""

from __future__ import annotations

import os

import pytest
from Crypto.Hash import SHA256
from Crypto.Protocol.DH import import_x25519_private_key, import_x25519_public_key, key_agreement
from Crypto.Protocol.KDF import HKDF
from Crypto.PublicKey import ECC

from federation import crypto, envelope
from federation.keys import CoordinatorKeys, DeviceBundle


def old_x25519_generate() -> tuple[bytes, bytes]:
    key = ECC.generate(curve="X25519")
    return bytes(key.seed), key.public_key().export_key(format="raw")


def old_shared_key(private_seed: bytes, peer_public: bytes, salt: bytes, context: bytes) -> bytes:
    """federation.crypto.x25519_shared_key as it was (pycryptodome)."""
    def kdf(secret: bytes) -> bytes:
        return bytes(HKDF(secret, 32, salt, SHA256, context=context))

    return bytes(key_agreement(static_priv=import_x25519_private_key(private_seed),
                               static_pub=import_x25519_public_key(peer_public), kdf=kdf))


def test_keys_and_shared_keys_match_pycryptodome_both_ways() -> None:
    for _ in range(20):
        old_seed, old_public = old_x25519_generate()
        new_seed, new_public = crypto.x25519_generate()
        assert crypto.x25519_public(old_seed) == old_public
        assert import_x25519_private_key(new_seed).public_key().export_key(format="raw") == new_public
        salt, context = os.urandom(16), b"fledger/update/v1"
        expected = old_shared_key(old_seed, new_public, salt, context)
        assert crypto.x25519_shared_key(old_seed, new_public, salt, context) == expected
        assert crypto.x25519_shared_key(new_seed, old_public, salt, context) == expected
        assert old_shared_key(new_seed, old_public, salt, context) == expected


def test_ed25519_seeds_match_pycryptodome() -> None:
    seed, public = crypto.ed25519_generate()
    assert ECC.construct(curve="Ed25519", seed=seed).public_key().export_key(format="raw") == public
    old = ECC.generate(curve="Ed25519")
    assert crypto.ed25519_public(bytes(old.seed)) == old.public_key().export_key(format="raw")
    assert crypto.ed25519_signer(seed)(b"m") == crypto.ed25519_sign(seed, b"m")


@pytest.mark.parametrize(("ikm", "salt", "info", "length", "okm"), [
    # RFC 5869, appendix A, test cases 1 and 3
    ("0b" * 22, "000102030405060708090a0b0c", "f0f1f2f3f4f5f6f7f8f9", 42,
     "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"),
    ("0b" * 22, "", "", 42,
     "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d9d201395faa4b61a96c8"),
])
def test_hkdf_rfc5869_vectors(ikm: str, salt: str, info: str, length: int, okm: str) -> None:
    out = crypto.hkdf_sha256(bytes.fromhex(ikm), length, bytes.fromhex(salt), bytes.fromhex(info))
    assert out.hex() == okm
    assert bytes(HKDF(bytes.fromhex(ikm), length, bytes.fromhex(salt), SHA256,
                      context=bytes.fromhex(info))).hex() == okm


def test_small_order_peer_keys_are_refused_as_before() -> None:
    seed, _ = crypto.x25519_generate()
    for bad in (bytes(32), (1).to_bytes(32, "little"), (2**255 - 19).to_bytes(32, "little")):
        with pytest.raises(ValueError):
            import_x25519_public_key(bad)
        with pytest.raises(crypto.CryptoError):
            crypto.x25519_shared_key(seed, bad, b"salt", b"ctx")
    with pytest.raises(crypto.CryptoError):
        crypto.x25519_shared_key(seed, b"short", b"salt", b"ctx")


def old_seal_update(bundle: DeviceBundle, weights: bytes) -> bytes:
    """An update sealed the old way: a pycryptodome ephemeral key and key agreement."""
    import hashlib
    import time

    eph_seed, eph_public = old_x25519_generate()
    msg_id, iv = os.urandom(16), os.urandom(12)
    header = {
        "fleet": bundle.fleet, "device": bundle.device_id, "round": 1, "key_id": bundle.key_id,
        "msg_id": msg_id, "epk": eph_public, "to": bundle.coordinator.enc_key_id, "iv": iv,
        "weights_sha256": hashlib.sha256(weights).digest(), "num_samples": 3, "metrics": {}, "codec": 1,
        "created": time.time(), "dataset_sha256": bytes(32),
    }
    header_bytes = envelope._pack(header)
    key = old_shared_key(eph_seed, bundle.coordinator.enc_public, msg_id, envelope.UPDATE_KDF_CONTEXT)
    ciphertext, tag = crypto.aes_gcm_encrypt(key, iv, weights, header_bytes)
    return envelope._pack({"fmt": envelope.UPDATE_FORMAT, "v": 1, "hdr": header_bytes,
                           "sig": bundle.sign(header_bytes), "ct": ciphertext, "tag": tag})


def test_old_and_new_updates_open_on_both_sides() -> None:
    # A coordinator key made by pycryptodome (as every existing coordinator.json was).
    old_enc_seed, _ = old_x25519_generate()
    fresh = CoordinatorKeys.generate("f")
    keys = CoordinatorKeys("f", fresh.sign_seed, old_enc_seed, fresh.model_key_id, fresh.model_key)
    seed, _ = crypto.ed25519_generate()
    bundle = DeviceBundle("f", "d", seed, keys.public, keys.model_key_id, keys.model_key)
    weights = os.urandom(5000)
    old_message = envelope.parse_update(old_seal_update(bundle, weights), max_bytes=1 << 20)
    assert envelope.decrypt_update(old_message, keys) == weights
    new_message = envelope.parse_update(
        envelope.seal_update(bundle, 1, weights, 3, {}, dataset_sha256=bytes(32),
                             base_sha256=bytes(32)), max_bytes=1 << 20)
    # ...and the old (pycryptodome) coordinator code derives the same AES key for a new update.
    header = new_message.header
    old_key = old_shared_key(keys.enc_seed, header.epk, header.msg_id, envelope.UPDATE_KDF_CONTEXT)
    assert crypto.aes_gcm_decrypt(old_key, header.iv, new_message.ciphertext, new_message.tag,
                                  new_message.header_bytes) == weights
