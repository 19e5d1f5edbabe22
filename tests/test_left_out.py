"""A device learns when its accepted update was left out of the aggregate, and why (real
processes, mosquitto).

An update can be accepted (its acknowledgement says so) and still not be counted: a robust
strategy excludes an update far from the round's others, as it would a poisoned one, and honest
devices whose data differs get the same treatment. The aggregate block travels, signed, with the
next model; the device reads its own entry there and logs it, instead of believing it took part.
Here clipped-fedavg runs with both factors at 1, so of two devices the one farther from the
global model is left out every round.
"""

from __future__ import annotations

from pathlib import Path

from conftest import BrokerInfo
from federation_run import Federation
from test_reliability import finish, ledger_records, log_text


def test_a_device_left_out_of_the_aggregate_is_told_why(mosquitto_broker: BrokerInfo, tmp_path: Path) -> None:
    broker = mosquitto_broker
    fed = Federation(tmp_path, broker.host, broker.port, rounds=3,
                     extra_coordinator=["--strategy", "clipped-fedavg", "--clip-factor", "1", "--exclude-factor", "1"])
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
