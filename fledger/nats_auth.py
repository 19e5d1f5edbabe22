"""The NATS ``authorization`` block for a fleet: the roles of ``fledger.acl``, as NATS permissions.

NATS (the broker docs/deploy.md recommends past one machine) has no acl_file: each user carries
its own ``publish``/``subscribe`` allow lists of NATS subjects. This module derives them from
the SAME file mosquitto and the embedded broker enforce (``fledger/fledger.acl``, parsed by
:mod:`fledger.acl`), so there is one source of truth for who may do what:

- every ``user`` block and every ``pattern`` line (``%u`` = the user name) of the ACL gives a
  user's rules (:meth:`Acl.rules_for`); ``write`` rules become publish permissions, ``read``
  rules subscribe permissions, ``deny`` rules both kinds of deny;
- an MQTT filter becomes NATS subjects as nats-server maps MQTT topics: ``/`` -> ``.``,
  ``+`` -> ``*``, and ``a/#`` -> ``a`` AND ``a.>`` (MQTT's ``#`` also matches the parent level,
  NATS's ``>`` does not);
- every user may also subscribe to ``$MQTT.sub.>``: nats-server 2.9 (tested: 2.9.10) delivers QoS 1 messages
  through an internal subscription on ``$MQTT.sub.<id>`` that is checked against the user's
  permissions (without it every QoS 1 SUBSCRIBE fails). An MQTT client cannot subscribe to
  ``$MQTT/...`` topics itself (refused, tested); newer releases (nats-server PR 7637) allow it
  implicitly;
- every user may connect over MQTT only (``allowed_connection_types``), never as a NATS core
  client (which could call the JetStream API on the account that holds the MQTT state).

Users: the ACL's ``user`` blocks (coordinator, monitor, operator, owner, and any monitor you
added), every device with an active key in devices.json (user name = device id), and every
prediction client with an active key in clients.json (its two lines: :func:`client_acl_text`).
Passwords: the fleet's ``broker/<user>.password`` files (`fledger keys init`/`add-device`/
`add-client` write them), hashed with bcrypt (pwdlib's BcryptHasher, the ``bcrypt`` package),
the hash form nats-server accepts in its config. A user without a password file gets no login.

Pure functions except :func:`build_from_keys`, which reads the key directory.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from fledger.acl import READ, WRITE, Acl, client_acl_text, with_clients

# nats-server 2.9 (2.9.10 here): QoS 1 deliveries go through an internal subscription on $MQTT.sub.<id>,
# checked against the user's subscribe permissions (nats-server PR 7637 made it implicit later).
MQTT_INTERNAL_SUBSCRIBE = "$MQTT.sub.>"

# bcrypt cost of the tool's own passwords: 192-bit random tokens (`fledger keys`), which no
# stretching makes harder to guess; nats-server checks the hash at every connection, and a
# fleet of devices reconnecting after a broker restart would otherwise cost ~60 ms of CPU each
# (cost 10). The cost travels in each hash; raise it with --bcrypt-cost for chosen passwords.
GENERATED_BCRYPT_ROUNDS = 4


class NatsConfigError(ValueError):
    """The ACL or the fleet holds something NATS permissions cannot express."""


def filter_to_subjects(topic_filter: str) -> list[str]:
    """The NATS subjects that cover exactly the MQTT topics ``topic_filter`` matches."""
    if not topic_filter or any(c in topic_filter for c in ". \t*>"):
        raise NatsConfigError(f"ACL filter {topic_filter!r}: NATS cannot express a topic with '.', a space, "
                              "'*' or '>' (nats-server refuses or rewrites such MQTT topics)")
    levels = topic_filter.split("/")
    if "" in levels:
        raise NatsConfigError(f"ACL filter {topic_filter!r}: empty topic levels are not supported here")
    if "#" in levels[:-1]:
        raise NatsConfigError(f"ACL filter {topic_filter!r}: '#' must be the last level")
    subject = ".".join("*" if level == "+" else ">" if level == "#" else level for level in levels)
    if levels[-1] == "#" and len(levels) > 1:
        return [subject[: -len(".>")], subject]  # MQTT `a/#` matches `a` too
    return [subject]


@dataclass
class Permissions:
    publish_allow: list[str] = field(default_factory=list)
    publish_deny: list[str] = field(default_factory=list)
    subscribe_allow: list[str] = field(default_factory=list)
    subscribe_deny: list[str] = field(default_factory=list)

    def to_config(self) -> dict[str, dict[str, list[str]]]:
        """NATS's permission map. An empty allow list still denies everything (NATS treats
        a present but empty ``allow`` as "nothing")."""
        publish: dict[str, list[str]] = {"allow": self.publish_allow}
        subscribe: dict[str, list[str]] = {"allow": self.subscribe_allow}
        if self.publish_deny:
            publish["deny"] = self.publish_deny
        if self.subscribe_deny:
            subscribe["deny"] = self.subscribe_deny
        return {"publish": publish, "subscribe": subscribe}


def _add(target: list[str], subjects: Iterable[str]) -> None:
    target.extend(s for s in subjects if s not in target)


def permissions_for(acl: Acl, user: str) -> Permissions:
    """``user``'s rules in ``acl`` as NATS permissions (see the module docstring)."""
    perms = Permissions()
    for rule in acl.rules_for(user):
        subjects = filter_to_subjects(rule.topic)
        if rule.deny:
            _add(perms.publish_deny, subjects)
            _add(perms.subscribe_deny, subjects)
            continue
        if WRITE in rule.access:
            _add(perms.publish_allow, subjects)
        if READ in rule.access:
            _add(perms.subscribe_allow, subjects)
    _add(perms.subscribe_allow, [MQTT_INTERNAL_SUBSCRIBE])
    return perms


def hash_password(password: str, rounds: int = GENERATED_BCRYPT_ROUNDS) -> str:
    """A bcrypt hash (``$2b$...``) as nats-server checks it (library: pwdlib + bcrypt)."""
    from pwdlib.hashers.bcrypt import BcryptHasher

    return BcryptHasher(rounds=rounds).hash(password)


def read_hashes(path: Path) -> dict[str, str]:
    """user -> bcrypt hash in a file :func:`render` wrote (empty if there is none)."""
    if not Path(path).exists():
        return {}
    hashes: dict[str, str] = {}
    for line in Path(path).read_text().splitlines():
        if line.strip().startswith('{"user"'):
            entry = json.loads(line)
            hashes[str(entry["user"])] = str(entry["password"])
    return hashes


def _current_hash(password: str, previous: str | None, rounds: int) -> str:
    """``previous`` if it is a hash of ``password`` at this cost (so a regenerated file changes only
    where something changed), else a new hash."""
    from pwdlib.hashers.bcrypt import BcryptHasher

    if previous is not None and previous.startswith(f"$2b${rounds:02d}$"):
        try:
            if BcryptHasher().verify(password, previous):
                return previous
        except ValueError:
            pass
    return hash_password(password, rounds)


def render(acl: Acl, hashes: dict[str, str], *, source: str = "") -> str:
    """The ``authorization { users: [...] }`` block (NATS config syntax; JSON values, so every
    name and hash is quoted as NATS expects). ``hashes``: user -> bcrypt hash."""
    lines = [
        "# GENERATED by `fledger keys nats-config`: do not edit; regenerate after every change to the",
        "# ACL, the devices or the clients, then `nats-server --signal reload` on every node.",
        f"# From: {source or 'fledger.acl'}. {len(hashes)} users, MQTT connections only.",
        "authorization {",
        "  users: [",
    ]
    for user in sorted(hashes):
        entry = {
            "user": user,
            "password": hashes[user],
            "allowed_connection_types": ["MQTT"],
            "permissions": permissions_for(acl, user).to_config(),
        }
        lines.append(f"    {json.dumps(entry, sort_keys=False)}")
    lines += ["  ]", "}", ""]
    return "\n".join(lines)


@dataclass
class FleetUsers:
    hashes: dict[str, str]
    acl: Acl
    skipped: list[str]  # users the ACL or registry names but with no password file here


def build_from_keys(directory: Path, acl_path: Path | None = None, *,
                    rounds: int = GENERATED_BCRYPT_ROUNDS, previous: dict[str, str] | None = None) -> FleetUsers:
    """The users, their hashes and the ACL (plus one block per prediction client) of the fleet
    whose keys are in ``directory``. A hash in ``previous`` (the file written last time) that
    still matches the user's password is kept."""
    from federation.keys import DeviceRegistry
    from federation.topics import check_name
    from fledger import keytool
    from fledger.acl import default_acl_text

    directory = Path(directory)
    text = Path(acl_path).read_text() if acl_path is not None else default_acl_text()
    registry = DeviceRegistry.load(directory / keytool.REGISTRY_FILE)
    clients = DeviceRegistry.load(directory / keytool.CLIENTS_FILE)
    devices = [d for d in registry.devices if keytool.active_keys(registry, d)]
    client_names = [c for c in clients.devices if keytool.active_keys(clients, c)]
    base = Acl.parse(text, str(acl_path or "fledger.acl"))
    clash = (set(devices) | set(client_names)) & set(base.users)
    if clash:
        raise NatsConfigError(f"{', '.join(sorted(clash))}: a device or client with the name of an ACL user block "
                              "would get that role's rights")
    acl = Acl.parse(with_clients(text, client_names), str(acl_path or "fledger.acl"))
    hashes: dict[str, str] = {}
    skipped: list[str] = []
    for user in sorted({*base.users, *devices, *client_names}):
        check_name("broker user", user)
        password_file = directory / keytool.BROKER_DIR / f"{user}.password"
        if not password_file.exists():
            skipped.append(user)
            continue
        hashes[user] = _current_hash(keytool.read_password_file(password_file), (previous or {}).get(user), rounds)
    return FleetUsers(hashes, acl, skipped)


__all__ = [
    "MQTT_INTERNAL_SUBSCRIBE",
    "FleetUsers",
    "NatsConfigError",
    "Permissions",
    "build_from_keys",
    "client_acl_text",
    "filter_to_subjects",
    "hash_password",
    "permissions_for",
    "read_hashes",
    "render",
]
