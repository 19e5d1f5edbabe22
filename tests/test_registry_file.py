"""The coordinator's watch on devices.json: changes are adopted once; a broken file never
replaces the registry in force."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from coordinator.registry_file import RegistryFile
from federation import crypto
from fledger import keytool


@pytest.fixture
def keys_dir(tmp_path: Path) -> Path:
    keytool.init_fleet(tmp_path, "plant7")
    keytool.add_device(tmp_path, "pump-01")
    return tmp_path


def test_a_change_is_adopted_once(keys_dir: Path) -> None:
    watch = RegistryFile(keys_dir / keytool.REGISTRY_FILE)
    assert watch.changed() is None  # what the coordinator started with
    _path, key_id = keytool.add_device(keys_dir, "pump-02")
    registry = watch.changed()
    assert registry is not None and set(registry.devices) == {"pump-01", "pump-02"}
    assert registry.public_key("pump-02", key_id) is not None
    assert watch.changed() is not None  # offered again until the coordinator has taken it
    watch.adopted()
    assert watch.changed() is None


@pytest.mark.parametrize("content, reason", [
    (b"{not json", "Expecting property name"),
    (b"[]", "not a JSON object"),
    (json.dumps({"devices": {"pump-01": {"keys": {"0011223344556677": "zz"}}}}).encode(), "non-hexadecimal"),
    (json.dumps({"devices": {"pump-01": {"keys": {"0011223344556677": (b"k" * 32).hex()}}}}).encode(),
     "does not match its public key"),
    (b"", "missing or empty"),
])
def test_a_broken_file_keeps_the_registry_in_force(keys_dir: Path, content: bytes, reason: str,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    path = keys_dir / keytool.REGISTRY_FILE
    watch = RegistryFile(path)
    path.write_bytes(content)
    with caplog.at_level(logging.ERROR):
        assert watch.changed() is None
        assert watch.changed() is None
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and reason in errors[0] and "keeping the one in force" in errors[0]  # logged once
    # Fixed again: adopted.
    _seed, public = crypto.ed25519_generate()
    path.write_text(json.dumps({"devices": {"pump-09": {"keys": {crypto.key_id_of(public): public.hex()}}}}))
    registry = watch.changed()
    assert registry is not None and set(registry.devices) == {"pump-09"}


def test_a_deleted_file_is_not_an_empty_fleet(keys_dir: Path) -> None:
    path = keys_dir / keytool.REGISTRY_FILE
    watch = RegistryFile(path)
    path.unlink()
    assert watch.changed() is None


def test_a_key_listed_for_two_devices_or_off_the_curve_is_refused(keys_dir: Path) -> None:
    from federation.keys import DeviceRegistry, KeyFileError

    path = keys_dir / keytool.REGISTRY_FILE
    data = json.loads(path.read_text())
    (key_id, public_hex), = data["devices"]["pump-01"]["keys"].items()
    twice = {"devices": {**data["devices"], "pump-02": {"keys": {key_id: public_hex}}}}
    with pytest.raises(KeyFileError, match="listed for both"):
        DeviceRegistry.from_json(twice)
    off_curve = bytes([2]) + bytes(31)  # not a point: the ledger would refuse it
    bad = {"devices": {"pump-03": {"keys": {crypto.key_id_of(off_curve): off_curve.hex()}}}}
    with pytest.raises(KeyFileError, match="not a valid Ed25519"):
        DeviceRegistry.from_json(bad)
