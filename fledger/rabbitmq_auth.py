"""RabbitMQ definitions for a fleet: the roles of ``fledger.acl`` as RabbitMQ users and permissions.

RabbitMQ (3.10, MQTT plugin) has no acl_file. An MQTT topic ``a/b/c`` is the routing key
``a.b.c`` on the ``amq.topic`` exchange, and each user may carry one *topic permission* on that
exchange: a WRITE regex matched against every routing key it publishes, and a READ regex matched
against the **filter** of every subscription, once, when it subscribes, in AMQP form (``+`` ->
``*``, ``#`` stays ``#``). A denied publish or subscribe closes the client's connection. A user
with NO topic permission may use every topic, so every user here gets one, even one that matches
nothing (docs/deploy.md, "Logins and access control on RabbitMQ", records what was seen).

This module derives the definitions from the SAME file mosquitto and the embedded broker enforce
(``fledger/fledger.acl``), as :mod:`fledger.nats_auth` does for NATS:

- every rule of a user (its ``user`` block, and every ``pattern`` line with ``%u`` = its name;
  :meth:`Acl.rules_for`) becomes one alternative of an anchored regex: ``write`` rules of the
  WRITE regex, ``read`` rules of the READ regex;
- WRITE (a concrete routing key): a level is itself, ``+`` is ``[^.]*`` (one level, as MQTT's
  ``+``), a last ``#`` is ``(\\..*)?`` (the parent level and everything below, as MQTT's ``#``);
- READ (a subscription's filter): a level is itself, ``+`` is ``[^.#]*``: one level written out,
  or the subscriber's own ``*``, but never its ``#``, which in AMQP spans any number of levels;
  a last ``#`` is ``(\\..*)?``: any filter below, wildcards included;
- a wildcard in the first level does not match a topic starting with ``$`` (MQTT 4.7.2);
- ``deny`` rules are refused: a READ regex sees the filter, not each message, so it cannot take
  one topic out of a wildcard subscription the way mosquitto does;
- user names are written literally (escaped), not as RabbitMQ's ``{username}``.

Users: as for NATS (:func:`fledger.broker_logins.fleet_logins`). Passwords are stored as RabbitMQ
stores them, ``rabbit_password_hashing_sha256``: base64(salt + sha256(salt + password)) with a
4-byte random salt, so the file holds no password (it is still 0600: the hash lets anyone who
reads it try guesses offline; the generated passwords are 192-bit random tokens). A device or
client whose keys are all revoked keeps a user with an EMPTY hash, which RabbitMQ never accepts:
importing the definitions (which adds and updates, never deletes) then locks it out.

Resource permissions (vhost ``/``): configure the client's session queues, write and read those
and ``amq.topic`` (what the MQTT plugin needs, no more; it cannot name the client's OWN queue,
hence: no AMQP listener, docs/deploy.md).

Pure functions except :func:`write_definitions`, which reads the keys directory and the previous
file and writes the new one.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from federation.durable import atomic_write
from fledger.acl import READ, WRITE, Acl
from fledger.broker_logins import BrokerConfigError, FleetLogins, filter_levels, fleet_logins

EXCHANGE = "amq.topic"  # the MQTT plugin's default exchange (mqtt.exchange)
VHOST = "/"  # the MQTT plugin's default vhost (mqtt.vhost)
HASHING_ALGORITHM = "rabbit_password_hashing_sha256"
NOTHING = "(?!)"  # a regex that matches no routing key (an EMPTY regex would match every one)
SESSION_QUEUES = "^mqtt-subscription-.*"  # the MQTT plugin's queues: mqtt-subscription-<client id>qos[01]
RESOURCE_PERMISSIONS = {
    "configure": SESSION_QUEUES,
    "write": r"^(amq\.topic|mqtt-subscription-.*)$",
    "read": r"^(amq\.topic|mqtt-subscription-.*)$",
}
GENERATED = ("users", "permissions", "topic_permissions")  # the parts of the definitions made here


class RabbitmqConfigError(BrokerConfigError):
    """The ACL or the fleet holds something RabbitMQ topic permissions cannot express."""


def _literal(level: str) -> str:
    """``level`` as a regex that matches only itself (PCRE: a backslash before any ASCII
    punctuation makes it literal)."""
    out = []
    for ch in level:
        if ch.isascii() and (ch.isalnum() or ch == "_"):
            out.append(ch)
        elif ch.isascii():
            out.append("\\" + ch)
        else:
            out.append(f"\\x{{{ord(ch):x}}}")
    return "".join(out)


def filter_to_regex(topic_filter: str, access: str) -> str:
    """The (unanchored) regex over RabbitMQ routing keys for an ACL filter: for ``write`` the
    published routing keys it covers, for ``read`` the subscription filters (AMQP form) that
    receive nothing outside it. See the module docstring."""
    levels = filter_levels(topic_filter, ".*", "RabbitMQ",
                           "'.' or '*' (RabbitMQ maps MQTT's '/' to '.' and '+' to '*')", RabbitmqConfigError)
    one_level = "[^.]*" if access == WRITE else "[^.#]*"
    parts = [one_level if level == "+" else _literal(level) for level in levels if level != "#"]
    regex = r"\.".join(parts)
    if levels[-1] == "#":
        regex = f"{regex}(\\..*)?" if parts else ".*"
    if levels[0] in ("+", "#"):
        regex = r"(?!\$)" + regex  # MQTT: a first-level wildcard does not match `$SYS/...`
    return regex


def topic_permission_for(acl: Acl, user: str) -> dict[str, str]:
    """``user``'s topic permission on ``amq.topic``: anchored WRITE and READ regexes, one
    alternative per rule, each matching nothing when no rule allows anything."""
    alternatives: dict[str, list[str]] = {WRITE: [], READ: []}
    for rule in acl.rules_for(user):
        if rule.deny:
            raise RabbitmqConfigError(f"ACL `deny {rule.topic}` for {user}: RabbitMQ checks a subscription's filter, "
                                      "not each message, so it cannot deny one topic inside a wildcard")
        for access in (WRITE, READ):
            regex = filter_to_regex(rule.topic, access)
            if access in rule.access and regex not in alternatives[access]:
                alternatives[access].append(regex)
    anchored = {access: f"^({'|'.join(found)})$" if found else NOTHING for access, found in alternatives.items()}
    return {"user": user, "vhost": VHOST, "exchange": EXCHANGE, "write": anchored[WRITE], "read": anchored[READ]}


def hash_password(password: str, salt: bytes | None = None) -> str:
    """RabbitMQ's ``rabbit_password_hashing_sha256``: base64(salt + sha256(salt + password))."""
    salt = os.urandom(4) if salt is None else salt
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


def hash_matches(password: str, password_hash: str) -> bool:
    try:
        raw = base64.b64decode(password_hash, validate=True)
    except ValueError:
        return False
    return len(raw) == 36 and hmac.compare_digest(hash_password(password, raw[:4]), password_hash)


def definitions(acl: Acl, hashes: dict[str, str], locked: Sequence[str] = (), *,
                base: dict[str, Any] | None = None) -> dict[str, Any]:
    """The definitions: ``base`` (vhosts, policies, other users...) with its users, permissions and
    topic permissions of the fleet's users replaced by ours. ``hashes``: user -> password hash;
    ``locked``: users that get an empty hash (no login) and no permissions."""
    ours = set(hashes) | set(locked)
    result: dict[str, Any] = {key: value for key, value in (base or {}).items() if key not in GENERATED}
    kept = {key: [entry for entry in (base or {}).get(key, [])
                  if entry.get("name" if key == "users" else "user") not in ours] for key in GENERATED}
    if not any(vhost.get("name") == VHOST for vhost in result.get("vhosts", [])):
        result["vhosts"] = [*result.get("vhosts", []), {"name": VHOST}]
    result["users"] = kept["users"] + [
        {"name": user, "password_hash": hashes.get(user, ""), "hashing_algorithm": HASHING_ALGORITHM, "tags": []}
        for user in sorted(ours)]
    result["permissions"] = kept["permissions"] + [{"user": user, "vhost": VHOST, **RESOURCE_PERMISSIONS}
                                                   for user in sorted(hashes)]
    result["topic_permissions"] = kept["topic_permissions"] + [topic_permission_for(acl, user)
                                                               for user in sorted(hashes)]
    return result


def write_definitions(directory: Path, out: Path, *, acl_path: Path | None = None,
                      base_path: Path | None = None) -> FleetLogins:
    """Write ``out`` (0600) for the fleet whose keys are in ``directory``, merged into ``base_path``
    (default: ``out`` as it is, if it exists). A hash in the previous ``out`` that still matches
    its user's password is kept, so a regenerated file changes only where something changed.
    Returns the fleet's logins (who got one, who was skipped for lack of a password file, who was
    locked out)."""
    logins = fleet_logins(directory, acl_path, broker=RabbitmqConfigError)
    previous = _read(out) if Path(out).exists() else {}
    base = _read(base_path) if base_path is not None else previous
    old = {str(u.get("name")): str(u.get("password_hash", "")) for u in previous.get("users", [])}
    hashes = {user: old[user] if user in old and hash_matches(password, old[user]) else hash_password(password)
              for user, password in logins.passwords.items()}
    result = definitions(logins.acl, hashes, logins.revoked, base=base)
    atomic_write(Path(out), (json.dumps(result, indent=2) + "\n").encode(), mode=0o600)
    return logins


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise RabbitmqConfigError(f"{path}: not a RabbitMQ definitions file ({exc})") from None
    if not isinstance(data, dict):
        raise RabbitmqConfigError(f"{path}: not a RabbitMQ definitions file (a JSON object expected)")
    return data


__all__ = [
    "EXCHANGE",
    "HASHING_ALGORITHM",
    "NOTHING",
    "RESOURCE_PERMISSIONS",
    "VHOST",
    "RabbitmqConfigError",
    "definitions",
    "filter_to_regex",
    "hash_matches",
    "hash_password",
    "topic_permission_for",
    "write_definitions",
]
