"""A gateway's rounds on the coordinator's side (coordinator/gateway.py): where a restarted
gateway stands, and which upstream models it takes. No broker: the upstream link is the daemon's."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from test_coordinator import TOPICS, Harness, weights

from coordinator.gateway import awaits_upstream
from federation import records
from federation.codec import CodecError
from federation.fleet_state import FleetState


def fold(last_model: str | None, published: set[int]) -> FleetState:
    state = FleetState()
    state.model_block = None if last_model is None else SimpleNamespace(data={"type": last_model})  # type: ignore[assignment]
    state.published_rounds = published
    return state


def test_a_restarted_gateway_waits_only_after_an_aggregate_whose_next_round_has_no_model() -> None:
    assert awaits_upstream(fold(records.AGGREGATE, {1}), 2, done=False)  # stopped before the upstream's answer
    assert not awaits_upstream(fold(records.AGGREGATE, {1, 2}), 2, done=False)  # a crash after the record
    assert not awaits_upstream(fold(records.MODEL_PUBLISHED, {1, 2}), 2, done=False)  # the answer was adopted
    assert not awaits_upstream(fold(records.AGGREGATE, {1}), 2, done=True)  # the run is over
    assert not awaits_upstream(fold(None, set()), 1, done=False)


def models_published(h: Harness) -> int:
    return sum(1 for t, _, _ in h.published if t == TOPICS.model)


def test_a_gateway_takes_an_upstream_model_only_while_a_round_waits_and_only_of_its_own_shape(
        tmp_path: Path) -> None:
    h = Harness(tmp_path, strategy="fedavg", gateway=True)
    c = h.coordinator
    height, published = c.ledger.head.index, models_published(h)
    assert not c.adopt_upstream_model(weights(9.0), {"round": 7})  # round 1 trains from its own model
    assert (c.ledger.head.index, models_published(h)) == (height, published)
    np.testing.assert_allclose(c.global_model["w"], 0.0)
    assert h.send("dev-a", h.update("dev-a", 1, weights(1.0))).accepted
    assert h.send("dev-b", h.update("dev-b", 1, weights(3.0))).accepted
    assert c.awaiting_upstream and len(h.upstream) == 1
    wrong: dict[str, Any] = {"w": np.zeros((2, 2), np.float32), "b": np.zeros(3, np.float32)}
    with pytest.raises(CodecError):
        c.adopt_upstream_model(wrong, {"round": 2})
    assert c.awaiting_upstream and models_published(h) == published  # still waiting, nothing sent
    c.halted = "disk full"
    assert not c.adopt_upstream_model(weights(2.0), {"round": 2})  # a halted gateway records nothing
    c.halted = None
    assert c.adopt_upstream_model(weights(2.0), {"round": 2})
    assert not c.awaiting_upstream and models_published(h) == published + 1
    assert c.fleet_state.model_block is not None
    assert c.fleet_state.model_block.data["upstream"] == {"round": 2}


def test_a_coordinator_without_upstream_has_no_gateway_and_takes_no_upstream_model(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    assert h.coordinator.gateway is None and not h.coordinator.awaiting_upstream
    assert not h.coordinator.adopt_upstream_model(weights(1.0), {"round": 1}, replace_open_round=True)
