"""This process's presence session: signed heartbeats and the Last Will (see
federation.envelope.seal_presence). One session per process: a random id, the start time and
a counter, so the coordinator can tell a fresh heartbeat from a replayed one."""

from __future__ import annotations

import threading
import time

from federation import crypto, envelope
from federation.keys import DeviceBundle


class PresenceSession:
    def __init__(self, bundle: DeviceBundle, *, now: float | None = None) -> None:
        self._bundle = bundle
        self.session = crypto.random_bytes(16)
        self.started = float(time.time() if now is None else now)
        self._seq = 0
        self._lock = threading.Lock()  # heartbeats come from the main loop and a helper thread

    def last_will(self) -> bytes:
        """Signed at connect time (counter 0); the broker publishes it if the connection dies."""
        return envelope.seal_presence(self._bundle, "offline", session=self.session, started=self.started, seq=0)

    def statement(self, state: str, round_number: int | None = None) -> bytes:
        with self._lock:
            self._seq += 1
            seq = self._seq
        return envelope.seal_presence(self._bundle, state, session=self.session, started=self.started, seq=seq,
                                      round_number=round_number)
