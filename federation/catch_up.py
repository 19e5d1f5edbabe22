"""The asking side of catch-up requests (the coordinator's side: coordinator/catch_up.py).

A role that joins, or reconnects, cannot count on retained messages: a broker cluster may keep
them on another node (RabbitMQ), and a node that died took the session's queued messages with
it. So it asks the coordinator on ``<base>/catchup/<user>`` when it still lacks something a
short wait after connecting, and once after every reconnect. Pure: times and the link's
connect count are passed in.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

DEFAULT_WAIT_S = 3.0  # after a connect: retained messages, where the broker has them, come first
DEFAULT_RETRY_S = (5.0, 60.0)  # while still lacking: ask again, doubling from the first to the second


def request_body(model_message: bytes | None = None) -> bytes:
    """A request: the SHA-256 of the model message held, if any (the coordinator then sends no model)."""
    return json.dumps({"have": hashlib.sha256(model_message).hexdigest()} if model_message else {}).encode()


@dataclass
class CatchUpSchedule:
    wait_s: float = DEFAULT_WAIT_S
    retry_s: tuple[float, float] = DEFAULT_RETRY_S
    _connects: int = 0
    _connected_at: float = 0.0
    _asked_at: float | None = None  # last request since the latest connect
    _retry: float = 0.0
    _reconnected: bool = False  # the latest connect was not the first

    def due(self, now: float, connect_count: int, *, lacking: bool) -> bool:
        """Whether to ask now. ``connect_count`` grows with every (re)connect of the link;
        ``lacking``: nothing has arrived yet that the request would bring (e.g. no model)."""
        if connect_count != self._connects:
            first = self._connects == 0
            self._connects, self._connected_at, self._asked_at = connect_count, now, None
            self._retry = self.retry_s[0]
            self._reconnected = not first
        if connect_count == 0 or now - self._connected_at < self.wait_s:
            return False
        if self._asked_at is None:
            # After a reconnect ask even when holding something: it may be out of date (a model
            # published while we were away is not queued for us if our node died).
            if lacking or self._reconnected:
                self._asked_at = now
                return True
            return False
        if lacking and now - self._asked_at >= self._retry:
            self._asked_at = now
            self._retry = min(self._retry * 2, self.retry_s[1])
            return True
        return False
