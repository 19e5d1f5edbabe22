"""`fledger predict`: predictions in the target's units, from a model the ledger records."""

from __future__ import annotations

import gzip
import hashlib
import subprocess
import sys
from pathlib import Path

import torch

from coordinator.storage import ModelStore
from federation import records
from federation.codec import encode_tensors
from federation.datasets import CALIFORNIA_FILE
from federation.fleet_state import FleetLedger
from federation.tasks import CaliforniaTask
from ledger import Ed25519Signer


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fledger.cli", "--log-level", "WARNING", "predict", *args],
                          capture_output=True, text=True, timeout=120)


def test_predict_names_the_ledger_block_and_refuses_unknown_models(tmp_path: Path) -> None:
    torch.manual_seed(0)
    weights = {k: v.detach().numpy().copy() for k, v in CaliforniaTask().build_model().state_dict().items()}
    model_file = ModelStore(tmp_path / "models").save(1, weights)
    data = tmp_path / "rows.csv"
    data.write_text("\n".join(gzip.decompress(CALIFORNIA_FILE.read_bytes()).decode().splitlines()[:11]) + "\n")
    with FleetLedger.open(tmp_path / "ledger.log", signer=Ed25519Signer.generate(), fleet="f") as ledger:
        block = ledger.append(records.model_published(1, hashlib.sha256(encode_tensors(weights)).digest()))
    ok = run("--model", str(model_file), "--data", str(data), "--ledger", str(tmp_path / "ledger.log"))
    assert ok.returncode == 0, ok.stderr
    lines = ok.stdout.strip().splitlines()
    assert lines[0] == "row,prediction" and len(lines) == 11
    assert all(abs(float(line.split(",")[1])) < 100 for line in lines[1:])  # in $100,000s, not standardised
    assert f"ledger block {block.index}" in ok.stderr

    weights["0.bias"] = weights["0.bias"] + 1.0  # a model nobody recorded
    other = ModelStore(tmp_path / "other").save(1, weights)
    refused = run("--model", str(other), "--data", str(data), "--ledger", str(tmp_path / "ledger.log"))
    assert refused.returncode == 2 and "not recorded" in refused.stderr

    bad = tmp_path / "bad.csv"
    bad.write_text("MedInc,HouseAge\n1,2\n")
    missing = run("--model", str(model_file), "--data", str(bad))
    assert missing.returncode == 2 and "feature columns" in missing.stderr
