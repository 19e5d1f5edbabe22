"""The fleet status: what it says, and when a changed one goes out.

The status is for the operator (``fledger status``, the dashboard): the open round, who was
accepted, the ledger's head, rejections, presence and every device's data set. It grows with the
fleet, so changes are republished at most every :data:`STATUS_INTERVAL_S`; events that matter at
once (a round opened or closed, a halt, a heartbeat, a reconnect) publish it now. Each device
learns of its own update from its acknowledgement (:mod:`coordinator.acks`), not from this.

:func:`fleet_status` is pure (the clock's reading is an argument); :class:`StatusPublisher`
holds only when the last status went out and whether it changed since, and is given its clock,
the body and the signing sender (:meth:`coordinator.publisher.Publisher.status`), so tests drive
it without a broker.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from coordinator.rounds import RoundState

STATUS_INTERVAL_S = 1.0  # a changed fleet status is republished at most this often (round changes: at once)


def run_state(round_state: RoundState, *, halted: str | None, done: bool, stopped: bool) -> str:
    """One word for the operator: halted, done, stopped, waiting (below min_clients) or aggregating."""
    if halted:
        return "halted"
    if done:
        return "done"
    if stopped:
        return "stopped"
    return "waiting" if round_state.waiting_for() else "aggregating"


def fleet_status(*, fleet: str, round_state: RoundState, halted: str | None, done: bool, stopped: bool,
                 session: str, heartbeat_s: float, min_clients: int, height: int, head: bytes,
                 rejections: Mapping[str, int], accepted_total: int, presence: dict[str, Any],
                 presence_rejections: Mapping[str, int], datasets: Iterable[tuple[str, bytes]],
                 now: float) -> dict[str, Any]:
    """The status body (signed and published as it is; docs/protocol.md lists its fields)."""
    return {
        "fleet": fleet, "round": round_state.number,
        "state": run_state(round_state, halted=halted, done=done, stopped=stopped),
        "session": session, "heartbeat": heartbeat_s,
        "halted": halted, "accepted": sorted(round_state.accepted),
        "waiting_for": 0 if done else round_state.waiting_for(),
        "min_clients": min_clients,
        "height": height, "head": head.hex(),
        "rejections": dict(rejections), "accepted_total": accepted_total,
        "presence": presence, "presence_rejections": dict(presence_rejections),
        "datasets": {d: h.hex() for d, h in sorted(datasets)},
        "time": now,
    }


class StatusPublisher:
    """Publishes the fleet status now, or a changed one at most every ``interval_s``."""

    def __init__(self, body: Callable[[], dict[str, Any]], send: Callable[[dict[str, Any]], None],
                 now: Callable[[], float], *, interval_s: float = STATUS_INTERVAL_S) -> None:
        self._body = body
        self._send = send
        self._now = now
        self.interval_s = interval_s
        self._changed = False  # changed since the last one was published
        self._published_at = float("-inf")

    def publish(self) -> None:
        """The status, now (round opened or closed, halt, heartbeat, reconnect)."""
        self._send(self._body())
        self._published_at = self._now()
        self._changed = False

    def changed(self) -> None:
        """Something the status shows changed (an update accepted, a data set, a presence): it
        goes out with :meth:`publish_if_due`."""
        self._changed = True

    def due(self, now: float) -> bool:
        """Whether a changed status may go out at ``now`` (the last one is ``interval_s`` old)."""
        return self._changed and now - self._published_at >= self.interval_s

    def publish_if_due(self) -> bool:
        """Publish a changed status if :meth:`due` (the daemon calls this after every message and
        timer). True if it published."""
        if not self.due(self._now()):
            return False
        self.publish()
        return True
