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

Routes between the nodes of a cluster (:func:`render_routes`): one route user whose password is
a random secret kept in the keys directory (``nats-route.json``, 0600, created once and reused,
so every node gets the same one), bcrypt-hashed in the cluster's ``authorization`` and in clear
in every ``nats-route://user:password@host:port`` URL. A host that reaches the cluster port
without it is refused as a route (it would otherwise receive every message and publish past the
MQTT permissions). With :class:`RouteTls` the routes file also carries the cluster's ``tls``
block: routes then run over mutual TLS (in a cluster NATS verifies both ends' certificates
against the CA), so the password never crosses the network in clear and a host needs a
certificate of the fleet's CA as well as the password to join.

Pure functions except :func:`build_from_keys` and :func:`write_routes_config`, which read and
write the key directory.
"""

from __future__ import annotations

import ipaddress
import json
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from federation.durable import atomic_write
from federation.keys import KeyFileError, read_json, write_secret_json
from fledger.acl import READ, WRITE, Acl, client_acl_text
from fledger.broker_logins import BrokerConfigError, filter_levels, fleet_logins

# nats-server 2.9 (2.9.10 here): QoS 1 deliveries go through an internal subscription on $MQTT.sub.<id>,
# checked against the user's subscribe permissions (nats-server PR 7637 made it implicit later).
MQTT_INTERNAL_SUBSCRIBE = "$MQTT.sub.>"

# bcrypt cost of the tool's own passwords: 192-bit random tokens (`fledger keys`), which no
# stretching makes harder to guess; nats-server checks the hash at every connection, and a
# fleet of devices reconnecting after a broker restart would otherwise cost ~60 ms of CPU each
# (cost 10). The cost travels in each hash; raise it with --bcrypt-cost for chosen passwords.
GENERATED_BCRYPT_ROUNDS = 4


class NatsConfigError(BrokerConfigError):
    """The ACL or the fleet holds something NATS permissions cannot express."""


def filter_to_subjects(topic_filter: str) -> list[str]:
    """The NATS subjects that cover exactly the MQTT topics ``topic_filter`` matches."""
    levels = filter_levels(topic_filter, ". \t*>", "NATS",
                           "'.', a space, '*' or '>' (nats-server refuses or rewrites such MQTT topics)",
                           NatsConfigError)
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
    logins = fleet_logins(directory, acl_path, broker=NatsConfigError)
    hashes = {user: _current_hash(password, (previous or {}).get(user), rounds)
              for user, password in logins.passwords.items()}
    return FleetUsers(hashes, logins.acl, logins.skipped)


# -- routes between the nodes of a cluster -----------------------------------------------------------

ROUTE_USER = "fledger-route"
ROUTE_SECRET_FILE = "nats-route.json"  # in the keys directory, beside the other secrets
ROUTE_SECRET_KIND = "fledger.nats-route-secret"
_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                       r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")


def parse_routes(text: str) -> list[str]:
    """``host:port,host:port,...`` (``[v6]:port`` for IPv6) as a list of checked ``host:port``:
    each node of the cluster once, in the order given."""
    routes: list[str] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        host, sep, port_text = item.rpartition(":")
        if not sep or not host:
            raise NatsConfigError(f"route {item!r}: expected host:port")
        if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise NatsConfigError(f"route {item!r}: the port must be a number 1..65535")
        if host.startswith("[") and host.endswith("]"):
            try:
                ipaddress.IPv6Address(host[1:-1])
            except ValueError:
                raise NatsConfigError(f"route {item!r}: {host} is not an IPv6 address") from None
        elif not _HOSTNAME.match(host):
            raise NatsConfigError(f"route {item!r}: {host!r} is not a host name or IPv4 address "
                                  "(IPv6: [address]:port)")
        route = f"{host.lower()}:{int(port_text)}"
        if route in routes:
            raise NatsConfigError(f"route {item!r} is listed twice")
        routes.append(route)
    if not routes:
        raise NatsConfigError("--routes: name every node of the cluster as host:port (the cluster port, e.g. 6222)")
    return routes


def new_route_password() -> str:
    """A random route password: 192 bits, URL-safe (it goes into the route URLs unescaped)."""
    return secrets.token_urlsafe(24)


def route_urls(routes: list[str], password: str, user: str = ROUTE_USER) -> list[str]:
    return [f"nats-route://{user}:{password}@{route}" for route in routes]


@dataclass(frozen=True)
class RouteTls:
    """Where each node finds its route certificate, its key and the CA that signed every node's
    (paths on the nodes, written as given; each certificate needs the extended key usages
    serverAuth and clientAuth, and must name the host its peers dial, as --routes lists it)."""

    cert_file: str
    key_file: str
    ca_file: str

    def __post_init__(self) -> None:
        for name, value in (("certificate", self.cert_file), ("key", self.key_file), ("CA", self.ca_file)):
            if not value or '"' in value or "\n" in value:
                raise NatsConfigError(f"route TLS {name} file {value!r}: give a path without quotes or newlines")

    @classmethod
    def from_options(cls, cert: str | None, key: str | None, ca: str | None) -> RouteTls | None:
        """All three given: the TLS to render; none: None; some: a usage error naming what is missing."""
        given = {"--route-tls-cert": cert, "--route-tls-key": key, "--route-tls-ca": ca}
        if not any(given.values()):
            return None
        missing = [flag for flag, value in given.items() if not value]
        if missing:
            raise NatsConfigError(f"route TLS needs all of --route-tls-cert, --route-tls-key and --route-tls-ca "
                                  f"(missing: {', '.join(missing)})")
        assert cert and key and ca
        return cls(cert, key, ca)


def render_route_tls(tls: RouteTls) -> list[str]:
    """The ``tls { }`` block, inside a ``cluster { }`` block, that puts every route on mutual TLS."""
    return [
        "tls {",
        f"  cert_file: {json.dumps(tls.cert_file)}",
        f"  key_file: {json.dumps(tls.key_file)}",
        f"  ca_file: {json.dumps(tls.ca_file)}",
        "  verify: true",
        "  timeout: 5",
        "}",
    ]


def render_routes(routes: list[str], password: str, password_hash: str, *, user: str = ROUTE_USER,
                  tls: RouteTls | None = None) -> str:
    """The cluster part of a node's config, included INSIDE its ``cluster { }`` block: the route
    user with the bcrypt hash its peers must match, and the routes to every node with the
    password in clear (so the file is a secret). ``routes``: from :func:`parse_routes`. With
    ``tls``, the block that puts every route on mutual TLS (:func:`render_route_tls`)."""
    tls_lines = [] if tls is None else [
        "# Routes over mutual TLS: each node presents its certificate and checks its peer's against the CA",
        "# (verify is implied for routes); the password above then never crosses the network in clear.",
        *render_route_tls(tls),
    ]
    lines = [
        "# GENERATED by `fledger keys nats-config --routes ...`: do not edit. Included INSIDE the",
        "# cluster { } block of every node (deploy/nats/nats-node.conf). SECRET: the route password is",
        "# in clear in the URLs below (install it 0640 root:nats, like fledger-auth.conf).",
        "# Every node is listed: a route NATS learns by gossip would present the bcrypt hash, not the password.",
        "authorization {",
        f"  user: {json.dumps(user)}",
        f"  password: {json.dumps(password_hash)}",
        "}",
        "routes: [",
        *(f"  {json.dumps(url)}" for url in route_urls(routes, password, user)),
        "]",
        *tls_lines,
        "",
    ]
    return "\n".join(lines)


def read_route_hash(path: Path) -> str | None:
    """The route password hash in a file :func:`render_routes` wrote (None if there is none)."""
    return route_hash_in(Path(path).read_text()) if Path(path).exists() else None


def route_hash_in(text: str) -> str | None:
    """The route password hash in the text :func:`render_routes` made."""
    for line in text.splitlines():
        key, _, value = line.strip().partition(":")
        if key == "password" and value.strip().startswith('"'):
            return str(json.loads(value.strip()))
    return None


def route_secret(directory: Path) -> str:
    """The fleet's route password: read from ``directory/nats-route.json``, created (0600) the
    first time. Reused on every regeneration, so every node's file carries the same one."""
    path = Path(directory) / ROUTE_SECRET_FILE
    if not path.exists():
        write_secret_json(path, {"kind": ROUTE_SECRET_KIND, "password": new_route_password()})
    data = read_json(path)
    password = data.get("password")
    if data.get("kind") != ROUTE_SECRET_KIND or not isinstance(password, str) \
            or not re.fullmatch(r"[A-Za-z0-9_-]{16,}", password):
        raise KeyFileError(f"{path} is not a NATS route secret (delete it to make a new one, then install "
                           "the regenerated routes file on every node)")
    return password


def write_routes_config(directory: Path, routes: list[str], out: Path, *,
                        rounds: int = GENERATED_BCRYPT_ROUNDS, tls: RouteTls | None = None) -> None:
    """Write ``out`` (0600) for the fleet whose keys are in ``directory``; the hash already in
    ``out`` is kept while it matches, so a regenerated file changes only where the routes did."""
    password = route_secret(directory)
    password_hash = _current_hash(password, read_route_hash(out), rounds)
    atomic_write(Path(out), render_routes(routes, password, password_hash, tls=tls).encode(), mode=0o600)


__all__ = [
    "MQTT_INTERNAL_SUBSCRIBE",
    "ROUTE_SECRET_FILE",
    "ROUTE_USER",
    "FleetUsers",
    "NatsConfigError",
    "Permissions",
    "RouteTls",
    "build_from_keys",
    "client_acl_text",
    "filter_to_subjects",
    "hash_password",
    "new_route_password",
    "parse_routes",
    "permissions_for",
    "read_hashes",
    "read_route_hash",
    "render",
    "render_route_tls",
    "render_routes",
    "route_hash_in",
    "route_secret",
    "route_urls",
    "write_routes_config",
]
