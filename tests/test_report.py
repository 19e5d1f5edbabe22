"""`fledger report` on a real MNIST run (coordinator + agents as processes): plots, the
confusion matrix of the current model, and refusal of a model the ledger does not record.
Plus the clear errors when an optional extra (matplotlib, prometheus_client) is missing."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from browser import assert_not_blank, load_png
from conftest import BrokerInfo
from federation_run import Federation

from federation.config import ConfigError
from federation.observability import prometheus
from fledger import cli


def test_report_of_an_mnist_run_with_confusion_matrix(embedded_broker: BrokerInfo, tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    fed = Federation(tmp_path, embedded_broker.host, embedded_broker.port, task="mnist", rounds=1, limit=200)
    try:
        fed.start_all()
        assert fed.wait("coordinator", 300) == 0, fed.log_tail()
    finally:
        fed.stop()
    out = tmp_path / "report"
    report = [sys.executable, "-m", "fledger.cli", "report", "--ledger", str(fed.state / "ledger.log"),
              "--out", str(out)]
    done = subprocess.run(report, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == "mnist" and [r["round"] for r in summary["rounds"]] == [1]
    assert all(r["participants"] == ["edge-1", "edge-2"] for r in summary["rounds"])
    # The coordinator ran without --evaluate: the report evaluated the saved models itself,
    # and the confusion matrix is of the same current model on the whole test set.
    matrix = np.array(summary["confusion_matrix"])
    assert matrix.shape == (10, 10) and matrix.sum() == 10_000
    accuracy = summary["rounds"][-1]["metrics"]["test_accuracy"]
    assert matrix.trace() / matrix.sum() == pytest.approx(accuracy)
    assert accuracy > 0.2  # one short round on 400 images: well above chance (0.1)
    for name in ("metric.png", "participation.png", "rejections.png", "confusion.png"):
        assert_not_blank(load_png(out / name))
    confusion = load_png(out / "confusion.png")
    assert confusion.shape[0] > 400 and confusion.shape[1] > 400

    # A model file swapped for another is refused: the report shows only what the ledger records.
    models = fed.state / "models"
    shutil.copy(models / "global-000001.safetensors", models / "global-000002.safetensors")
    assert cli.main(report[3:]) == 2
    assert "not the model the ledger records for round 1" in caplog.text


def test_missing_extras_are_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                  caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # as if not installed
    with pytest.raises(ConfigError, match=r"pip install 'fledger\[metrics\]'"):
        prometheus()
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    ledger = tmp_path / "ledger.log"
    assert cli.main(["report", "--ledger", str(ledger), "--out", str(tmp_path / "out")]) == 2
    assert "pip install 'fledger[report]'" in caplog.text
    assert not (tmp_path / "out").exists()  # nothing half-done


def test_metrics_port_without_prometheus_client_refuses_to_start(monkeypatch: pytest.MonkeyPatch) -> None:
    from coordinator.observe import Observatory
    from federation.topics import Topics

    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    with pytest.raises(ConfigError, match="prometheus_client"):
        Observatory(Topics("plant7"), task="csv", metrics_port=9, dashboard_port=0)


def signed_run(path: Path) -> Any:
    """A small signed ledger: round 1 aggregated, round 2 open with an update in it, and rejections
    recorded before any round opened, in round 1, and in the open round (one claiming round 1)."""
    from federation import records
    from federation.fleet_state import FleetLedger
    from ledger import Ed25519Signer

    devices = {name: Ed25519Signer(bytes([i + 1] * 32)) for i, name in enumerate(("d1", "d2", "d3"))}

    def update(device: str, round_number: int, samples: int) -> dict[str, Any]:
        signer = devices[device]
        msg_id = f"{device}{round_number}".ljust(16).encode()
        st = records.statement("plant7", device, round_number, signer.key_id, msg_id, bytes(32), samples,
                               {"train_loss": 0.5})
        return records.update(st, signer.sign(st))

    ledger = FleetLedger.open(path, signer=Ed25519Signer(bytes(range(32))), fleet="plant7")
    for name, signer in devices.items():
        ledger.append(records.device_key(name, signer.public_key))
    ledger.append(records.model_published(1, b"\x00" * 32, initial=True, task={"task": "california"}))
    ledger.append(records.update_rejected("d3", None, "malformed", b"\x03" * 32))  # before round 1 opened
    ledger.append(records.round_opened(1))
    ledger.append(update("d1", 1, 30))
    ledger.append(records.update_rejected("d2", 1, "bad_tensors", b"\x04" * 32))
    ledger.append(update("d2", 1, 10))
    ledger.append(records.aggregate(1, ["d1", "d2"], b"\x01" * 32, "fedavg",
                                    {"test_mse": 0.25, "clients_train_loss": 0.5, "test_accuracy": None},
                                    merkle_root=ledger.state.merkle_root_for(1), num_samples=40))
    ledger.append(records.round_opened(2))
    ledger.append(records.model_published(2, b"\x01" * 32))
    ledger.append(records.update_rejected("d2", 1, "stale_round", b"\x05" * 32))  # claims round 1: counted in 2
    ledger.append(records.update_rejected("d3", 2, "bad_signature", b"\x06" * 32))
    ledger.append(update("d1", 2, 30))
    return ledger


def test_summary_of_a_ledger_with_rejections_in_the_open_round(tmp_path: Path) -> None:
    """`fledger report`'s summary.json, exactly: rejections by the round open when recorded, those of
    rounds not aggregated (here before round 1 and in the open round 2) under rejected_in_open_round."""
    from fledger.report import summarize_ledger

    with signed_run(tmp_path / "ledger.log") as ledger:
        summary = summarize_ledger(ledger)
        head, height = ledger.head.hash.hex(), ledger.height
    assert summary.to_json() == {
        "fleet": "plant7", "task": "california", "height": height, "head": head,
        "rounds": [{"round": 1, "participants": ["d1", "d2"], "num_samples": 40,
                    "metrics": {"test_mse": 0.25, "clients_train_loss": 0.5, "test_accuracy": None},
                    "model_sha256": "01" * 32, "block": 10, "rejected": {"bad_tensors": 1}}],
        "rejected_in_open_round": {"malformed": 1, "stale_round": 1, "bad_signature": 1},
        "confusion_matrix": None,
    }
    assert height == 16


def test_dashboard_view_of_the_same_ledger(tmp_path: Path) -> None:
    """The dashboard's snapshot, fed the same blocks one by one: the open round shows only its own rejections."""
    from coordinator.fleet_view import FleetView

    view = FleetView("plant7")
    with signed_run(tmp_path / "ledger.log") as ledger:
        blocks = list(ledger)
    for block in blocks:
        view.add_block(block)
    snapshot = view.snapshot()
    aggregate = blocks[10]
    assert snapshot["task"] == "california" and snapshot["fleet"] == "plant7" and snapshot["status"] == {}
    assert snapshot["rounds"] == [{
        "round": 1, "participants": ["d1", "d2"], "num_samples": 40,
        "metrics": {"test_mse": 0.25, "clients_train_loss": 0.5, "test_accuracy": None}, "strategy": "fedavg",
        "block": 10, "hash": aggregate.hash.hex(), "time": aggregate.timestamp, "rejected": {"bad_tensors": 1}}]
    assert snapshot["open_round"] == {"round": 2, "rejected": {"stale_round": 1, "bad_signature": 1}}
    assert snapshot["ledger"]["height"] == 16 and snapshot["ledger"]["head"] == blocks[-1].hash.hex()
    assert [r["what"] for r in snapshot["ledger"]["recent"]][:9] == [
        "d1: update for round 2 (30 samples)", "d3: update rejected (bad_signature)",
        "d2: update rejected (stale_round)", "model for round 2 published", "round 2 opened",
        "round 1 aggregated from 2 devices", "d2: update for round 1 (10 samples)",
        "d2: update rejected (bad_tensors)", "d1: update for round 1 (30 samples)"]
    assert [r["what"] for r in snapshot["ledger"]["recent"]][-5:] == [
        "model for round 1 published (initial)", "d3: key " + blocks[3].data["key_id"] + " registered",
        "d2: key " + blocks[2].data["key_id"] + " registered", "d1: key " + blocks[1].data["key_id"] + " registered",
        "fleet plant7 founded"]
