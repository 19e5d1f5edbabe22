import hashlib
from pathlib import Path

import msgpack
import pytest

from federation import crypto, envelope
from federation.envelope import EnvelopeError
from federation.keys import CoordinatorKeys, DeviceBundle, DeviceRegistry

LIMIT = 1 << 20
DATA = bytes(32)  # the SHA-256 of a registered data set


@pytest.fixture(scope="module")
def fleet() -> tuple[CoordinatorKeys, DeviceBundle, DeviceBundle]:
    keys = CoordinatorKeys.generate("f1")
    devices = []
    for name in ("dev-a", "dev-b"):
        seed, _ = crypto.ed25519_generate()
        devices.append(DeviceBundle("f1", name, seed, keys.public, keys.model_key_id, keys.model_key))
    return keys, devices[0], devices[1]


def test_update_round_trip(fleet) -> None:  # type: ignore[no-untyped-def]
    keys, dev, _ = fleet
    weights = b"\x01\x02" * 500
    data = envelope.seal_update(dev, 4, weights, 123, {"train_loss": 0.5}, dataset_sha256=DATA, base_sha256=bytes(32))
    sealed = envelope.parse_update(data, max_bytes=LIMIT)
    assert (sealed.header.device, sealed.header.round, sealed.header.num_samples) == ("dev-a", 4, 123)
    assert sealed.header.weights_sha256 == hashlib.sha256(weights).digest()
    envelope.verify_update_signature(sealed, dev.sign_public)
    assert envelope.decrypt_update(sealed, keys) == weights
    assert weights not in data  # no plaintext weights on the wire


def test_two_seals_differ_and_ids_are_fresh(fleet) -> None:  # type: ignore[no-untyped-def]
    _, dev, _ = fleet
    a = envelope.parse_update(envelope.seal_update(dev, 1, b"w" * 64, 1, {}, dataset_sha256=DATA,
                                                   base_sha256=bytes(32)), max_bytes=LIMIT)
    b = envelope.parse_update(envelope.seal_update(dev, 1, b"w" * 64, 1, {}, dataset_sha256=DATA,
                                                   base_sha256=bytes(32)), max_bytes=LIMIT)
    assert a.header.msg_id != b.header.msg_id and a.ciphertext != b.ciphertext


def _mutate(data: bytes, **changes: object) -> bytes:
    outer = msgpack.unpackb(data)
    outer.update(changes)
    return msgpack.packb(outer)


def test_tampered_ciphertext_fails_authentication(fleet) -> None:  # type: ignore[no-untyped-def]
    keys, dev, _ = fleet
    data = envelope.seal_update(dev, 1, b"weights" * 10, 5, {}, dataset_sha256=DATA, base_sha256=bytes(32))
    ct = bytearray(msgpack.unpackb(data)["ct"])
    ct[3] ^= 1
    sealed = envelope.parse_update(_mutate(data, ct=bytes(ct)), max_bytes=LIMIT)
    envelope.verify_update_signature(sealed, dev.sign_public)  # header untouched: still signed
    with pytest.raises(EnvelopeError) as err:
        envelope.decrypt_update(sealed, keys)
    assert err.value.reason == "decrypt_failed"


def test_swapped_header_breaks_signature(fleet) -> None:  # type: ignore[no-untyped-def]
    keys, dev, _ = fleet
    data = envelope.seal_update(dev, 1, b"weights", 5, {}, dataset_sha256=DATA, base_sha256=bytes(32))
    hdr = msgpack.unpackb(msgpack.unpackb(data)["hdr"])
    hdr["round"] = 2
    sealed = envelope.parse_update(_mutate(data, hdr=msgpack.packb(hdr)), max_bytes=LIMIT)
    with pytest.raises(EnvelopeError) as err:
        envelope.verify_update_signature(sealed, dev.sign_public)
    assert err.value.reason == "bad_signature"
    with pytest.raises(EnvelopeError):  # and AES-GCM's associated data catches it as well
        envelope.decrypt_update(sealed, keys)


def test_other_device_cannot_sign_for_me(fleet) -> None:  # type: ignore[no-untyped-def]
    _, dev_a, dev_b = fleet
    forged = DeviceBundle("f1", "dev-a", dev_b.sign_seed, dev_b.coordinator, dev_b.model_key_id, dev_b.model_key)
    sealed = envelope.parse_update(envelope.seal_update(forged, 1, b"w", 1, {}, dataset_sha256=DATA,
                                                        base_sha256=bytes(32)), max_bytes=LIMIT)
    with pytest.raises(EnvelopeError):
        envelope.verify_update_signature(sealed, dev_a.sign_public)


def test_wrong_coordinator_key_cannot_decrypt(fleet) -> None:  # type: ignore[no-untyped-def]
    _, dev, _ = fleet
    sealed = envelope.parse_update(envelope.seal_update(dev, 1, b"w", 1, {}, dataset_sha256=DATA,
                                                        base_sha256=bytes(32)), max_bytes=LIMIT)
    with pytest.raises(EnvelopeError) as err:
        envelope.decrypt_update(sealed, CoordinatorKeys.generate("f1"))
    assert err.value.reason == "wrong_key"


@pytest.mark.parametrize("data", [b"", b"\x00", b"\x93\x01\x02\x03", msgpack.packb({"fmt": "fledger.update"}),
                                  msgpack.packb({"fmt": "fledger.update", "v": 2})])
def test_malformed(data: bytes) -> None:
    with pytest.raises(EnvelopeError) as err:
        envelope.parse_update(data, max_bytes=LIMIT)
    assert err.value.reason in ("malformed", "unsupported_version")


def test_oversized_rejected_before_decoding(fleet) -> None:  # type: ignore[no-untyped-def]
    _, dev, _ = fleet
    with pytest.raises(EnvelopeError) as err:
        envelope.parse_update(envelope.seal_update(dev, 1, b"w" * 5000, 1, {}, dataset_sha256=DATA,
                                                   base_sha256=bytes(32)), max_bytes=1000)
    assert err.value.reason == "oversized"


def model_block(tmp: Path, keys: CoordinatorKeys, round_number: int, weights: bytes, name: str = "l") -> bytes:
    """A coordinator-signed ledger block recording this model for this round."""
    from federation import records
    from federation.fleet_state import FleetLedger
    from ledger import Ed25519Signer

    with FleetLedger.open(tmp / f"{name}.log", signer=Ed25519Signer(keys.sign_seed), fleet="f1") as ledger:
        return ledger.append(records.model_published(round_number, hashlib.sha256(weights).digest())).to_bytes()


def test_model_round_trip_and_forgery(fleet, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    keys, dev, _ = fleet
    secret = b"WEIGHTS-SECRET"
    data = envelope.seal_model(keys, 3, secret, block=model_block(tmp_path, keys, 3, secret))
    header, weights = envelope.open_model(data, dev, max_bytes=LIMIT)
    assert (header.round, weights) == (3, secret)
    assert secret not in data
    impostor = CoordinatorKeys("f1", crypto.ed25519_generate()[0], keys.enc_seed, keys.model_key_id, keys.model_key)
    forged = envelope.seal_model(impostor, 4, b"evil", block=model_block(tmp_path, impostor, 4, b"evil", "x"))
    with pytest.raises(EnvelopeError) as err:
        envelope.open_model(forged, dev, max_bytes=LIMIT)
    assert err.value.reason == "bad_signature"


def test_model_must_match_the_ledger_block_it_names(fleet, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    keys, dev, _ = fleet
    # A genuine block, but for other weights: a replayed or swapped model is refused.
    other_block = model_block(tmp_path, keys, 3, b"other weights")
    with pytest.raises(EnvelopeError) as err:
        envelope.open_model(envelope.seal_model(keys, 3, b"these weights", block=other_block), dev, max_bytes=LIMIT)
    assert err.value.reason == "ledger_mismatch"
    # The right weights but the block of another round.
    with pytest.raises(EnvelopeError) as err:
        envelope.open_model(envelope.seal_model(keys, 5, b"w", block=model_block(tmp_path, keys, 4, b"w", "r")),
                            dev, max_bytes=LIMIT)
    assert err.value.reason == "ledger_mismatch"
    # A block signed by another key.
    impostor = CoordinatorKeys("f1", crypto.ed25519_generate()[0], keys.enc_seed, keys.model_key_id, keys.model_key)
    with pytest.raises(EnvelopeError) as err:
        envelope.open_model(envelope.seal_model(keys, 2, b"w", block=model_block(tmp_path, impostor, 2, b"w", "i")),
                            dev, max_bytes=LIMIT)
    assert err.value.reason == "bad_signature"


def test_registry_revocation() -> None:
    registry = DeviceRegistry()
    key_id = registry.add("d", b"k" * 32)
    assert registry.public_key("d", key_id) == b"k" * 32
    registry.revoke("d", key_id)
    assert registry.public_key("d", key_id) is None


def test_ed25519_signatures_are_standard_and_bad_keys_refused() -> None:
    """Signing moved from pycryptodome to libsodium: signatures in existing ledgers and bundles
    (RFC 8032, deterministic) must verify unchanged, and keys that are not usable points must
    be refused rather than accepted."""
    from Crypto.Signature import eddsa

    from ledger.keys import Ed25519Signer, Verifier

    seed, public = crypto.ed25519_generate()
    message = b"round 7 update digest"
    old = eddsa.new(eddsa.import_private_key(seed), "rfc8032").sign(message)  # as written before the switch
    assert crypto.ed25519_sign(seed, message) == old == Ed25519Signer(seed).sign(message)
    assert crypto.ed25519_public(seed) == public == Ed25519Signer(seed).public_key
    verifier = Verifier()
    assert crypto.ed25519_verify(public, message, old) and verifier.verify(public, message, old)
    assert not crypto.ed25519_verify(public, message + b"!", old)
    assert not verifier.verify(public, message + b"!", old)
    identity = bytes([1]) + bytes(31)  # a small-order point: any "signature" math is degenerate
    not_a_point = bytes([2]) + bytes(31)
    for bad in (identity, not_a_point, public[:31], b""):
        assert not crypto.ed25519_verify(bad, message, old)
        assert not verifier.verify(bad, message, old)
    assert not verifier.valid_key(not_a_point) and not verifier.valid_key(public[:31])
