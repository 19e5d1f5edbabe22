"""A device that trains longer than the round deadline (real processes, mosquitto).

With a fixed deadline its every update would arrive after its round closed (stale_round) and it
would join no round. Here it is told why (its log names stale_round and what it means), and the
coordinator's adaptive deadline, learnt from the devices' reported training times, lets it join.
"""

from __future__ import annotations

import re
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
    # MNIST: a device's training time follows its number of images (california trains 5,000 rows
    # in ~0.1 s, so a device cut from it was never slow; the test then passed or failed by luck).
    # The factor covers what the device does besides training (two evaluations, the transfers).
    # Plain fedavg: clipped-fedavg would exclude edge-2, whose update (300x edge-1's images) is far
    # from the median distance of two.
    fed = Federation(tmp_path, broker.host, broker.port, rounds=0, task="mnist",
                     extra_coordinator=["--quorum", "1", "--round-deadline", "0.5", "--deadline-factor", "4",
                                        "--round-deadline-max", "120", "--keep-models", "2",
                                        "--strategy", "fedavg"])
    try:
        fed.start_coordinator()
        fed.limit = 64  # edge-1: trains in milliseconds
        fed.start_agent(0)
        fed.limit = 20_000  # edge-2: seconds (~2.5 s here), far beyond the 0.5 s deadline
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
    slow = [float(m) for m in re.findall(r"round \d+: trained on \d+ samples in ([0-9.]+)s", log_text(fed, "edge-2"))]
    assert slow and min(slow) > 0.5, slow  # the device really was slower than the configured deadline
    # Model retention: the last two models stay; the ledger still names every model's hash.
    last = aggs[-1]["round"] + 1
    assert sorted(p.name for p in (fed.state / "models").iterdir()) == [
        f"global-{r:06d}.safetensors" for r in (last - 1, last)]
    assert all(len(a["model_sha256"]) == 32 for a in aggs)
    print(f"\nslow device: stale in rounds {[r['round'] for r in late]}, joined rounds {joined}")
