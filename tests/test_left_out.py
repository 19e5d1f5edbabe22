"""A device learns when its accepted update was left out of the aggregate, and why (real
processes, mosquitto); so does a gateway whose update its upstream left out.

An update can be accepted (its acknowledgement says so) and still not be counted: a robust
strategy excludes an update far from the round's others, as it would a poisoned one, and honest
devices whose data differs get the same treatment. The aggregate block travels, signed, with the
next model; the device reads its own entry there and logs it, instead of believing it took part.
Here clipped-fedavg runs with both factors at 1, so of two devices the one farther from the
global model is left out every round. Both roles read the block with
``federation.verdicts.left_out``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from conftest import BrokerInfo
from federation_run import Federation
from test_gateways import _records
from test_gateways_reliability import DATASET, DEVICES, _gateway_model, _link, _next, _register, _train, tiers
from test_observability import scrape, value
from test_reliability import finish, ledger_records, log_text, wait_for

from federation import deltas, envelope
from federation.codec import decode_tensors
from federation.fleet_state import verify_file
from federation.keys import DeviceBundle
from federation.topics import Topics
from federation.verdicts import LeftOut, left_out
from fledger import keytool
from fledger.broker import free_port

CLIPPED_FEDAVG_BOTH_AT_1 = ["--strategy", "clipped-fedavg", "--clip-factor", "1", "--exclude-factor", "1"]


def test_left_out_reads_a_devices_own_exclusion_from_the_aggregate_block_and_never_raises() -> None:
    block: dict[str, Any] = {
        "type": "aggregate", "round": 3, "participants": ["b"],
        "excluded": {"a": {"action": "excluded", "reason": "distance", "distance": 1.89512, "factor": 5.95891,
                           "median_distance": None}},
        "clipped": {"b": {"action": "clipped", "reason": "distance", "distance": 0.3, "scale": 0.5}}}
    why = left_out(block, "a")
    assert why == LeftOut(3, "distance", {"distance": 1.89512, "factor": 5.95891, "median_distance": None})
    assert str(why) == "distance (distance 1.895, factor 5.959, median_distance None)"
    assert left_out(block, "b") is None  # clipped: scaled back, but still used
    assert left_out(block, "c") is None  # not named: counted (or not in this round at all)
    assert left_out({**block, "excluded": {"a": {}}}, "a") == LeftOut(3, "no reason given", {})
    for malformed in (None, [], "aggregate", {}, {**block, "type": "model.published"}, {**block, "round": "3"},
                      {**block, "round": True}, {k: v for k, v in block.items() if k != "round"},
                      {**block, "excluded": ["a"]}, {**block, "excluded": {"a": "distance"}},
                      {**block, "excluded": None}):
        assert left_out(malformed, "a") is None, malformed


def test_a_device_left_out_of_the_aggregate_is_told_why(mosquitto_broker: BrokerInfo, tmp_path: Path) -> None:
    broker = mosquitto_broker
    fed = Federation(tmp_path, broker.host, broker.port, rounds=3,
                     extra_coordinator=CLIPPED_FEDAVG_BOTH_AT_1)
    try:
        fed.start_coordinator()
        for i, limit in enumerate((64, 800)):  # different amounts of data: different distances
            fed.limit = limit
            fed.start_agent(i)
        finish(fed)
    finally:
        fed.stop()
    aggregates = [r for r in ledger_records(fed) if r["type"] == "aggregate"]
    left_out = [(a["round"], device) for a in aggregates for device in a.get("excluded", {})]
    assert left_out, aggregates  # with both factors at 1 the farther update is left out
    for round_number, device in left_out:
        lines = [line for line in log_text(fed, device).splitlines()
                 if f"round {round_number}: the coordinator accepted our update but left it out of the aggregate"
                    ": distance (" in line]
        assert len(lines) == 1, log_text(fed, device)  # told once, though the model may arrive again
    for a in aggregates:  # and a device that was counted hears nothing of the kind
        for device in set(a["participants"]):
            assert f"round {a['round']}: the coordinator accepted our update but left it out" \
                not in log_text(fed, device)


def test_a_gateway_whose_update_the_upstream_left_out_is_told_why_and_counts_it(tmp_path: Path) -> None:
    # The top waits for two of its devices: the gateway gwa (its devices are this test) and gwb
    # (this test too). gwb moves the model a little, gwa's devices a lot: with both factors at 1
    # the top accepts gwa's aggregated update and leaves it out, which gwa must say and count.
    metrics_port = free_port()
    with tiers(tmp_path, "--min-clients", "2", *CLIPPED_FEDAVG_BOTH_AT_1, top_gateways=("gwa", "gwb"),
               gateway_extra=("--metrics-port", str(metrics_port))) as t:
        gwb = DeviceBundle.load(keytool.bundle_path(tmp_path / "keys" / "top", "gwb"))
        low = _link(t.low_port, "test-devices", [Topics("gwa").model, Topics("gwa").model_chunks])
        top = _link(t.top_port, "test-gwb", [Topics("top").model, Topics("top").model_chunks])
        try:
            header, body = envelope.open_model(_next(top, Topics("top").model, 60), gwb, max_bytes=1 << 26)
            top_model = decode_tensors(body)
            top.publish(Topics("top").register("gwb"), envelope.seal_dataset(gwb, DATASET, 1, {}))
            top.publish(Topics("top").update("gwb"), deltas.seal_trained(
                gwb, header.round, {k: v + 0.001 for k, v in top_model.items()}, top_model, 5,
                {"train_loss": 0.5}, dataset_sha256=DATASET))
            base = _gateway_model(low, t, 1)
            for registered, device in enumerate(DEVICES, start=1):
                _register(t, low, device, DATASET, registered)
            _train(t, low, 1, base, np.random.default_rng(3), dict.fromkeys(DEVICES, DATASET))
            told = "upstream round 1: the upstream accepted our update but left it out of its aggregate: distance ("
            wait_for("the gateway's line", lambda: told in t.log("gwa"), 60)
            excluded = "fledger_coordinator_upstream_excluded_total"
            wait_for("the gateway's metric", lambda: value(scrape(metrics_port), excluded, reason="distance") == 1, 10)
        finally:
            low.stop()
            top.stop()
        aggregate, = [r for r in _records(tmp_path / "top") if r["type"] == "aggregate"]
        assert list(aggregate["excluded"]) == ["gwa"] and aggregate["participants"] == ["gwb"]
        assert t.log("gwa").count(told) == 1  # once, though the upstream's model may arrive again
        assert "the upstream accepted our update for its round 1" in t.log("gwa")  # accepted, then left out
    for level in ("top", "gwa"):
        assert verify_file(tmp_path / level / "ledger.log").ok, level
