"""Topic access control as mosquitto's ``acl_file`` defines it, for the embedded broker.

The embedded amqtt broker and a production mosquitto enforce the SAME file
(``fledger/fledger.acl``, which ``deploy/mosquitto/fledger.acl`` links to), so a fleet gets the
same roles whichever broker it runs on. The semantics follow mosquitto 2.0's acl_file:

- ``user NAME`` starts the rules of one user; ``topic [read|write|readwrite|deny] FILTER``
  lines apply to that user (before any ``user`` line: to anonymous clients);
- ``pattern [read|write|readwrite|deny] FILTER`` lines apply to every user, with ``%u``
  replaced by the user name and ``%c`` by the client id (a name holding ``+``, ``#`` or ``/``
  matches no pattern, as in mosquitto);
- nothing is allowed unless a rule allows it; a matching ``deny`` rule wins;
- a message is matched against FILTER with the MQTT wildcards ``+`` and ``#``.

Pure: no I/O beyond reading the file in :meth:`Acl.load`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

READ, WRITE = "read", "write"
_ACCESS = {"read": {READ}, "write": {WRITE}, "readwrite": {READ, WRITE}, "deny": set()}


def default_acl_text() -> str:
    """The ACL shipped with fledger (the same file deploy/mosquitto/ installs for mosquitto)."""
    return resources.files("fledger").joinpath("fledger.acl").read_text()


def client_acl_text(client: str) -> str:
    """The ACL lines of a prediction client (`fledger keys add-client` prints them for
    mosquitto's acl_file; the embedded broker and the NATS generator add them for every client
    with an active key in clients.json)."""
    return (f"user {client}\ntopic write fledger/+/predict/{client}/request\n"
            f"topic read fledger/+/predict/{client}/reply\n")


def with_clients(text: str, clients: list[str]) -> str:
    """``text`` (an ACL) followed by the blocks of these prediction clients."""
    return text + "\n" + "".join(client_acl_text(client) for client in clients)


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT 3.1.1 matching of a concrete ``topic`` against a filter with ``+``/``#``."""
    if topic.startswith("$") != topic_filter.startswith("$"):
        return False  # [MQTT-4.7.2-1]: wildcards at the first level do not match $SYS topics
    f_levels, t_levels = topic_filter.split("/"), topic.split("/")
    for i, level in enumerate(f_levels):
        if level == "#":
            return i == len(f_levels) - 1  # "a/#" also matches "a" (the parent level)
        if i >= len(t_levels):
            return False
        if level != "+" and level != t_levels[i]:
            return False
    return len(f_levels) == len(t_levels)


class AclError(ValueError):
    """A line of the ACL file that mosquitto would not accept either."""


@dataclass(frozen=True)
class Rule:
    access: frozenset[str]  # {"read"}, {"write"}, both, or empty for deny
    topic: str
    deny: bool = False


@dataclass
class Acl:
    anonymous: list[Rule] = field(default_factory=list)
    users: dict[str, list[Rule]] = field(default_factory=dict)
    patterns: list[Rule] = field(default_factory=list)

    @classmethod
    def parse(cls, text: str, source: str = "ACL") -> Acl:
        acl = cls()
        current: list[Rule] = acl.anonymous
        for number, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            keyword, _, rest = line.partition(" ")
            rest = rest.strip()
            if keyword == "user":
                if not rest:
                    raise AclError(f"{source}:{number}: `user` needs a name")
                current = acl.users.setdefault(rest, [])
                continue
            if keyword not in ("topic", "pattern"):
                raise AclError(f"{source}:{number}: unknown keyword {keyword!r}")
            access, _, topic = rest.partition(" ")
            if access not in _ACCESS:  # no access word: the whole rest is the topic, readwrite
                access, topic = "readwrite", rest
            topic = topic.strip()
            if not topic:
                raise AclError(f"{source}:{number}: `{keyword}` needs a topic")
            rule = Rule(frozenset(_ACCESS[access]), topic, deny=access == "deny")
            (acl.patterns if keyword == "pattern" else current).append(rule)
        return acl

    @classmethod
    def load(cls, path: Path | None = None) -> Acl:
        """The ACL in ``path``, or fledger's shipped ACL."""
        if path is None:
            return cls.parse(default_acl_text(), "fledger.acl")
        return cls.parse(Path(path).read_text(), str(path))

    def rules_for(self, user: str | None, client_id: str = "") -> list[Rule]:
        if user is None:
            return list(self.anonymous)
        rules = list(self.users.get(user, []))
        for pattern in self.patterns:
            if "%u" in pattern.topic and any(c in user for c in "+#/"):
                continue
            if "%c" in pattern.topic and any(c in client_id for c in "+#/"):
                continue
            topic = pattern.topic.replace("%u", user).replace("%c", client_id)
            rules.append(Rule(pattern.access, topic, pattern.deny))
        return rules

    def allows(self, user: str | None, topic: str, access: str, client_id: str = "") -> bool:
        """May ``user`` ``access`` ("read" or "write") the concrete ``topic``?"""
        allowed = False
        for rule in self.rules_for(user, client_id):
            if not topic_matches(rule.topic, topic):
                continue
            if rule.deny:
                return False
            allowed = allowed or access in rule.access
        return allowed
