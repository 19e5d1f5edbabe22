"""`fledger keys`: provisioning, rotation, revocation, listing and amqtt broker passwords,
driven through the real command line (fledger.cli.main) on a temporary key directory."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from federation.keys import CoordinatorKeys, DeviceBundle, DeviceRegistry
from fledger import keytool
from fledger.cli import main as cli

FLEET = "plant7"


def keys_cli(directory: Path, *argv: str) -> int:
    return cli(["--log-level", "ERROR", "keys", "--dir", str(directory), *argv])


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


@pytest.fixture
def permissive_umask() -> Iterator[None]:
    """A careless environment (umask 000): secret files must still come out 0600."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture
def fleet(tmp_path: Path, permissive_umask: None) -> Path:
    directory = tmp_path / "keys"
    assert keys_cli(directory, "init", "--fleet", FLEET) == 0
    return directory


def registry(directory: Path) -> DeviceRegistry:
    return DeviceRegistry.load(directory / keytool.REGISTRY_FILE)


def test_init_and_add_device_write_0600_files(fleet: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert keys_cli(fleet, "add-device", "pump-01") == 0
    out = capsys.readouterr().out
    bundle_file = keytool.bundle_path(fleet, "pump-01")
    for path in (fleet / keytool.COORDINATOR_FILE, fleet / keytool.REGISTRY_FILE, bundle_file):
        assert mode(path) == 0o600, f"{path} is {mode(path):o}"
    bundle = DeviceBundle.load(bundle_file)
    coordinator = CoordinatorKeys.load(fleet / keytool.COORDINATOR_FILE)
    assert (bundle.fleet, bundle.device_id) == (FLEET, "pump-01")
    assert bundle.coordinator == coordinator.public and bundle.model_key == coordinator.model_key
    assert bundle.key_id in out
    assert registry(fleet).public_key("pump-01", bundle.key_id) == bundle.sign_public
    # The registry holds public keys only: no device secret ever reaches the coordinator.
    assert bundle.sign_seed.hex() not in (fleet / keytool.REGISTRY_FILE).read_text()
    assert not list(fleet.glob("*.tmp"))


def test_add_device_refuses_to_overwrite_a_bundle_unless_forced(fleet: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert keys_cli(fleet, "add-device", "pump-01") == 0
    bundle_file = keytool.bundle_path(fleet, "pump-01")
    before = bundle_file.read_bytes()
    first = DeviceBundle.load(bundle_file).key_id
    capsys.readouterr()

    assert keys_cli(fleet, "add-device", "pump-01") == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert bundle_file.read_bytes() == before
    assert list(registry(fleet).devices["pump-01"].keys) == [first]

    # The bundle was deleted from the admin machine after installing it (as deploy/README
    # says), but the device's key is still active: still refused, rotate is the way.
    bundle_file.unlink()
    assert keys_cli(fleet, "add-device", "pump-01") == 2
    assert "rotate" in capsys.readouterr().err

    # --force re-provisions; the key it replaces is revoked, never left active.
    assert keys_cli(fleet, "add-device", "pump-01", "--force") == 0
    second = DeviceBundle.load(bundle_file).key_id
    assert second != first and mode(bundle_file) == 0o600
    record = registry(fleet).devices["pump-01"]
    assert record.revoked == {first} and set(record.keys) == {first, second}


def test_rotate_makes_a_new_key_and_revokes_the_old(fleet: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert keys_cli(fleet, "add-device", "pump-01") == 0
    assert keys_cli(fleet, "add-device", "pump-02") == 0
    bundle_file = keytool.bundle_path(fleet, "pump-01")
    old = DeviceBundle.load(bundle_file)
    other = DeviceBundle.load(keytool.bundle_path(fleet, "pump-02"))
    capsys.readouterr()

    assert keys_cli(fleet, "rotate", "pump-01") == 0
    out = capsys.readouterr().out
    new = DeviceBundle.load(bundle_file)
    assert mode(bundle_file) == 0o600 and mode(fleet / keytool.REGISTRY_FILE) == 0o600
    assert new.key_id != old.key_id and new.sign_seed != old.sign_seed
    assert new.key_id in out and old.key_id in out
    # Same fleet, same coordinator: only the device's identity key changed.
    assert (new.fleet, new.device_id, new.coordinator, new.model_key) == (
        old.fleet, old.device_id, old.coordinator, old.model_key)
    reg = registry(fleet)
    assert reg.public_key("pump-01", new.key_id) == new.sign_public
    assert reg.public_key("pump-01", old.key_id) is None  # what the coordinator checks
    assert reg.devices["pump-01"].revoked == {old.key_id}
    assert reg.public_key("pump-02", other.key_id) == other.sign_public  # untouched

    # A second rotation revokes the first rotation's key too.
    assert keys_cli(fleet, "rotate", "pump-01") == 0
    newest = DeviceBundle.load(bundle_file)
    assert registry(fleet).devices["pump-01"].revoked == {old.key_id, new.key_id}
    assert keytool.active_keys(registry(fleet), "pump-01") == [newest.key_id]


def test_rotate_an_unknown_device_fails_without_writing(fleet: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = (fleet / keytool.REGISTRY_FILE).read_bytes()
    assert keys_cli(fleet, "rotate", "ghost") == 2
    assert "not registered" in capsys.readouterr().err
    assert (fleet / keytool.REGISTRY_FILE).read_bytes() == before
    assert not keytool.bundle_path(fleet, "ghost").exists()


def test_revoke_and_list(fleet: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert keys_cli(fleet, "add-device", "pump-01") == 0
    assert keys_cli(fleet, "add-device", "pump-02") == 0
    key1 = DeviceBundle.load(keytool.bundle_path(fleet, "pump-01")).key_id
    key2 = DeviceBundle.load(keytool.bundle_path(fleet, "pump-02")).key_id
    assert keys_cli(fleet, "revoke", "pump-02", key2) == 0
    assert keys_cli(fleet, "revoke", "pump-02", "0000000000000000") == 2  # no such key
    capsys.readouterr()
    assert keys_cli(fleet, "list") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"pump-01\t{key1}\tactive", f"pump-02\t{key2}\trevoked"]
    assert registry(fleet).public_key("pump-02", key2) is None

    assert keys_cli(fleet, "rotate", "pump-01") == 0
    new1 = DeviceBundle.load(keytool.bundle_path(fleet, "pump-01")).key_id
    capsys.readouterr()
    assert keys_cli(fleet, "list") == 0
    rows = sorted(line.split("\t") for line in capsys.readouterr().out.splitlines())
    assert rows == sorted([["pump-01", key1, "revoked"], ["pump-01", new1, "active"], ["pump-02", key2, "revoked"]])


def test_broker_password_reads_the_file_and_replaces_the_user(tmp_path: Path, permissive_umask: None,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    from pwdlib import PasswordHash
    from pwdlib.hashers.argon2 import Argon2Hasher

    verify = PasswordHash((Argon2Hasher(),)).verify
    out = tmp_path / "broker" / "passwords"
    secret = tmp_path / "pump-01.password"
    secret.write_text("first-secret-1\n")
    secret.chmod(0o600)
    other = tmp_path / "coordinator.password"
    other.write_text("coordinator-secret\n")
    other.chmod(0o600)

    assert keys_cli(tmp_path, "broker-password", "pump-01", "--password-file", str(secret), "--out", str(out)) == 0
    assert keys_cli(tmp_path, "broker-password", "coordinator", "--password-file", str(other), "--out", str(out)) == 0
    secret.write_text("second-secret-2\n")
    assert keys_cli(tmp_path, "broker-password", "pump-01", "--password-file", str(secret), "--out", str(out)) == 0
    assert "readable by others" not in capsys.readouterr().err

    assert mode(out) == 0o600
    text = out.read_text()
    assert "secret" not in text  # hashes only
    entries = dict(line.split(":", 1) for line in text.splitlines())
    assert sorted(entries) == ["coordinator", "pump-01"]  # pump-01 replaced, not duplicated
    assert verify("second-secret-2", entries["pump-01"]) and not verify("first-secret-1", entries["pump-01"])
    assert verify("coordinator-secret", entries["coordinator"])

    # A world-readable password file works but is warned about; an empty one is refused.
    secret.chmod(0o644)
    assert keys_cli(tmp_path, "broker-password", "pump-01", "--password-file", str(secret), "--out", str(out)) == 0
    assert "readable by others" in capsys.readouterr().err
    empty = tmp_path / "empty.password"
    empty.write_text("\n")
    before = out.read_bytes()
    assert keys_cli(tmp_path, "broker-password", "pump-01", "--password-file", str(empty), "--out", str(out)) == 2
    assert out.read_bytes() == before
    assert keys_cli(tmp_path, "broker-password", "bad:user", "--password-file", str(secret), "--out", str(out)) == 2


def test_broker_password_takes_no_password_on_the_command_line() -> None:
    from fledger.cli import build_parser

    with pytest.raises(SystemExit):  # --password-file is required; there is no --password
        build_parser().parse_args(["keys", "broker-password", "pump-01", "--out", "x"])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["keys", "broker-password", "pump-01", "--password", "p", "--out", "x"])


def test_rotated_registry_round_trips_through_json(fleet: Path) -> None:
    """What the coordinator reads (devices.json) carries the revocation."""
    keytool.add_device(fleet, "pump-01")
    _path, new_id, revoked = keytool.rotate_device_key(fleet, "pump-01")
    data = json.loads((fleet / keytool.REGISTRY_FILE).read_text())
    entry = data["devices"]["pump-01"]
    assert entry["revoked"] == revoked and len(revoked) == 1
    assert set(entry["keys"]) == {new_id, *revoked}


def test_init_never_wipes_an_existing_device_registry(tmp_path: Path) -> None:
    """coordinator.json lost (or not copied yet) but devices.json there: a plain init must not
    replace the registry with an empty one."""
    keytool.init_fleet(tmp_path, "plant7")
    _path, key_id = keytool.add_device(tmp_path, "pump-01")
    (tmp_path / keytool.COORDINATOR_FILE).unlink()
    with pytest.raises(FileExistsError, match=r"devices\.json"):
        keytool.init_fleet(tmp_path, "plant7")
    assert DeviceRegistry.load(tmp_path / keytool.REGISTRY_FILE).public_key("pump-01", key_id) is not None


def test_init_and_add_device_make_broker_logins(fleet: Path) -> None:
    """What the embedded broker enforces by default: one login per role and per device, each
    password in its own 0600 file and only its argon2 hash in the broker's password file."""
    assert keys_cli(fleet, "add-device", "pump-01") == 0
    broker_dir = fleet / keytool.BROKER_DIR
    db = keytool.broker_password_db(fleet)
    users = [line.split(":", 1)[0] for line in db.read_text().splitlines()]
    assert sorted(users) == sorted([*keytool.ROLE_USERS, "pump-01"])
    for user in users:
        password_file = broker_dir / f"{user}.password"
        assert mode(password_file) == 0o600 and mode(db) == 0o600
        assert password_file.read_text().strip() not in db.read_text()


def test_every_user_of_the_shipped_acl_is_a_reserved_role() -> None:
    """A role added to fledger/fledger.acl (a `user` block) is refused as a device id too, and
    `keys init` makes its login: the two lists cannot drift apart."""
    from fledger.acl import Acl

    assert set(Acl.load().users) == set(keytool.ROLE_USERS)


@pytest.mark.parametrize("device", ["coordinator", "monitor", "operator", "owner", "Monitor", "OWNER", "auditor"])
def test_add_device_refuses_ids_of_broker_roles(fleet: Path, device: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A device's broker user is its id: `coordinator` as a device would get the coordinator's
    rights on the broker. So are other broker users that are no device (here an extra monitor
    account made with `keys broker-password`)."""
    password = fleet / "auditor.pw"
    password.write_text("a-long-password\n")
    password.chmod(0o600)
    assert keys_cli(fleet, "broker-password", "auditor", "--password-file", str(password),
                    "--out", str(keytool.broker_password_db(fleet))) == 0
    before = (fleet / keytool.REGISTRY_FILE).read_bytes()
    assert keys_cli(fleet, "add-device", device) == 2
    err = capsys.readouterr().err
    assert ("already a broker user" if device == "auditor" else "reserved") in err
    assert (fleet / keytool.REGISTRY_FILE).read_bytes() == before
    assert not keytool.bundle_path(fleet, device).exists()


def test_add_many_devices_in_one_batch(fleet: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`add-device --count` and `--from-file`: every device gets a working bundle, its key in the
    registry and a broker login whose password checks against its hash."""
    from pwdlib import PasswordHash
    from pwdlib.hashers.argon2 import Argon2Hasher

    assert keys_cli(fleet, "add-device", "--count", "12", "--prefix", "dev-") == 0
    listing = fleet / "more.txt"
    listing.write_text("# line\nvalve-a\n\nvalve-b  # comment\n")
    assert keys_cli(fleet, "add-device", "--from-file", str(listing)) == 0
    expected = [f"dev-{n:02d}" for n in range(1, 13)] + ["valve-a", "valve-b"]
    reg = registry(fleet)
    assert sorted(reg.devices) == sorted(expected)
    db = {line.split(":", 1)[0]: line.split(":", 1)[1] for line in
          keytool.broker_password_db(fleet).read_text().splitlines()}
    checker = PasswordHash((Argon2Hasher(),))  # what the broker uses: default parameters, any hash
    for device in expected:
        bundle = DeviceBundle.load(keytool.bundle_path(fleet, device))
        assert mode(keytool.bundle_path(fleet, device)) == 0o600
        assert reg.public_key(device, bundle.key_id) == bundle.sign_public
        password = (fleet / keytool.BROKER_DIR / f"{device}.password").read_text().strip()
        assert checker.verify(password, db[device])
    assert set(db) == {*expected, *keytool.ROLE_USERS}


def test_a_batch_with_one_bad_id_writes_nothing(fleet: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert keys_cli(fleet, "add-device", "pump-01") == 0
    before = sorted(p.name for p in fleet.rglob("*"))
    registry_before = (fleet / keytool.REGISTRY_FILE).read_bytes()
    for argv in (["a-1", "a-2", "monitor"], ["a-1", "pump-01"], ["a-1", "a-1"], ["a-1", "bad/id"]):
        assert keys_cli(fleet, "add-device", *argv) == 2
        assert capsys.readouterr().err
        assert sorted(p.name for p in fleet.rglob("*")) == before
        assert (fleet / keytool.REGISTRY_FILE).read_bytes() == registry_before
