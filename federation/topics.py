"""MQTT topic names, all under ``<prefix>/<fleet>/`` (default prefix ``fledger``)."""

from __future__ import annotations

import re
from dataclasses import dataclass

# Conservative: works on every broker we target (NATS rejects '.' and spaces in topics).
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
CATCH_UP_KINDS = ("model", "status", "head")  # what a catch-up reply carries (Topics.catch_up_reply)


def check_name(kind: str, value: str) -> str:
    if not _NAME.match(value):
        raise ValueError(f"{kind} {value!r} must be 1-64 characters of A-Z, a-z, 0-9, '_' or '-'")
    return value


def _last_level_name(topic: str, prefix: str) -> str | None:
    """The valid name that follows ``prefix`` as the topic's last level; None otherwise."""
    if not topic.startswith(prefix):
        return None
    name = topic[len(prefix):]
    return name if _NAME.match(name) else None


@dataclass(frozen=True)
class Topics:
    fleet: str
    prefix: str = "fledger"

    def __post_init__(self) -> None:
        check_name("fleet", self.fleet)
        check_name("topic prefix", self.prefix)

    @property
    def base(self) -> str:
        return f"{self.prefix}/{self.fleet}"

    @property
    def model(self) -> str:
        """Retained: the current signed, encrypted global model."""
        return f"{self.base}/model/global"

    @property
    def model_chunks(self) -> str:
        """Retained chunks of a model larger than the broker's payload limit."""
        return f"{self.base}/model/global/chunk/+"

    def update(self, device_id: str) -> str:
        return f"{self.base}/update/{check_name('device id', device_id)}"

    @property
    def updates(self) -> str:
        return f"{self.base}/update/+"

    def register(self, device_id: str) -> str:
        """A device's signed dataset registration (SHA-256, size, schema of its data)."""
        return f"{self.base}/register/{check_name('device id', device_id)}"

    @property
    def registrations(self) -> str:
        return f"{self.base}/register/+"

    @property
    def ledger_blocks(self) -> str:
        return f"{self.base}/ledger/blocks"

    @property
    def ledger_head(self) -> str:
        """Retained: the latest block, so a new monitor knows the height at once."""
        return f"{self.base}/ledger/head"

    def ledger_replay(self, requester: str) -> str:
        """A monitor publishes ``{"from": N}`` here to have blocks N.. re-sent on ledger/blocks.
        ``requester`` is its broker user: the ACL lets only that user write the topic, so the
        coordinator can rate-limit each requester (MQTT 3.1.1 does not name a publisher)."""
        return f"{self.base}/ledger/replay/{check_name('replay requester', requester)}"

    @property
    def ledger_checkpoint(self) -> str:
        """Retained: the latest tree head as a C2SP tlog-checkpoint signed note (UTF-8 text), for
        witnesses and monitors using standard transparency tooling (docs/ledger.md)."""
        return f"{self.base}/ledger/checkpoint"

    @property
    def ledger_head_chunks(self) -> str:
        """Retained chunks of a ledger head block larger than the broker's payload limit."""
        return f"{self.ledger_head}/chunk/+"

    @property
    def ledger_replays(self) -> str:
        return f"{self.base}/ledger/replay/+"

    def replay_requester_of(self, topic: str) -> str | None:
        """The requester named by a replay topic; None if ``topic`` is none or names no valid user."""
        return _last_level_name(topic, f"{self.base}/ledger/replay/")

    def catch_up(self, requester: str) -> str:
        """A device or monitor that joins publishes a small request here (``{"have": ...}``, see
        coordinator/catch_up.py) to be sent what retained messages would have told it: not every
        broker cluster hands a new subscriber the retained messages published through another
        node. ``requester`` is its broker user, as for ledger replays (rate-limited per requester)."""
        return f"{self.base}/catchup/{check_name('catch-up requester', requester)}"

    @property
    def catch_up_requests(self) -> str:
        return f"{self.base}/catchup/+"

    def catch_up_requester_of(self, topic: str) -> str | None:
        """The requester named by a catch-up request topic; None if ``topic`` is none."""
        return _last_level_name(topic, f"{self.base}/catchup/")

    def catch_up_reply(self, requester: str, kind: str) -> str:
        """Where the coordinator answers ``requester``: ``model`` (a device), ``status`` and
        ``head`` (a monitor or operator). Not retained; only that broker user may read it."""
        if kind not in CATCH_UP_KINDS:
            raise ValueError(f"catch-up reply kind {kind!r} is not one of {', '.join(CATCH_UP_KINDS)}")
        return f"{self.catch_up(requester)}/{kind}"

    def catch_up_replies(self, requester: str) -> str:
        return f"{self.catch_up(requester)}/+"

    def catch_up_kind_of(self, requester: str, topic: str) -> str | None:
        """``model``, ``status`` or ``head`` if ``topic`` is a catch-up reply to ``requester``."""
        prefix = f"{self.catch_up(requester)}/"
        kind = topic[len(prefix):] if topic.startswith(prefix) else None
        return kind if kind in CATCH_UP_KINDS else None

    @property
    def status(self) -> str:
        return f"{self.base}/status"

    def ack(self, device_id: str) -> str:
        """Retained, coordinator-signed: what the coordinator knows of this one device (its
        registration, the verdicts on its updates). Each device reads only its own."""
        return f"{self.base}/ack/{check_name('device id', device_id)}"

    @property
    def status_chunks(self) -> str:
        """Retained chunks of a status larger than the broker's payload limit (a large fleet)."""
        return f"{self.status}/chunk/+"

    def presence(self, device_id: str) -> str:
        return f"{self.base}/presence/{check_name('device id', device_id)}"

    @property
    def presences(self) -> str:
        return f"{self.base}/presence/+"

    def device_of(self, topic: str) -> str | None:
        """The device id in an update, presence or registration topic; None if there is none or
        it is not a valid id (a wildcard subscription also matches such topics)."""
        parts = topic.split("/")
        base = self.base.split("/")
        kinds = ("update", "presence", "register")
        if len(parts) == len(base) + 2 and parts[: len(base)] == base and parts[-2] in kinds:
            try:
                return check_name("device id", parts[-1])
            except ValueError:
                return None
        return None
