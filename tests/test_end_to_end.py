"""Coordinator and two agents as separate processes, through a real broker: the embedded
amqtt and a mosquitto started by the test."""

from __future__ import annotations

from pathlib import Path

from conftest import BrokerInfo
from federation_run import Federation

from federation.fleet_state import FleetLedger, verify_file


def test_federated_rounds_over_a_real_broker(any_broker: BrokerInfo, tmp_path: Path) -> None:
    fed = Federation(tmp_path, any_broker.host, any_broker.port, rounds=2, limit=400)
    try:
        fed.start_all()
        code = fed.wait("coordinator", 240)
        assert code == 0, f"coordinator exited with {code}\n{fed.log_tail()}"
        for device in fed.devices:
            code = fed.wait(device, 60)
            assert code == 0, f"{device} exited with {code}\n{fed.log_tail()}"
    finally:
        fed.stop()
    report = verify_file(fed.state / "ledger.log")
    assert report.ok, report
    blocks = list(FleetLedger.open(fed.state / "ledger.log"))
    aggregates = [b.data for b in blocks if b.data["type"] == "aggregate"]
    assert [a["round"] for a in aggregates] == [1, 2]
    assert all(a["participants"] == ["edge-1", "edge-2"] for a in aggregates)
    updates = [b.data for b in blocks if b.data["type"] == "update"]
    assert len(updates) == 4 and all(u["num_samples"] == 400 for u in updates)
    # Training helped: the clients' own test error fell from the initial model to the end.
    first = [u["metrics"]["global_test_mse"] for u in updates if u["round"] == 1]
    last = [u["metrics"]["test_mse"] for u in updates if u["round"] == 2]
    assert max(last) < min(first)
    assert (fed.state / "models" / "global-000003.safetensors").exists()
