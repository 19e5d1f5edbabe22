"""The fleet status without a coordinator or broker: what it says, and when a change goes out."""

from __future__ import annotations

from typing import Any

from manual_clock import ManualClock

from coordinator.rounds import Accepted, RoundPolicy, RoundState
from coordinator.status import STATUS_INTERVAL_S, StatusPublisher, fleet_status


def status_of(round_state: RoundState, **overrides: Any) -> dict[str, Any]:
    facts: dict[str, Any] = dict(
        fleet="f", round_state=round_state, halted=None, done=False, stopped=False, session="s1",
        heartbeat_s=30.0, min_clients=2, height=7, head=b"\x01\x02", rejections={"replay": 2},
        accepted_total=5, presence={"dev-a": {"state": "online"}}, presence_rejections={},
        datasets=[("dev-b", b"\xbb"), ("dev-a", b"\xaa")], now=123.5)
    facts.update(overrides)
    return fleet_status(**facts)


def accepted(device: str) -> Accepted:
    return Accepted(device, device.encode(), b"", 10, {})


def test_the_status_says_which_round_waits_for_how_many_and_what_the_ledger_holds() -> None:
    open_round = RoundState(3, 0.0, RoundPolicy(min_clients=2, quorum=1, deadline_s=0))
    open_round.accept(accepted("dev-b"))
    status = status_of(open_round)
    assert status["round"] == 3 and status["accepted"] == ["dev-b"]
    assert status["state"] == "waiting" and status["waiting_for"] == 1
    assert status["height"] == 7 and status["head"] == "0102" and status["time"] == 123.5
    assert list(status["datasets"]) == ["dev-a", "dev-b"] and status["datasets"]["dev-a"] == "aa"
    open_round.accept(accepted("dev-a"))
    assert status_of(open_round)["state"] == "aggregating"


def test_a_halt_outranks_done_which_outranks_stopped_and_a_done_run_waits_for_no_one() -> None:
    open_round = RoundState(1, 0.0, RoundPolicy(min_clients=2, quorum=1, deadline_s=0))
    assert status_of(open_round, halted="disk full", done=True, stopped=True)["state"] == "halted"
    done = status_of(open_round, done=True, stopped=True)
    assert done["state"] == "done" and done["waiting_for"] == 0
    assert status_of(open_round, stopped=True)["state"] == "stopped"


def test_a_changed_status_goes_out_at_most_once_an_interval_and_a_forced_one_at_once() -> None:
    clock = ManualClock()
    sent: list[dict[str, Any]] = []
    publisher = StatusPublisher(lambda: {"time": clock()}, sent.append, clock)
    assert not publisher.publish_if_due() and sent == []  # nothing changed
    publisher.changed()
    assert publisher.publish_if_due() and len(sent) == 1  # never published: due at once
    publisher.changed()
    clock.t += STATUS_INTERVAL_S / 2
    assert not publisher.due(clock()) and not publisher.publish_if_due()
    publisher.publish()  # e.g. a round closed: at once, whatever the interval
    assert len(sent) == 2 and not publisher.due(clock() + STATUS_INTERVAL_S)  # and the change went with it
    publisher.changed()
    assert not publisher.due(clock() + STATUS_INTERVAL_S * 0.99) and publisher.due(clock() + STATUS_INTERVAL_S)
    clock.t += STATUS_INTERVAL_S
    assert publisher.publish_if_due() and sent[-1] == {"time": clock.t}
