"""A run stops when told: at a target metric (--stop-at, or stop_at in the TOML file)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import BrokerInfo
from federation_run import Federation

from coordinator.stopping import StopTarget, stop_target
from federation.config import ConfigError
from ledger import Ledger, verify_file

ROOT = Path(__file__).resolve().parent.parent


def test_a_target_is_reached_by_a_finite_value_on_its_side_only() -> None:
    lower = StopTarget.parse("test_mse <= 0.25")
    assert str(lower) == "test_mse<=0.25"
    assert lower.reached({"test_mse": 0.25}) and lower.reached({"test_mse": 0.1})
    assert not lower.reached({"test_mse": 0.26})
    assert not lower.reached({"test_mse": None})  # a failed or diverged evaluation is recorded as None
    assert not lower.reached({"test_mse": float("nan")})
    assert not lower.reached({"clients_test_mse": 0.1})  # another metric
    higher = StopTarget.parse("test_accuracy>=0.98")
    assert higher.reached({"test_accuracy": 0.981}) and not higher.reached({"test_accuracy": 0.97})


@pytest.mark.parametrize(("text", "task", "evaluates", "complaint"), [
    ("test_mse<0.25", "california", True, "METRIC<=VALUE"),
    ("test_mse<=lots", "california", True, "not a number"),
    ("test_mse<=inf", "california", True, "finite"),
    ("test_mae<=0.25", "california", True, "choose from test_mse, clients_train_loss"),
    ("test_accuracy>=0.9", "california", True, "records no metric"),  # regression: no accuracy
    ("test_mse<=0.25", "california", False, "add --evaluate"),
    ("test_mse<=0.25", "csv", True, "records no metric"),  # the coordinator has no csv test set
])
def test_a_target_the_run_could_never_reach_is_refused_at_start(text: str, task: str, evaluates: bool,
                                                                complaint: str) -> None:
    with pytest.raises(ConfigError, match=complaint):
        stop_target(text, task=task, evaluates=evaluates)


def test_accepted_targets() -> None:
    assert stop_target("", task="csv", evaluates=False) is None
    assert stop_target("clients_test_mse<=0.1", task="csv", evaluates=False) == \
        StopTarget("clients_test_mse", "<=", 0.1)
    assert stop_target("test_accuracy>=0.98", task="mnist", evaluates=True) == StopTarget("test_accuracy", ">=", 0.98)


def aggregates(ledger_path: Path) -> list[dict[str, object]]:
    with Ledger.open(ledger_path) as ledger:
        return [block.data for block in ledger if block.data.get("type") == "aggregate"]


def test_the_coordinator_stops_at_its_target_and_the_agent_with_it(embedded_broker: BrokerInfo,
                                                                     tmp_path: Path) -> None:
    config = tmp_path / "coordinator.toml"
    config.write_text('[coordinator]\nstop_at = "clients_test_mse <= 0.025"\n')  # also from the TOML file
    fed = Federation(tmp_path, embedded_broker.host, embedded_broker.port, task="csv", devices=("pump-01",),
                     rounds=20, limit=0,  # a bound for the test only: the target ends the run well before
                     extra_coordinator=["--csv-features", "8", "--config", str(config)],
                     extra_agent=["--data", str(ROOT / "examples" / "pump-readings.csv"), "--target", "bearing_temp_c"])
    try:
        fed.start_all()
        assert fed.wait("coordinator", timeout=240) == 0, fed.log_tail()
        assert fed.wait("pump-01", timeout=60) == 0, fed.log_tail()  # as after --rounds: told training is done
    finally:
        fed.stop()
    ledger_path = fed.state / "ledger.log"
    rounds = aggregates(ledger_path)
    last = rounds[-1]
    assert last["round"] < 20 and last.get("stop_target") == "clients_test_mse<=0.025", fed.log_tail()
    # It stopped at the first round whose recorded metric met the target, not before or after.
    metric = [float(r["metrics"]["clients_test_mse"]) for r in rounds]  # type: ignore[index]
    assert metric[-1] <= 0.025 and all(m > 0.025 for m in metric[:-1]), metric
    assert not any("stop_target" in r for r in rounds[:-1])
    assert verify_file(ledger_path).ok  # the record with its stop_target verifies like any other
    with Ledger.open(ledger_path) as ledger:
        opened = [b.data["round"] for b in ledger if b.data.get("type") == "round.opened"]
    assert max(opened) == last["round"]  # no round opened after the last one
    coordinator_log = (fed.logs / "coordinator.log").read_text()
    assert f"round {last['round']}: target clients_test_mse<=0.025 reached" in coordinator_log
    assert "finished training" in (fed.logs / "pump-01.log").read_text()

    # Started again with the same target, the run is still over: it exits 0 and adds no round.
    with Ledger.open(ledger_path) as ledger:
        height = ledger.head.index + 1
    fed.start_coordinator()
    try:
        assert fed.wait("coordinator", timeout=60) == 0, fed.log_tail()
    finally:
        fed.stop()
    assert aggregates(ledger_path) == rounds
    with Ledger.open(ledger_path) as ledger:
        assert not [b for b in ledger if b.index >= height and b.data.get("type") in ("round.opened", "aggregate")]


@pytest.mark.parametrize(("flags", "complaint"), [
    (["--stop-at", "test_mse<=0.25"], "choose from clients_train_loss"),  # csv: no central test set
    (["--evaluate"], "no test set for task csv"),  # else it failed after connecting, with a new ledger
])
def test_the_cli_refuses_in_one_line_before_touching_anything(tmp_path: Path, flags: list[str],
                                                              complaint: str) -> None:
    done = subprocess.run([sys.executable, "-m", "fledger.cli", "coordinator", "--task", "csv", "--csv-features", "8",
                           "--state-dir", str(tmp_path / "state"), *flags],
                          capture_output=True, text=True, timeout=60, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert done.returncode == 2 and complaint in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert not (tmp_path / "state").exists()
