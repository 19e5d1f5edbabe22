"""Catch-up requests: a device or monitor that joins asks for what retained messages would tell it.

Why: a broker cluster need not hand a new subscriber the retained messages published through
another node. RabbitMQ keeps them on the node that received them, so a device on the other node
never gets the model (and loses rounds); NATS replicates them, but a retained store can time out
during a leader election. So nothing a role needs on joining may depend on retained messages alone.

A request (made by federation/catch_up.py) is published on ``<base>/catchup/<user>`` (the broker's
ACL lets only that user write it, so requests are counted per requester, as ledger replays are)
with a JSON body of at most
``MAX_REQUEST_BYTES``: ``{}`` or ``{"have": "<hex SHA-256 of the model message held>"}``. The
answer depends on who asks:

- a device of the registry: the current model on ``catchup/<device>/model`` (unless ``have``
  names it already) and its own acknowledgement republished on ``ack/<device>``;
- anyone else (a monitor, the operator): the signed status on ``catchup/<user>/status`` and the
  latest ledger block on ``catchup/<user>/head``. Whether they are delivered is the broker's ACL's
  decision, the same as for the retained ``status`` and ``ledger/head`` (docs/security.md).

Every answer is a message the coordinator signs anyway; nothing new is trusted. Bounds
(:class:`CatchUpLimits`, the coordinator's ``catch_up_*`` settings): one served request per
requester per ``interval_s``; at most ``window_requests`` requests and ``window_bytes`` bytes for
all requesters together per window; nothing more while the previous answer is unacknowledged by
the broker (paho's outgoing queue is unbounded). Refusals are counted by reason and logged once
per requester, reason and window; ``counted`` hears of every served and refused request (the
coordinator's metrics).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from coordinator.request_tally import RequestTally, ignore
from federation.topics import Topics

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 256
_HEX_SHA256 = re.compile(r"^[0-9a-f]{64}$")

Publish = Callable[[str, Iterable[bytes]], Callable[[], bool]]  # MqttLink.publish_all


REFUSALS = ("malformed", "too_often", "busy", "previous_reply_in_flight", "byte_budget")


@dataclass(frozen=True)
class CatchUpLimits:
    """Defaults of the coordinator's ``catch_up_*`` settings (coordinator/config.py)."""

    interval_s: float = 5.0  # per requester: an agent asks again after a few seconds at most
    window_s: float = 10.0
    window_requests: int = 2_000  # served per window, all requesters together (a fleet rejoining)
    window_bytes: int = 64 << 20  # sent per window, all requesters together (~6.4 MiB/s)

    def check(self) -> CatchUpLimits:
        """Itself, or ValueError naming the setting that is not positive."""
        for name, value in (("catch_up_interval", self.interval_s), ("catch_up_window_requests", self.window_requests),
                            ("catch_up_window_bytes", self.window_bytes), ("catch-up window", self.window_s)):
            if not value > 0:
                raise ValueError(f"{name} must be > 0, not {value}")
        return self


@dataclass(frozen=True)
class FleetNow:
    """What the coordinator can tell right now. Callables: nothing is sealed that is not sent."""

    model: Callable[[], bytes]  # the sealed current model message
    is_device: Callable[[str], bool]  # a registered device with an active key
    publish_ack: Callable[[str], None]  # republish that device's signed acknowledgement
    status: Callable[[], bytes]  # the sealed fleet status
    head: Callable[[], bytes]  # the latest ledger block


def fleet_now(coordinator: Any) -> FleetNow:
    """The coordinator's current state as a catch-up answer sees it (the only coupling to it)."""

    from federation import envelope  # here: coordinator/config.py reads CatchUpLimits and must stay light

    def is_device(name: str) -> bool:
        record = coordinator.registry.devices.get(name)
        return record is not None and any(k not in record.revoked for k in record.keys)

    return FleetNow(
        model=lambda: coordinator.model_message,
        is_device=is_device,
        publish_ack=coordinator.publish_ack,
        status=lambda: envelope.seal_status(coordinator.keys, coordinator.status()),
        head=lambda: coordinator.ledger.head.to_bytes(),
    )


def parse_request(payload: bytes) -> dict[str, str] | None:
    """The request's fields (``have`` if given); None if malformed."""
    if len(payload) > MAX_REQUEST_BYTES:
        return None
    if not payload.strip():
        return {}
    try:
        request = json.loads(payload)
    except ValueError:
        return None
    if not isinstance(request, dict):
        return None
    have = request.get("have")
    if have is None:
        return {}
    return {"have": have} if isinstance(have, str) and _HEX_SHA256.match(have) else None


@dataclass
class CatchUp:
    topics: Topics
    limits: CatchUpLimits = field(default_factory=CatchUpLimits)
    clock: Callable[[], float] = time.monotonic
    served: int = 0
    counted: Callable[[str], None] = ignore  # SERVED or the refusal's reason (metrics)
    _last_served: dict[str, float] = field(default_factory=dict)
    _window_start: float = float("-inf")
    _window_requests: int = 0
    _window_bytes: int = 0
    _delivered: Callable[[], bool] = field(default=lambda: True)
    _model_digest: tuple[bytes, str] = (b"", "")  # (model message, its hex SHA-256): hashed once per model

    def __post_init__(self) -> None:
        self.tally = RequestTally("catch-up request", log, self.counted)

    @property
    def refused(self) -> Counter[str]:
        """Refused requests by reason."""
        return self.tally.refused

    def serve(self, requester: str, payload: bytes, fleet: FleetNow, publish: Publish) -> bool:
        """Answer ``requester``'s request within the bounds; False if refused (counted)."""
        now = self.clock()
        if now - self._window_start >= self.limits.window_s:
            self._new_window(now)
        request = parse_request(payload)
        if request is None:
            return self._refuse(requester, "malformed")
        if now - self._last_served.get(requester, float("-inf")) < self.limits.interval_s:
            return self._refuse(requester, "too_often")
        if self._window_requests >= self.limits.window_requests:
            return self._refuse(requester, "busy")
        if not self._delivered():
            return self._refuse(requester, "previous_reply_in_flight")
        device = fleet.is_device(requester)
        replies = self._replies(requester, request, fleet) if device else [
            (self.topics.catch_up_reply(requester, "status"), fleet.status()),
            (self.topics.catch_up_reply(requester, "head"), fleet.head()),
        ]
        size = sum(len(p) for _, p in replies)
        if self._window_bytes + size > self.limits.window_bytes:
            return self._refuse(requester, "byte_budget")
        self._last_served[requester] = now
        self._window_requests += 1
        self._window_bytes += size
        self.served += 1
        self.tally.served()
        checks = [publish(topic, [body]) for topic, body in replies]
        self._delivered = lambda: all(check() for check in checks)
        if device:
            fleet.publish_ack(requester)
        sent = [topic.rsplit("/", 1)[-1] for topic, _ in replies] + (["ack"] if device else [])
        log.info("catch-up for %s: sent %s (%d bytes)", requester, ", ".join(sent), size)
        return True

    def _replies(self, device: str, request: dict[str, str], fleet: FleetNow) -> list[tuple[str, bytes]]:
        model = fleet.model()
        if not model or request.get("have") == self._digest(model):
            return []  # it has the current model: its acknowledgement is all it needs
        return [(self.topics.catch_up_reply(device, "model"), model)]

    def _digest(self, model: bytes) -> str:
        if self._model_digest[0] is not model:
            self._model_digest = (model, hashlib.sha256(model).hexdigest())
        return self._model_digest[1]

    def _new_window(self, now: float) -> None:
        self._window_start, self._window_requests, self._window_bytes = now, 0, 0
        self.tally.new_window()
        # Forget requesters who may ask again anyway: the table stays as small as the recent askers.
        self._last_served = {r: t for r, t in self._last_served.items() if now - t < self.limits.interval_s}

    def _refuse(self, requester: str, reason: str) -> bool:
        self.tally.refuse(requester, reason)
        return False
