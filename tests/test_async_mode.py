"""Asynchronous aggregation (FedBuff) with a slow device, on real processes and mosquitto.

In rounds mode a device slower than the round deadline has every update refused as
stale_round (tests/test_slow_device.py). With ``--mode async --buffer 2`` the coordinator
aggregates every two updates whatever model version each trained from: the slow device's
update counts, down-weighted by its staleness, and the ledger says how stale it was.
"""

from __future__ import annotations

import math
from pathlib import Path

from conftest import BrokerInfo
from federation_run import Federation
from test_reliability import aggregates, ledger_records, log_text, wait_for

from federation.fleet_state import verify_file


def _stale_contribution(fed: Federation) -> list[dict[str, object]]:
    return [a for a in aggregates(fed) if a.get("staleness", {}).get("edge-3", 0) >= 1]


def test_a_slow_devices_update_counts_down_weighted_in_async_mode(mosquitto_broker: BrokerInfo,
                                                                  tmp_path: Path) -> None:
    broker = mosquitto_broker
    fed = Federation(tmp_path, broker.host, broker.port, rounds=0, devices=("edge-1", "edge-2", "edge-3"),
                     extra_coordinator=["--mode", "async", "--buffer", "2", "--max-staleness", "1000",
                                        "--round-deadline", "0", "--keep-models", "0"])
    try:
        fed.start_coordinator()
        fed.limit = 100  # edge-1, edge-2: milliseconds of training
        fed.start_agent(0)
        fed.start_agent(1)
        fed.limit = 5000  # edge-3: far slower; the fast two fill buffers meanwhile
        fed.start_agent(2)
        wait_for("a stale update of edge-3 aggregated", lambda: _stale_contribution(fed), 240, fed)
        wait_for("edge-3 told its update counted", lambda: "the coordinator counted our update"
                 in log_text(fed, "edge-3"), 60, fed)
    finally:
        fed.stop()
    assert verify_file(fed.state / "ledger.log").ok  # the fold's rules check staleness and weights
    records = ledger_records(fed)
    assert not [r for r in records if r["type"] == "update.rejected" and r["device"] == "edge-3"]
    aggregate = _stale_contribution(fed)[0]
    staleness = aggregate["staleness"]["edge-3"]  # type: ignore[index]
    assert aggregate["mode"] == "async" and len(aggregate["participants"]) == 2  # type: ignore[arg-type]
    assert math.isclose(aggregate["weights"]["edge-3"], 1 / math.sqrt(1 + staleness))  # type: ignore[index]
    update = next(r for r in records if r["type"] == "update" and r["device"] == "edge-3"
                  and r.get("version") == aggregate["round"])
    assert update["version"] - update["round"] == staleness  # trained from an older version, counted in this one
