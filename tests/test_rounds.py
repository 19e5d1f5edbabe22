import pytest

from coordinator.rounds import Accepted, RoundPolicy, RoundState


def accepted(device: str, n: int = 10, loss: float = 1.0) -> Accepted:
    return Accepted(device, device.encode().ljust(16, b"\0"), b"\0" * 32, n, {"train_loss": loss})


def test_check_reasons() -> None:
    state = RoundState(3, 0.0, RoundPolicy(min_clients=2))
    seen = {b"x" * 16}
    assert state.check(device="a", round_number=3, msg_id=b"n" * 16, seen=seen) is None
    assert state.check(device="a", round_number=3, msg_id=b"x" * 16, seen=seen) == "replay"
    assert state.check(device="a", round_number=2, msg_id=b"n" * 16, seen=seen) == "stale_round"
    assert state.check(device="a", round_number=4, msg_id=b"n" * 16, seen=seen) == "future_round"
    state.accept(accepted("a"))
    assert state.check(device="a", round_number=3, msg_id=b"m" * 16, seen=seen) == "duplicate_in_round"


def test_ready_on_min_clients_or_deadline_with_quorum() -> None:
    state = RoundState(1, 100.0, RoundPolicy(min_clients=3, quorum=2, deadline_s=60))
    state.accept(accepted("a"))
    assert not state.ready(100.0)
    assert not state.ready(200.0)  # deadline passed but below quorum
    state.accept(accepted("b"))
    assert not state.ready(150.0)
    assert state.ready(160.0)
    state.accept(accepted("c"))
    assert state.ready(101.0)
    assert state.waiting_for() == 0


def test_train_summary_is_sample_weighted() -> None:
    state = RoundState(1, 0.0, RoundPolicy())
    state.accept(accepted("a", 10, 1.0))
    state.accept(accepted("b", 30, 2.0))
    assert state.train_summary()["train_loss"] == pytest.approx(1.75)


def test_policy_validation() -> None:
    with pytest.raises(ValueError):
        RoundPolicy(min_clients=2, quorum=3)
    with pytest.raises(ValueError):
        RoundPolicy(min_clients=0)


def test_adaptive_deadline_follows_the_slow_devices_within_bounds() -> None:
    fixed = RoundPolicy(1, 1, 10.0)
    assert fixed.deadline_for([100.0]) == 10.0  # not adaptive unless asked
    policy = RoundPolicy(1, 1, 10.0, adapt_factor=1.5, deadline_max_s=60.0)
    assert policy.deadline_for([]) == 10.0
    assert policy.deadline_for([1.0, 2.0, 3.0]) == 10.0  # fast devices never shorten it
    assert policy.deadline_for([0.1, 20.0]) == 30.0  # with few devices p90 is the slowest
    assert policy.deadline_for([1.0] * 8 + [20.0, 20.0]) == 30.0
    assert policy.deadline_for([1.0] * 19 + [1000.0]) == 10.0  # one outlier in twenty does not stretch it
    assert policy.deadline_for([1000.0, float("nan"), -5.0]) == 60.0  # bounded; junk ignored
    assert RoundPolicy(1, 1, 10.0, adapt_factor=2.0).deadline_for([80.0]) == 100.0  # default bound 10 x
    assert RoundPolicy(1, 1, 0.0, adapt_factor=2.0).deadline_for([80.0]) == 0.0  # no deadline stays none
    with pytest.raises(ValueError):
        RoundPolicy(1, 1, 10.0, adapt_factor=float("nan"))
