"""Per-device acknowledgements: what the coordinator tells each device about itself only.

A device needs three facts: whether its data set registration is recorded, what became of each
update it sent (accepted, or the reason it was not counted), and the round that is open. The
fleet status holds every device's details and is for the operator; a device reads only its own
acknowledgement, so the cost of telling it is independent of the fleet's size.

Pure: the coordinator feeds events in and publishes :meth:`DeviceAcks.body` (signed) on the
device's retained ``ack`` topic.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from federation.verdicts import ACCEPTED

MAX_VERDICTS = 8  # per device: enough for a resend of the last rounds, bounded whatever it sends


@dataclass
class _DeviceState:
    registered: str | None = None  # hex SHA-256 of the registered data set
    verdicts: OrderedDict[str, dict[str, Any]] = field(default_factory=OrderedDict)  # msg_id hex -> verdict


class DeviceAcks:
    def __init__(self, fleet: str) -> None:
        self.fleet = fleet
        self._devices: dict[str, _DeviceState] = {}

    def _state(self, device: str) -> _DeviceState:
        return self._devices.setdefault(device, _DeviceState())

    def registered(self, device: str, sha256: bytes) -> None:
        self._state(device).registered = sha256.hex()

    def verdict(self, device: str, round_number: int, msg_id: bytes, verdict: str) -> bool:
        """Note the verdict on one update. False if it was already known (nothing new to tell).

        An accepted update stays accepted: a later replay of it is not a new verdict."""
        verdicts = self._state(device).verdicts
        key = msg_id.hex()
        known = verdicts.get(key)
        if known is not None and (known["verdict"] == verdict or known["verdict"] == ACCEPTED):
            return False
        verdicts[key] = {"round": round_number, "verdict": verdict}
        verdicts.move_to_end(key)
        while len(verdicts) > MAX_VERDICTS:
            verdicts.popitem(last=False)
        return True

    def body(self, device: str, *, open_round: int, now: float) -> dict[str, Any]:
        state = self._state(device)
        return {
            "fleet": self.fleet, "device": device, "round": open_round, "registered": state.registered,
            "updates": {msg_id: dict(v) for msg_id, v in state.verdicts.items()}, "time": now,
        }
