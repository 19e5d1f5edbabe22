"""Fair, bounded ledger replays: which monitor request is served, and with how many bytes.

A monitor asks on ``<prefix>/<fleet>/ledger/replay/<its broker user>`` for the blocks from
some height; the broker ACL lets only that user write that topic, so the topic names the
requester (MQTT 3.1.1 tells a subscriber nothing about the publisher). Pure: the clock is
passed in, and so are the ledger and the publishing (:meth:`ReplayLimiter.serve`). Bounds (docs/security.md, "Replays"):

- per requester: at most one served request per ``interval_s`` and ``requester_window_bytes``
  per window; every other request is counted and dropped, whatever its content;
- per request: at most ``max_blocks`` blocks and ``max_bytes`` bytes;
- all requesters together: ``window_bytes`` per ``window_s``;
- no new replay while the previous one is still unacknowledged by the broker.

So a flooding account costs at most ``requester_window_bytes`` per window however much it
sends, and an honest monitor keeps its own allowance.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from coordinator.request_tally import RequestTally, ignore

log = logging.getLogger(__name__)
# The daemon's logger for the served replay's line: ReplayLimiter.serve was the daemon's before it
# moved here, and operators' filters on the logger name keep working.
daemon_log = logging.getLogger("coordinator.daemon")

MAX_REQUEST_BYTES = 256
REFUSALS = ("malformed", "too_often", "previous_replay_in_flight", "byte_budget")


@dataclass(frozen=True)
class ReplayLimits:
    """Defaults of the coordinator's ``replay_*`` settings (coordinator/config.py)."""

    interval_s: float = 2.0
    max_blocks: int = 10_000
    max_bytes: int = 1 << 20
    window_s: float = 10.0
    requester_window_bytes: int = 4 << 20
    window_bytes: int = 16 << 20

    def check(self) -> ReplayLimits:
        """Itself, or ValueError naming the setting that is not positive (0 would refuse or
        starve every monitor: a bound, not a way to turn replays off)."""
        for name, value in (("replay_interval", self.interval_s), ("replay_batch", self.max_blocks),
                            ("replay_bytes", self.max_bytes), ("replay window", self.window_s),
                            ("replay_requester_window_bytes", self.requester_window_bytes),
                            ("replay_window_bytes", self.window_bytes)):
            if not value > 0:
                raise ValueError(f"{name} must be > 0, not {value}")
        return self


def parse_request(payload: bytes) -> int | None:
    """The height a request asks to replay from (``{"from": N}``, N an int >= 0); None if malformed."""
    if len(payload) > MAX_REQUEST_BYTES:
        return None
    try:
        request = json.loads(payload)
    except ValueError:
        return None
    start = request.get("from") if isinstance(request, dict) else None
    return start if type(start) is int and start >= 0 else None


class _Serialised(Protocol):
    def to_bytes(self) -> bytes: ...


class BlockSource(Protocol):
    """What is replayed from: the coordinator's ledger (``blocks(start, end)``: that index range)."""

    def blocks(self, start: int, end: int) -> Iterable[_Serialised]: ...


PublishAll = Callable[[str, Iterable[bytes]], Callable[[], bool]]  # MqttLink.publish_all: (topic, blocks) -> delivered?


@dataclass
class ReplayLimiter:
    limits: ReplayLimits = field(default_factory=ReplayLimits)
    clock: Callable[[], float] = time.monotonic
    counted: Callable[[str], None] = ignore  # SERVED or the refusal's reason (metrics)
    _last_served: dict[str, float] = field(default_factory=dict)
    _window_start: float = float("-inf")
    _window_used: Counter[str] = field(default_factory=Counter)  # requester -> bytes this window
    _delivered: Callable[[], bool] = field(default=lambda: True)

    def __post_init__(self) -> None:
        self.tally = RequestTally("ledger replay request", log, self.counted)

    @property
    def refused(self) -> Counter[str]:
        """Refused requests by reason."""
        return self.tally.refused

    def request(self, requester: str, payload: bytes, blocks: Callable[[int, int], Iterable[bytes]]) -> list[bytes]:
        """The blocks to re-send for ``requester``'s ``payload`` (empty: refused, counted).
        ``blocks(start, end)`` yields the serialised blocks of that index range."""
        now = self.clock()
        if now - self._window_start >= self.limits.window_s:
            self._window_start, self._window_used = now, Counter()
            self.tally.new_window()
        start = parse_request(payload)
        if start is None:
            return self._refuse(requester, "malformed")
        if now - self._last_served.get(requester, float("-inf")) < self.limits.interval_s:
            return self._refuse(requester, "too_often")
        if not self._delivered():
            # Replays must not pile blocks up in the MQTT client's (unbounded) outgoing queue
            # faster than the broker takes them.
            return self._refuse(requester, "previous_replay_in_flight")
        budget = min(self.limits.max_bytes,
                     self.limits.requester_window_bytes - self._window_used[requester],
                     self.limits.window_bytes - sum(self._window_used.values()))
        chosen: list[bytes] = []
        size = 0
        for raw in blocks(start, start + max(1, self.limits.max_blocks)):
            if size + len(raw) > budget:
                break
            chosen.append(raw)
            size += len(raw)
        if not chosen and budget < self.limits.max_bytes:
            return self._refuse(requester, "byte_budget")
        self._last_served[requester] = now
        self._window_used[requester] += size
        self.tally.served()
        return chosen

    def serve(self, requester: str, payload: bytes, ledger: BlockSource, publish_all: PublishAll, topic: str) -> None:
        """A monitor asked for blocks from some height: re-send them from ``ledger`` on ``topic``
        (the ledger blocks topic), within the per-requester and per-window bounds."""
        blocks = self.request(requester, payload,
                              lambda start, end: (block.to_bytes() for block in ledger.blocks(start, end)))
        if blocks:
            self.sent(publish_all(topic, blocks))
            daemon_log.info("replayed %d ledger blocks (%d bytes) for %s", len(blocks), sum(map(len, blocks)),
                            requester)

    def sent(self, delivered: Callable[[], bool]) -> None:
        """Tell the limiter how to check that the replay just published has been acknowledged."""
        self._delivered = delivered

    def _refuse(self, requester: str, reason: str) -> list[bytes]:
        self.tally.refuse(requester, reason)
        return []
