"""`fledger keys nats-config`: the NATS authorization generated from fledger.acl and the fleet's keys.

What nats-server then enforces is tested against a real server in tests/test_broker_security.py
(test_nats_enforces_the_same_roles_as_mosquitto); here: who gets a login, the translation of
MQTT filters, and that nats-server accepts the file with the shipped node config.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from pwdlib.hashers.bcrypt import BcryptHasher

from fledger import keytool
from fledger.nats_auth import NatsConfigError, filter_to_subjects

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(("mqtt", "nats"), [
    ("fledger/+/update/pump-01", ["fledger.*.update.pump-01"]),
    ("fledger/+/model/global/#", ["fledger.*.model.global", "fledger.*.model.global.>"]),  # `#` matches the parent
    ("#", [">"]),
    ("fledger/+/ack/+", ["fledger.*.ack.*"]),
])
def test_mqtt_filters_become_the_subjects_nats_maps_topics_to(mqtt: str, nats: list[str]) -> None:
    assert filter_to_subjects(mqtt) == nats


@pytest.mark.parametrize("bad", ["fledger/a.b/x", "fledger/+/x y", "fledger/*/x", "a//b", "a/#/b"])
def test_filters_nats_cannot_express_are_refused(bad: str) -> None:
    with pytest.raises(NatsConfigError):
        filter_to_subjects(bad)


def users_in(path: Path) -> dict[str, dict[str, object]]:
    """The user entries of a generated file (one JSON object a line inside `users: [...]`)."""
    return {entry["user"]: entry for entry in (json.loads(line) for line in path.read_text().splitlines()
                                               if line.strip().startswith("{\"user\""))}


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fledger.cli", "keys", *args], capture_output=True, text=True,
                          timeout=60)


def test_nats_config_has_a_login_per_role_device_and_client_and_nats_server_accepts_it(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keytool.init_fleet(keys, "plant7")
    keytool.add_devices(keys, ["pump-01", "pump-02", "pump-03"])
    keytool.add_client(keys, "alice")
    lost = keytool.active_keys(keytool.DeviceRegistry.load(keys / keytool.REGISTRY_FILE), "pump-03")[0]
    keytool.revoke_device_key(keys, "pump-03", lost)  # a lost device: no login any more
    nats_dir = tmp_path / "nats"
    nats_dir.mkdir()
    out = nats_dir / "fledger-auth.conf"
    result = run_cli("--dir", str(keys), "nats-config", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert out.stat().st_mode & 0o777 == 0o600
    users = users_in(out)
    assert set(users) == {"coordinator", "monitor", "operator", "owner", "pump-01", "pump-02", "alice"}
    for user, entry in users.items():
        assert entry["allowed_connection_types"] == ["MQTT"]
        password = (keys / "broker" / f"{user}.password").read_text().strip()
        digest = str(entry["password"])
        assert re.match(r"^\$2b\$04\$", digest) and password not in out.read_text()
        assert BcryptHasher().verify(password, digest)
    perms = {user: entry["permissions"] for user, entry in users.items()}
    assert perms["pump-01"]["publish"]["allow"] == [  # type: ignore[index]
        "fledger.*.update.pump-01", "fledger.*.register.pump-01", "fledger.*.presence.pump-01",
        "fledger.*.catchup.pump-01"]
    assert "fledger.*.predict.alice.request" in perms["alice"]["publish"]["allow"]  # type: ignore[index]
    assert "fledger.*.predict.alice.reply" in perms["alice"]["subscribe"]["allow"]  # type: ignore[index]
    assert not any("predict" in s for s in perms["pump-01"]["publish"]["allow"])  # type: ignore[index]
    # The shipped node config with this file is a valid nats-server configuration.
    nats_server = shutil.which("nats-server") or "/usr/sbin/nats-server"
    assert Path(nats_server).is_file(), "nats-server is not installed (scripts/setup.sh installs it)"
    shutil.copy(ROOT / "deploy" / "nats" / "nats-node.conf", nats_dir / "nats-node.conf")
    checked = subprocess.run([nats_server, "-t", "-c", str(nats_dir / "nats-node.conf")], capture_output=True,
                             text=True, timeout=30, cwd=nats_dir)
    assert checked.returncode == 0, checked.stderr + checked.stdout


def test_nats_config_refuses_an_acl_it_cannot_express(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keytool.init_fleet(keys, "plant7")
    acl = tmp_path / "custom.acl"
    acl.write_text("user coordinator\ntopic write fledger/+/model.v2/global\n")
    result = run_cli("--dir", str(keys), "nats-config", "--out", str(tmp_path / "auth.conf"), "--acl", str(acl))
    assert result.returncode == 2 and "model.v2" in result.stderr and "NATS cannot express" in result.stderr
    assert not (tmp_path / "auth.conf").exists()


def test_an_acl_user_without_a_password_file_gets_no_login_and_a_warning(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keytool.init_fleet(keys, "plant7")
    acl = tmp_path / "custom.acl"
    acl.write_text((ROOT / "fledger" / "fledger.acl").read_text() + "\nuser monitor2\ntopic read fledger/+/ledger/#\n")
    result = run_cli("--dir", str(keys), "nats-config", "--out", str(tmp_path / "auth.conf"), "--acl", str(acl))
    assert result.returncode == 0, result.stderr
    assert "monitor2" in result.stderr and "no NATS login" in result.stderr
    assert "monitor2" not in users_in(tmp_path / "auth.conf")


def test_regenerating_changes_only_what_changed(tmp_path: Path) -> None:
    """A config-management run that regenerates the file after every change: users whose password
    is unchanged keep their hash (bcrypt salts are random), a changed password gets a new one, a
    new device is added, and a revoked one disappears."""
    keys = tmp_path / "keys"
    keytool.init_fleet(keys, "plant7")
    keytool.add_devices(keys, ["pump-01", "pump-02"])
    out = tmp_path / "fledger-auth.conf"
    assert run_cli("--dir", str(keys), "nats-config", "--out", str(out)).returncode == 0
    first = users_in(out)
    (keys / "broker" / "monitor.password").write_text("a-new-monitor-password\n")
    keytool.add_devices(keys, ["pump-03"])
    gone = keytool.active_keys(keytool.DeviceRegistry.load(keys / keytool.REGISTRY_FILE), "pump-02")[0]
    keytool.revoke_device_key(keys, "pump-02", gone)
    assert run_cli("--dir", str(keys), "nats-config", "--out", str(out)).returncode == 0
    second = users_in(out)
    assert set(second) == set(first) - {"pump-02"} | {"pump-03"}
    for user in ("coordinator", "operator", "owner", "pump-01"):
        assert second[user] == first[user], user
    assert second["monitor"]["password"] != first["monitor"]["password"]
    assert BcryptHasher().verify("a-new-monitor-password", str(second["monitor"]["password"]))
