"""`fledger keys rabbitmq-definitions`: RabbitMQ users and permissions generated from fledger.acl.

What a real RabbitMQ node then enforces is tested in tests/test_broker_security.py
(test_rabbitmq_enforces_the_same_roles_as_mosquitto); here: who gets a login, the password
hashes, the translation of MQTT filters into regexes over routing keys (checked with Python's
`re`, which agrees with PCRE on these constructs), and the merge with deploy/rabbitmq's file.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from fledger import keytool
from fledger.acl import Acl
from fledger.rabbitmq_auth import (
    NOTHING,
    RabbitmqConfigError,
    filter_to_regex,
    hash_matches,
    hash_password,
    topic_permission_for,
)
from tests.test_nats_auth import fleet_with_a_lost_device, run_cli

ROOT = Path(__file__).resolve().parent.parent
ROLES = ("coordinator", "monitor", "operator", "owner", "pump-01", "pump-02")
TOPICS = [  # concrete topics, as published
    "fledger/plant7/model/global", "fledger/plant7/model/global/chunk/0", "fledger/plant7/status",
    "fledger/plant7/status/chunk/3", "fledger/plant7/ledger/blocks", "fledger/plant7/ledger/head",
    "fledger/plant7/ledger/head/chunk/0", "fledger/plant7/ledger/checkpoint", "fledger/plant7/ledger/replay/monitor",
    "fledger/plant7/ledger/replay/pump-01", "fledger/plant7/update/pump-01", "fledger/plant7/update/pump-02",
    "fledger/plant7/update/pump-01/x", "fledger/plant7/register/pump-01", "fledger/plant7/presence/pump-02",
    "fledger/plant7/ack/pump-01", "fledger/plant7/ack/pump-02", "fledger/other/model/global", "fledger/plant7/junk",
    "outside/topic", "fledger/plant7/catchup/pump-01", "fledger/plant7/catchup/pump-01/model",
    "fledger/plant7/catchup/pump-01/status", "fledger/plant7/catchup/monitor/head", "fledger/plant7/credits/order",
    "fledger/plant7/credits/reply", "fledger/plant7/predict/alice/request", "fledger/plant7/predict/alice/reply",
    "fledger//update/pump-01", "$SYS/broker/uptime",
]
# Subscription filters: every topic above, and wildcards a client may try.
FILTERS = [*TOPICS, "#", "fledger/#", "fledger/+/#", "fledger/plant7/#", "fledger/+/model/global/#",
           "fledger/+/model/global/chunk/+", "fledger/plant7/ack/+", "fledger/plant7/ack/#",
           "fledger/plant7/ledger/#", "fledger/plant7/status/#", "fledger/+/update/+", "fledger/+/update/#",
           "fledger/plant7/catchup/pump-01/+", "fledger/plant7/catchup/pump-01/#", "+/plant7/model/global",
           "fledger/+/+/global", "fledger/plant7/ledger/replay/+"]


def routing_key(mqtt: str) -> str:
    """What RabbitMQ's MQTT plugin checks: `/` -> `.`, and in a filter `+` -> `*` (`#` stays)."""
    return mqtt.replace("/", ".").replace("+", "*")


def covered(topic_filter: str) -> list[str]:
    from fledger.acl import topic_matches

    return [t for t in TOPICS if topic_matches(topic_filter, t)]


@pytest.fixture(scope="module")
def acl() -> Acl:
    from fledger.acl import client_acl_text, default_acl_text

    return Acl.parse(default_acl_text() + client_acl_text("alice"))


@pytest.mark.parametrize("user", [*ROLES, "alice"])
def test_the_write_regex_allows_exactly_the_topics_the_acl_lets_the_user_publish(acl: Acl, user: str) -> None:
    regex = topic_permission_for(acl, user)["write"]
    for topic in TOPICS:
        assert bool(re.search(regex, routing_key(topic))) == acl.allows(user, topic, "write"), (user, topic, regex)


@pytest.mark.parametrize("user", [*ROLES, "alice"])
def test_the_read_regex_admits_a_subscription_only_if_the_acl_lets_the_user_read_all_it_covers(
        acl: Acl, user: str) -> None:
    """RabbitMQ checks READ once, against the subscription's filter: an admitted filter must never
    deliver a topic the ACL keeps from the user, and every exact topic it may read is admitted."""
    regex = topic_permission_for(acl, user)["read"]
    for topic_filter in FILTERS:
        admitted = bool(re.search(regex, routing_key(topic_filter)))
        if admitted:
            assert all(acl.allows(user, t, "read") for t in covered(topic_filter)), (user, topic_filter, regex)
        if "+" not in topic_filter and "#" not in topic_filter:
            assert admitted == acl.allows(user, topic_filter, "read"), (user, topic_filter, regex)
    # What fledger's own clients subscribe to is admitted (a refusal would close their connection).
    own = {"pump-01": ["fledger/plant7/model/global", "fledger/plant7/model/global/chunk/+",
                       "fledger/plant7/ack/pump-01"],
           "coordinator": ["fledger/plant7/update/+", "fledger/plant7/presence/+", "fledger/plant7/catchup/+"],
           "monitor": ["fledger/plant7/ledger/blocks", "fledger/plant7/ledger/head/chunk/+"]}
    for topic_filter in own.get(user, []):
        assert re.search(regex, routing_key(topic_filter)), (user, topic_filter)


@pytest.mark.parametrize(("mqtt", "access", "regex"), [
    ("fledger/+/update/pump-01", "write", r"fledger\.[^.]*\.update\.pump\-01"),
    ("fledger/+/model/global/#", "write", r"fledger\.[^.]*\.model\.global(\..*)?"),
    ("fledger/+/ack/+", "read", r"fledger\.[^.#]*\.ack\.[^.#]*"),  # never the subscriber's `#` at a `+`
    ("#", "read", r"(?!\$).*"),
    ("+/x", "write", r"(?!\$)[^.]*\.x"),
])
def test_mqtt_filters_become_regexes_over_routing_keys(mqtt: str, access: str, regex: str) -> None:
    assert filter_to_regex(mqtt, access) == regex


@pytest.mark.parametrize("bad", ["fledger/a.b/x", "fledger/*/x", "a//b", "a/#/b", ""])
def test_filters_rabbitmq_cannot_express_are_refused(bad: str) -> None:
    with pytest.raises(RabbitmqConfigError):
        filter_to_regex(bad, "write")


def test_deny_rules_are_refused_and_a_user_without_rules_may_use_no_topic() -> None:
    with pytest.raises(RabbitmqConfigError, match="deny"):
        topic_permission_for(Acl.parse("user x\ntopic read a/#\ntopic deny a/b\n"), "x")
    # A user with no topic permission at all may use EVERY topic on RabbitMQ: give it one that matches nothing.
    nothing = topic_permission_for(Acl.parse("user x\n"), "x")
    assert nothing["write"] == nothing["read"] == NOTHING
    assert not any(re.search(NOTHING, routing_key(t)) for t in FILTERS)


def test_passwords_are_stored_as_rabbitmqs_salted_sha256() -> None:
    digest = hash_password("s3cret")
    # RabbitMQ's documented example (docs: "Credentials and Passwords", hash of "test12").
    assert hash_password("test12", bytes.fromhex("908dc60a")) == "kI3GCqW5JLMJa4iX1lo7X4D6XbYqlLgxIs30+P6tENUV2POR"
    assert hash_matches("s3cret", digest) and not hash_matches("other", digest) and not hash_matches("s3cret", "")
    assert hash_password("s3cret") != hash_password("s3cret")  # a random salt each time


def test_definitions_have_a_login_per_role_device_and_client_merged_into_the_shipped_file(tmp_path: Path) -> None:
    keys = fleet_with_a_lost_device(tmp_path / "keys")  # pump-03's key revoked: locked out
    out = tmp_path / "definitions.json"
    shipped = ROOT / "deploy" / "rabbitmq" / "definitions.json"
    result = run_cli("--dir", str(keys), "rabbitmq-definitions", "--out", str(out), "--base", str(shipped))
    assert result.returncode == 0, result.stderr
    assert out.stat().st_mode & 0o777 == 0o600
    assert "locked out" in result.stdout and "pump-03" in result.stdout
    defs = json.loads(out.read_text())
    users = {u["name"]: u for u in defs["users"]}
    assert set(users) == {"coordinator", "monitor", "operator", "owner", "pump-01", "pump-02", "pump-03", "alice"}
    for user, entry in users.items():
        assert entry["hashing_algorithm"] == "rabbit_password_hashing_sha256" and entry["tags"] == []
        if user == "pump-03":
            assert entry["password_hash"] == ""  # RabbitMQ accepts no password for an empty hash
            continue
        password = (keys / "broker" / f"{user}.password").read_text().strip()
        assert hash_matches(password, entry["password_hash"]) and password not in out.read_text()
    with_permissions = {p["user"] for p in defs["permissions"]}
    with_topics = {p["user"] for p in defs["topic_permissions"]}
    assert with_permissions == with_topics == set(users) - {"pump-03"}
    assert all(p["exchange"] == "amq.topic" and p["vhost"] == "/" for p in defs["topic_permissions"])
    # The shipped vhost and mirroring policy are kept.
    base = json.loads(shipped.read_text())
    assert defs["policies"] == base["policies"] and defs["vhosts"] == base["vhosts"]


def test_regenerating_changes_only_what_changed_and_keeps_other_definitions(tmp_path: Path) -> None:
    """Regenerated in place (the file is its own base): unchanged passwords keep their hash, a
    changed one gets a new hash, a new device is added, a revoked one is locked, and what an
    administrator added to the file (another user, a policy) stays."""
    keys = tmp_path / "keys"
    keytool.init_fleet(keys, "plant7")
    keytool.add_devices(keys, ["pump-01", "pump-02"])
    out = tmp_path / "definitions.json"
    assert run_cli("--dir", str(keys), "rabbitmq-definitions", "--out", str(out),
                   "--base", str(ROOT / "deploy" / "rabbitmq" / "definitions.json")).returncode == 0
    first = json.loads(out.read_text())
    first["users"].append({"name": "admin", "password_hash": "x", "tags": ["administrator"]})
    out.write_text(json.dumps(first))
    (keys / "broker" / "monitor.password").write_text("a-new-monitor-password\n")
    keytool.add_devices(keys, ["pump-03"])
    gone = keytool.active_keys(keytool.DeviceRegistry.load(keys / keytool.REGISTRY_FILE), "pump-02")[0]
    keytool.revoke_device_key(keys, "pump-02", gone)
    assert run_cli("--dir", str(keys), "rabbitmq-definitions", "--out", str(out)).returncode == 0
    second = json.loads(out.read_text())
    before, after = ({u["name"]: u["password_hash"] for u in d["users"]} for d in (first, second))
    assert set(after) == set(before) | {"pump-03"}
    for user in ("coordinator", "operator", "owner", "pump-01", "admin"):
        assert after[user] == before[user], user
    assert after["pump-02"] == "" and hash_matches("a-new-monitor-password", after["monitor"])
    assert "pump-02" not in {p["user"] for p in second["topic_permissions"]}
    assert second["policies"] == first["policies"]
    # Bad input: a clear error, nothing written.
    acl = tmp_path / "custom.acl"
    acl.write_text("user coordinator\ntopic write fledger/+/model.v2/global\n")
    refused = run_cli("--dir", str(keys), "rabbitmq-definitions", "--out", str(tmp_path / "x.json"), "--acl", str(acl))
    assert refused.returncode == 2 and "model.v2" in refused.stderr and "RabbitMQ cannot express" in refused.stderr
    assert not (tmp_path / "x.json").exists()
