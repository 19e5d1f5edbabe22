"""A device that trains longer than the round deadline (real processes, mosquitto).

With a fixed deadline its every update would arrive after its round closed (stale_round) and it
would join no round. Here it is told why (its log names stale_round and what it means), and the
coordinator's adaptive deadline, learnt from the devices' reported training times, lets it join.
"""

from __future__ import annotations

from pathlib import Path

from conftest import BrokerInfo
from federation_run import Federation
from test_reliability import aggregates, ledger_records, log_text, wait_for

from federation.fleet_state import verify_file


def test_slow_device_is_told_why_and_joins_once_the_deadline_adapts(mosquitto_broker: BrokerInfo,
                                                                    tmp_path: Path) -> None:
    broker = mosquitto_broker
    # Rounds run until stopped: however loaded the machine, the fast device cannot use them up
    # before the slow one has reported its training time once.
    fed = Federation(tmp_path, broker.host, broker.port, rounds=0,
                     extra_coordinator=["--quorum", "1", "--round-deadline", "0.5", "--deadline-factor", "3",
                                        "--round-deadline-max", "60", "--keep-models", "2"])
    try:
        fed.start_coordinator()
        fed.limit = 100  # edge-1: trains in milliseconds
        fed.start_agent(0)
        fed.limit = 5000  # edge-2: seconds, far beyond the 0.5 s deadline
        fed.start_agent(1)
        wait_for("edge-2 in a round", lambda: [a for a in aggregates(fed) if "edge-2" in a["participants"]],
                 240, fed)
        wait_for("edge-2 told why", lambda: "did not count our update: stale_round (it arrived after its round "
                 "had closed" in log_text(fed, "edge-2"), 60, fed)
    finally:
        fed.stop()
    assert verify_file(fed.state / "ledger.log").ok
    records = ledger_records(fed)
    late = [r for r in records if r["type"] == "update.rejected" and r["device"] == "edge-2"]
    assert late and all(r["reason"] == "stale_round" for r in late), late
    aggs = [r for r in records if r["type"] == "aggregate"]
    joined = [a["round"] for a in aggs if "edge-2" in a["participants"]]
    assert joined and min(joined) > min(r["round"] for r in late)
    assert "adapted to the devices' reported training times" in log_text(fed, "coordinator")
    # Model retention: the last two models stay; the ledger still names every model's hash.
    last = aggs[-1]["round"] + 1
    assert sorted(p.name for p in (fed.state / "models").iterdir()) == [
        f"global-{r:06d}.safetensors" for r in (last - 1, last)]
    assert all(len(a["model_sha256"]) == 32 for a in aggs)
    print(f"\nslow device: stale in rounds {[r['round'] for r in late]}, joined rounds {joined}")
