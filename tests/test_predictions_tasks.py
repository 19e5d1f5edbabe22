"""Paid predictions for every task: a CSV task (the scaler from an agent's scaler.json) and MNIST
(class probabilities), through the real coordinator and `fledger predict --remote` processes;
the CSV answer equals the local form's (`fledger predict --model`) on the same model."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from coordinator.inference import RegressionPredictor, load_scaler, make_predictor, scaler_digest
from federation.datasets import Standardizer
from fledger import keytool
from tests.conftest import BrokerInfo
from tests.federation_run import Federation

FEATURES = ["temp", "load", "rpm"]
SCALER = {"features": Standardizer(np.array([20.0, 0.5, 1500.0], np.float32),
                                   np.array([5.0, 0.2, 300.0], np.float32)).to_dict(),
          "target": Standardizer(np.array([70.0], np.float32), np.array([8.0], np.float32)).to_dict(),
          "feature_names": FEATURES}
ROWS = "rpm,temp,load\n1500,21.5,0.4\n1800,30.0,0.9\n900,12.0,0.1\n"  # columns in another order than the model's


def test_a_csv_tasks_predictor_maps_to_original_units_with_the_agents_scaler(tmp_path: Path) -> None:
    import torch

    scaler = tmp_path / "scaler.json"
    scaler.write_text(json.dumps(SCALER))
    predictor = make_predictor("csv", n_features=3, scaler=scaler)
    assert isinstance(predictor, RegressionPredictor) and predictor.output == "values"
    torch.manual_seed(0)
    model = predictor.task.build_model()
    weights = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    x = np.array([[21.5, 0.4, 1500.0]], np.float32)
    with torch.no_grad():
        scaled = model(torch.from_numpy((x - [20.0, 0.5, 1500.0]) / [5.0, 0.2, 300.0]).float()).reshape(-1).numpy()
    np.testing.assert_allclose(predictor(b"m", weights, x), scaled * 8.0 + 70.0, rtol=1e-5)
    with pytest.raises(ValueError, match="need --predict-scaler"):
        make_predictor("csv", n_features=3)
    with pytest.raises(ValueError, match="the scaler has 3 features, the model 4"):
        make_predictor("csv", n_features=4, scaler=scaler)
    scaler.write_text("{}")
    with pytest.raises(ValueError, match=r"not an agent's scaler\.json"):
        make_predictor("csv", n_features=3, scaler=scaler)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "fledger.cli", "--log-level", "WARNING", *args]


def _run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


@pytest.mark.parametrize("task", ["csv", "mnist"])
def test_paid_predictions_for_a_csv_task_and_for_mnist(embedded_broker: BrokerInfo, tmp_path: Path,
                                                       task: str) -> None:
    scaler = tmp_path / "scaler.json"
    scaler.write_text(json.dumps(SCALER))
    extra = ["--csv-features", "3", "--predict-scaler", str(scaler)] if task == "csv" else []
    fed = Federation(tmp_path, embedded_broker.host, embedded_broker.port, task=task, devices=("edge-1",), rounds=0,
                     extra_coordinator=["--predict-fee", "2", "--predict-fee-per", "row", *extra])
    keytool.add_client(fed.keys, "alice")
    fed.extra_coordinator += ["--clients", str(fed.keys / keytool.CLIENTS_FILE)]
    broker = fed.broker_args()
    if task == "csv":
        data = tmp_path / "rows.csv"
        data.write_text(ROWS)
        inputs = ["--task", "csv", "--scaler", str(scaler), "--data", str(data)]
    else:
        data = tmp_path / "images.npy"
        images = np.random.default_rng(0).integers(0, 256, size=(3, 28, 28), dtype=np.uint8)
        np.save(data, images)
        inputs = ["--task", "mnist", "--data", str(data)]
    try:
        fed.start_coordinator()
        deposit = _run(_cli("credits", "deposit", "alice", "10", "--keys", str(fed.keys / keytool.COORDINATOR_FILE),
                            *broker, "--timeout", "90"))
        assert deposit.returncode == 0, deposit.stderr + fed.log_tail()
        answered = _run(_cli("predict", "--remote", *inputs, "--bundle",
                             str(keytool.client_bundle_path(fed.keys, "alice")), *broker, "--timeout", "90"))
        assert answered.returncode == 0, answered.stderr + fed.log_tail()
        assert "fee 6, balance 4" in answered.stderr  # 3 rows at 2 each
        if task == "csv":  # the scaler that gave original units is named with the model
            assert f"scaler {scaler_digest(*load_scaler(scaler)).hex()[:16]}" in answered.stderr
        lines = answered.stdout.strip().splitlines()
        if task == "mnist":
            assert lines[0] == "row,class," + ",".join(f"p{i}" for i in range(10)) and len(lines) == 4
            for line in lines[1:]:
                cells = line.split(",")
                probabilities = [float(p) for p in cells[2:]]
                assert abs(sum(probabilities) - 1.0) < 1e-4 and int(cells[1]) == int(np.argmax(probabilities))
        else:
            # The same model and scaler run locally give the same values in the target's units.
            deadline = time.monotonic() + 30
            models = fed.state / "models"
            while not list(models.glob("global-*.safetensors")):
                assert time.monotonic() < deadline
                time.sleep(0.2)
            [model] = list(models.glob("global-*.safetensors"))
            local = _run(_cli("predict", "--task", "csv", "--model", str(model), "--scaler", str(scaler),
                              "--data", str(data)))
            assert local.returncode == 0, local.stderr
            remote_values = [float(line.split(",")[1]) for line in lines[1:]]
            local_values = [float(line.split(",")[1]) for line in local.stdout.strip().splitlines()[1:]]
            assert lines[0] == "row,prediction" and len(remote_values) == 3
            np.testing.assert_allclose(remote_values, local_values, rtol=1e-5)
            assert all(30.0 < v < 110.0 for v in remote_values)  # around the target's mean 70, not ~0
    finally:
        fed.stop()
