"""Which devices are online: signed heartbeats and Last Wills, in order, with a timeout.

Pure: the caller verifies signatures (federation.envelope.open_presence) and passes the clock.
Ordering uses what the device signed, never arrival order: sessions are ordered by their start
time, statements within a session by their counter. A copy of an older statement is ignored,
so someone replaying captured heartbeats cannot keep a dead device "online" (at most, while
it is offline, one old heartbeat shows it online until the timeout). Presence is a liveness
hint for operators; no decision about updates or models depends on it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from federation.envelope import PresenceStatement

log = logging.getLogger(__name__)


@dataclass
class DevicePresence:
    state: str
    round: int | None
    session: bytes
    started: float
    seq: int
    received: float  # our monotonic clock
    reason: str = ""


class PresenceBook:
    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self.devices: dict[str, DevicePresence] = {}

    def note(self, statement: PresenceStatement) -> str:
        """Apply a verified statement. Returns "changed", "unchanged" (a heartbeat that only
        refreshes) or why it was ignored: "stale_session" or "replay"."""
        current = self.devices.get(statement.device)
        if current is not None:
            if statement.session != current.session:
                # A newer session wins. So does any session once the current one is offline: a
                # device whose clock went back (no RTC, before NTP) must be able to come back.
                if statement.started <= current.started and current.state == "online":
                    return "stale_session"
            elif statement.state == "online" and statement.seq <= current.seq:
                return "replay"
            # The Last Will of the current session is signed when the session starts (seq 0),
            # so an offline statement of the current session counts whatever its counter.
        changed = current is None or current.state != statement.state
        self.devices[statement.device] = DevicePresence(
            statement.state, statement.round, statement.session, statement.started,
            max(statement.seq, current.seq if current and current.session == statement.session else 0),
            self._clock(),
        )
        if changed:
            log.info("device %s is %s", statement.device, statement.state)
        return "changed" if changed else "unchanged"

    def expire(self, timeout: float) -> bool:
        """Mark devices whose heartbeats stopped as offline: some brokers (amqtt) never fire the
        Last Will of a client that just goes silent. True when any state changed."""
        if timeout <= 0:
            return False
        now = self._clock()
        changed = False
        for device, presence in self.devices.items():
            if presence.state == "online" and now - presence.received > timeout:
                presence.state = "offline"
                presence.reason = f"no heartbeat for {timeout:.0f}s"
                log.warning("device %s is offline: no heartbeat for %.0fs", device, timeout)
                changed = True
        return changed

    def states(self) -> dict[str, str]:
        return {device: p.state for device, p in sorted(self.devices.items())}
