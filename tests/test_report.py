"""`fledger report` on a real MNIST run (coordinator + agents as processes): plots, the
confusion matrix of the current model, and refusal of a model the ledger does not record.
Plus the clear errors when an optional extra (matplotlib, prometheus_client) is missing."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

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
