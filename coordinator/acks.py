"""Per-device acknowledgements: what the coordinator tells each device about itself only.

A device needs three facts: whether its data set registration is recorded, what became of each
update it sent (accepted, or the reason it was not counted), and the round that is open. The
fleet status holds every device's details and is for the operator; a device reads only its own
acknowledgement, so the cost of telling it is independent of the fleet's size.

:class:`DeviceAcks` is pure: the coordinator feeds events in. :class:`AckPublisher` publishes a
device's :meth:`DeviceAcks.body` (signed, on its retained ``ack`` topic) when there is news, and
repeats an unchanged one at most every :data:`ACK_REPEAT_INTERVAL_S` (a resend of something
already answered: the device missed the answer). It is given its clock, the open round and the
signing sender (:meth:`coordinator.publisher.Publisher.ack`), so tests drive it without a broker.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from federation.verdicts import ACCEPTED

MAX_VERDICTS = 8  # per device: enough for a resend of the last rounds, bounded whatever it sends
ACK_REPEAT_INTERVAL_S = 1.0  # a device's unchanged acknowledgement is published again at most this often


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


class AckPublisher:
    """Publishes each device's acknowledgement: on news at once, unchanged at a bounded rate.

    Called only once what it acknowledges is durable (the coordinator's order of writes)."""

    def __init__(self, acks: DeviceAcks, send: Callable[[str, dict[str, Any]], None], now: Callable[[], float],
                 open_round: Callable[[], int], *, repeat_s: float = ACK_REPEAT_INTERVAL_S) -> None:
        self.acks = acks
        self._send = send
        self._now = now
        self._open_round = open_round
        self.repeat_s = repeat_s
        self._sent_at: dict[str, float] = {}  # device -> when its acknowledgement was last published

    def publish(self, device: str) -> None:
        """Tell one device (retained, signed) what the coordinator knows of it."""
        self._send(device, self.acks.body(device, open_round=self._open_round(), now=self._now()))
        self._sent_at[device] = self._now()

    def publish_all(self) -> None:
        """Every known device's acknowledgement again (after a reconnect: a broker restart loses
        retained messages)."""
        for device in sorted(self._sent_at):
            self.publish(device)

    def repeat_due(self, device: str, now: float) -> bool:
        """Whether ``device``'s unchanged acknowledgement may go again at ``now``."""
        return now - self._sent_at.get(device, float("-inf")) >= self.repeat_s

    def repeat(self, device: str) -> None:
        """A device sent again what was answered already (it missed the answer): its
        acknowledgement again, if :meth:`repeat_due`. Bounded, because anyone who saw a genuine
        message can replay it."""
        if self.repeat_due(device, self._now()):
            self.publish(device)

    def verdict(self, device: str, round_number: int, msg_id: bytes, verdict: str) -> None:
        """The verdict on one of ``device``'s updates: published if new, else repeated (bounded)."""
        if self.acks.verdict(device, round_number, msg_id, verdict):
            self.publish(device)
        else:
            self.repeat(device)
