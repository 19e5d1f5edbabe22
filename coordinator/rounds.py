"""The round state machine: which update may join the open round, and when it closes.

Pure: no clock, network or disk; callers pass ``now``. Rejection reasons are short stable
labels, counted by the coordinator and written to the ledger for authenticated senders.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

MODES = ("rounds", "async")  # synchronous rounds, or FedBuff's buffer (BufferState)


@dataclass(frozen=True)
class RoundPolicy:
    min_clients: int = 2  # aggregate as soon as this many updates are in
    quorum: int = 1  # after the deadline, aggregate with at least this many
    deadline_s: float = 300.0  # seconds after the round opens; 0 disables the deadline
    # Adaptive deadline: the next round stays open max(deadline_s, adapt_factor x p90 of the
    # devices' reported training times), at most deadline_max_s (0: 10 x deadline_s). 0: fixed.
    adapt_factor: float = 0.0
    deadline_max_s: float = 0.0

    def __post_init__(self) -> None:
        if self.min_clients < 1 or self.quorum < 1 or self.quorum > self.min_clients:
            raise ValueError("need 1 <= quorum <= min_clients")
        if not 0 <= self.deadline_s < math.inf:  # NaN fails too: a NaN deadline would never pass
            raise ValueError(f"round deadline must be a finite number of seconds >= 0 (0: none), not {self.deadline_s}")
        if not 0 <= self.adapt_factor < math.inf or not 0 <= self.deadline_max_s < math.inf:
            raise ValueError("deadline factor and maximum deadline must be finite numbers >= 0")

    def deadline_for(self, train_seconds: Iterable[float]) -> float:
        """The deadline of the next round, given the devices' latest reported training times:
        a device slower than the deadline would otherwise never join (every update stale)."""
        if not self.deadline_s or not self.adapt_factor:
            return self.deadline_s
        times = sorted(t for t in train_seconds if math.isfinite(t) and t > 0)
        if not times:
            return self.deadline_s
        p90 = times[min(len(times) - 1, math.ceil(0.9 * len(times)) - 1)]
        bound = self.deadline_max_s or 10 * self.deadline_s
        return min(max(self.deadline_s, self.adapt_factor * p90), max(bound, self.deadline_s))


@dataclass(frozen=True)
class Accepted:
    device: str
    msg_id: bytes
    weights_sha256: bytes
    num_samples: int
    metrics: dict[str, float]


@dataclass
class RoundState:
    number: int
    opened_at: float
    policy: RoundPolicy
    accepted: dict[str, Accepted] = field(default_factory=dict)

    def check(self, *, device: str, round_number: int, msg_id: bytes, seen: set[bytes]) -> str | None:
        """None if an update may join this round, else the reason it may not."""
        if msg_id in seen:
            return "replay"
        if round_number < self.number:
            return "stale_round"
        if round_number > self.number:
            return "future_round"
        if device in self.accepted:
            return "duplicate_in_round"
        return None

    def accept(self, update: Accepted) -> None:
        if update.device in self.accepted:
            raise ValueError(f"device {update.device} already accepted in round {self.number}")
        self.accepted[update.device] = update

    def deadline_passed(self, now: float) -> bool:
        return self.policy.deadline_s > 0 and now - self.opened_at >= self.policy.deadline_s

    def ready(self, now: float) -> bool:
        """Close when min_clients are in, or at the deadline with a quorum."""
        count = len(self.accepted)
        if count >= self.policy.min_clients:
            return True
        return self.deadline_passed(now) and count >= self.policy.quorum

    def waiting_for(self) -> int:
        return max(0, self.policy.min_clients - len(self.accepted))

    def train_summary(self) -> dict[str, float]:
        """Sample-weighted means of the participants' reported metrics."""
        total = sum(u.num_samples for u in self.accepted.values())
        if total == 0:
            return {}
        names = sorted({k for u in self.accepted.values() for k in u.metrics})
        summary: dict[str, float] = {}
        for name in names:
            part = [(u.metrics[name], u.num_samples) for u in self.accepted.values() if name in u.metrics]
            weight = sum(n for _, n in part)
            summary[name] = sum(v * n for v, n in part) / weight
        return summary


@dataclass
class BufferState(RoundState):
    """Asynchronous aggregation (FedBuff): ``number`` is the current model version; an update
    trained from any version at most ``max_staleness`` behind may join the buffer (one per
    device); the buffer is aggregated once ``policy.min_clients`` (K) updates are in, or at the
    deadline with a quorum. A slow device's update counts, down-weighted by its staleness."""

    max_staleness: int = 4

    def check(self, *, device: str, round_number: int, msg_id: bytes, seen: set[bytes]) -> str | None:
        if msg_id in seen:
            return "replay"
        if round_number > self.number:
            return "future_round"
        if self.number - round_number > self.max_staleness:
            return "too_stale"
        if device in self.accepted:
            return "duplicate_in_round"
        return None

    def staleness(self, round_number: int) -> int:
        return self.number - round_number
