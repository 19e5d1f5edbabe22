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
from test_broker_security import make_pki

from fledger import keytool
from fledger.nats_auth import (
    ROUTE_SECRET_FILE,
    ROUTE_USER,
    NatsConfigError,
    filter_to_subjects,
    parse_routes,
    read_route_hash,
    render_routes,
    route_hash_in,
    route_secret,
    write_routes_config,
)

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


def fleet_with_a_lost_device(keys: Path) -> Path:
    """Fleet plant7's keys: devices pump-01..03 with pump-03's key revoked (a lost device: no
    login any more), and the prediction client alice."""
    keytool.init_fleet(keys, "plant7")
    keytool.add_devices(keys, ["pump-01", "pump-02", "pump-03"])
    keytool.add_client(keys, "alice")
    lost = keytool.active_keys(keytool.DeviceRegistry.load(keys / keytool.REGISTRY_FILE), "pump-03")[0]
    keytool.revoke_device_key(keys, "pump-03", lost)
    return keys


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fledger.cli", "keys", *args], capture_output=True, text=True,
                          timeout=60)


def test_nats_config_has_a_login_per_role_device_and_client_and_nats_server_accepts_it(tmp_path: Path) -> None:
    keys = fleet_with_a_lost_device(tmp_path / "keys")
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
    # The shipped node config with this file (and the routes file) is a valid nats-server configuration.
    shutil.copy(ROOT / "deploy" / "nats" / "nats-node.conf", nats_dir / "nats-node.conf")
    result = run_cli("--dir", str(keys), "nats-config", "--out", str(out), "--routes", "nats-1:6222,nats-2:6222")
    assert result.returncode == 0, result.stderr
    checked = nats_server_test(nats_dir / "nats-node.conf")
    assert checked.returncode == 0, checked.stderr + checked.stdout


def nats_server_test(config: Path) -> subprocess.CompletedProcess[str]:
    """`nats-server -t -c config`: the configuration is valid (returncode 0)."""
    nats_server = shutil.which("nats-server") or "/usr/sbin/nats-server"
    assert Path(nats_server).is_file(), "nats-server is not installed (scripts/setup.sh installs it)"
    return subprocess.run([nats_server, "-t", "-c", str(config)], capture_output=True, text=True, timeout=30,
                          cwd=config.parent)


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


# -- routes between nodes (`--routes`); a real cluster with them: tests/test_nats_routes.py ----------

def test_the_routes_file_authenticates_routes_and_dials_every_node_with_the_password() -> None:
    password = "Rz0-8_secret-route-password-xyz"
    digest = BcryptHasher(rounds=4).hash(password)
    text = render_routes(parse_routes("nats-1.plant7.example:6222, 10.0.0.2:6222,[fd00::3]:7222"), password, digest)
    body = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    assert body == [
        "authorization {", f'user: "{ROUTE_USER}"', f'password: "{digest}"', "}",
        "routes: [",
        f'"nats-route://{ROUTE_USER}:{password}@nats-1.plant7.example:6222"',
        f'"nats-route://{ROUTE_USER}:{password}@10.0.0.2:6222"',
        f'"nats-route://{ROUTE_USER}:{password}@[fd00::3]:7222"',
        "]",
    ]
    assert route_hash_in(text) == digest and BcryptHasher().verify(password, digest)


@pytest.mark.parametrize("bad", ["", "nats-1", "nats-1:0", "nats-1:70000", "nats-1:x", "nats_1:6222", "a b:6222",
                                 "u:p@nats-1:6222", "[zz::1]:6222", "nats-1:6222,NATS-1:6222"])
def test_routes_that_are_not_host_port_are_refused(bad: str) -> None:
    with pytest.raises(NatsConfigError):
        parse_routes(bad)


def test_the_route_secret_is_made_once_and_the_file_is_a_secret(tmp_path: Path) -> None:
    keys, out = tmp_path / "keys", tmp_path / "fledger-routes.conf"
    write_routes_config(keys, ["nats-1:6222", "nats-2:6222"], out)
    password = route_secret(keys)
    assert (keys / ROUTE_SECRET_FILE).stat().st_mode & 0o777 == 0o600
    assert out.stat().st_mode & 0o777 == 0o600
    digest = read_route_hash(out)
    assert digest is not None and digest.startswith("$2b$04$") and BcryptHasher().verify(password, digest)
    assert f"nats-route://{ROUTE_USER}:{password}@nats-2:6222" in out.read_text()


def test_regenerating_keeps_the_route_secret_so_every_node_agrees(tmp_path: Path) -> None:
    """`nats-config --routes` run again (on another machine with a copy of the keys, or after a
    change): the same password and hash, byte for byte the same file; a new node in --routes
    gets the same password; a routes file written elsewhere from the same keys is identical."""
    keys = tmp_path / "keys"
    keytool.init_fleet(keys, "plant7")
    out = tmp_path / "fledger-auth.conf"
    routes = tmp_path / "fledger-routes.conf"
    result = run_cli("--dir", str(keys), "nats-config", "--out", str(out), "--routes", "nats-1:6222,nats-2:6222")
    assert result.returncode == 0, result.stderr
    assert str(routes) in result.stdout
    first, secret = routes.read_text(), (keys / ROUTE_SECRET_FILE).read_text()
    assert run_cli("--dir", str(keys), "nats-config", "--out", str(out),
                   "--routes", "nats-1:6222,nats-2:6222").returncode == 0
    assert routes.read_text() == first and (keys / ROUTE_SECRET_FILE).read_text() == secret
    bigger = tmp_path / "bigger.conf"
    assert run_cli("--dir", str(keys), "nats-config", "--out", str(out), "--routes-out", str(bigger),
                   "--routes", "nats-1:6222,nats-2:6222,nats-3:6222").returncode == 0
    password = route_secret(keys)
    assert f"nats-route://{ROUTE_USER}:{password}@nats-3:6222" in bigger.read_text()
    assert BcryptHasher().verify(password, str(read_route_hash(bigger)))
    # Bad input: a clear error, nothing written.
    refused = run_cli("--dir", str(keys), "nats-config", "--out", str(tmp_path / "x.conf"), "--routes", "nats-1")
    assert refused.returncode == 2 and "host:port" in refused.stderr and not (tmp_path / "x.conf").exists()
    alone = run_cli("--dir", str(keys), "nats-config", "--out", str(out), "--routes-out", str(bigger))
    assert alone.returncode == 2 and "--routes" in alone.stderr


def test_route_tls_options_write_the_tls_block_and_need_all_three_and_routes(tmp_path: Path) -> None:
    """`--route-tls-cert/-key/-ca` put the cluster's mutual TLS into the routes file (which nats-server
    accepts); one or two of them, or any without --routes, is a clear usage error and writes nothing."""
    keys = tmp_path / "keys"
    keytool.init_fleet(keys, "plant7")
    out, routes = tmp_path / "fledger-auth.conf", tmp_path / "fledger-routes.conf"
    tls = ("--route-tls-cert", "/etc/nats/route.crt", "--route-tls-key", "/etc/nats/route.key",
           "--route-tls-ca", "/etc/nats/fleet-ca.crt")
    result = run_cli("--dir", str(keys), "nats-config", "--out", str(out), "--routes", "nats-1:6222,nats-2:6222", *tls)
    assert result.returncode == 0, result.stderr
    assert "over mutual TLS" in result.stdout
    text = routes.read_text()
    body = [line.strip() for line in text[text.index("tls {"):].splitlines()]
    assert body[:7] == ["tls {", 'cert_file: "/etc/nats/route.crt"', 'key_file: "/etc/nats/route.key"',
                        'ca_file: "/etc/nats/fleet-ca.crt"', "verify: true", "timeout: 5", "}"]
    assert route_hash_in(text) is not None  # the password stays: TLS and the route user, both
    for partial in (tls[:2], tls[:4], tls[2:]):
        refused = run_cli("--dir", str(keys), "nats-config", "--out", str(tmp_path / "x.conf"),
                          "--routes", "nats-1:6222", "--routes-out", str(tmp_path / "x-routes.conf"), *partial)
        assert refused.returncode == 2 and "missing:" in refused.stderr, refused.stderr
        assert not (tmp_path / "x.conf").exists() and not (tmp_path / "x-routes.conf").exists()
    no_routes = run_cli("--dir", str(keys), "nats-config", "--out", str(tmp_path / "x.conf"), *tls)
    assert no_routes.returncode == 2 and "need --routes" in no_routes.stderr
    quoted = run_cli("--dir", str(keys), "nats-config", "--out", str(tmp_path / "x.conf"), "--routes", "nats-1:6222",
                     "--route-tls-cert", 'a"b', *tls[2:])
    assert quoted.returncode == 2 and "without quotes" in quoted.stderr
    # nats-server takes a node config with it (the files must exist for its config check)
    pki = make_pki(tmp_path / "pki")
    assert run_cli("--dir", str(keys), "nats-config", "--out", str(out), "--routes", "nats-1:6222,nats-2:6222",
                   "--route-tls-cert", str(pki / "server.crt"), "--route-tls-key", str(pki / "server.key"),
                   "--route-tls-ca", str(pki / "ca.crt")).returncode == 0
    shutil.copy(ROOT / "deploy" / "nats" / "nats-node.conf", tmp_path / "nats-node.conf")
    checked = nats_server_test(tmp_path / "nats-node.conf")
    assert checked.returncode == 0, checked.stderr + checked.stdout


def test_the_shipped_node_config_does_not_start_without_the_routes_file(tmp_path: Path) -> None:
    """deploy/nats/nats-node.conf never runs open routes: without fledger-routes.conf it is invalid."""
    keys = tmp_path / "keys"
    keytool.init_fleet(keys, "plant7")
    assert run_cli("--dir", str(keys), "nats-config", "--out", str(tmp_path / "fledger-auth.conf")).returncode == 0
    shutil.copy(ROOT / "deploy" / "nats" / "nats-node.conf", tmp_path / "nats-node.conf")
    checked = nats_server_test(tmp_path / "nats-node.conf")
    assert checked.returncode != 0 and "fledger-routes.conf" in checked.stderr + checked.stdout
