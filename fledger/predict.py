"""``fledger predict``: predictions from a saved global model, in the data's own units.

The model file is checked against the ledger when one is given (its SHA-256 must be the
model hash of an aggregation or initial-model block), so a prediction can always name the
round and block that produced the model: the basis for paid predictions with receipts.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from coordinator.storage import read_model_file
from federation.codec import TensorDict, encode_tensors
from federation.datasets import Standardizer
from fledger.remote_predict import REMOTE_HELP, add_remote_arguments


class PredictError(ValueError):
    pass


def load_model_file(path: Path) -> TensorDict:
    """A global model saved by the coordinator."""
    if not path.exists():
        raise PredictError(f"model file not found: {path}")
    return read_model_file(path)


def ledger_block_for(model: TensorDict, ledger_path: Path) -> Any:
    """The ledger block that records this exact model, or PredictError."""
    from federation.fleet_state import FleetLedger

    digest = hashlib.sha256(encode_tensors(model)).digest()
    with FleetLedger.open(ledger_path) as ledger:
        block = ledger.state.model_blocks.get(digest)
    if block is not None:
        return block
    raise PredictError(f"this model ({digest.hex()[:16]}) is not recorded in {ledger_path}: refusing to use it")


def read_rows(path: Path, columns: list[str]) -> tuple[np.ndarray, list[dict[str, str]]]:
    try:
        with open(path, newline="") as handle:
            rows = list(csv.DictReader(handle))
    except OSError as exc:
        raise PredictError(f"cannot read {path}: {exc}") from exc
    if not rows:
        raise PredictError(f"{path} has no data rows")
    missing = [c for c in columns if c not in rows[0]]
    if missing:
        raise PredictError(f"{path} lacks the model's feature columns {missing}")
    try:
        values = np.array([[float(row[c]) for c in columns] for row in rows], dtype=np.float32)
    except (ValueError, TypeError) as exc:  # TypeError: a short row leaves cells None
        raise PredictError(f"{path}: a feature value is missing or not a number: {exc}") from exc
    if not np.isfinite(values).all():
        raise PredictError(f"{path}: features contain NaN or Inf")
    return values, rows


def add_parser(sub: Any) -> None:
    p = sub.add_parser("predict", help="predict with a saved global model, or buy predictions (--remote)",
                       description=__doc__ + REMOTE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None,
                   help="global model file (models/global-RRRRRR.safetensors); required unless --remote")
    p.add_argument("--data", type=Path, required=True,
                   help="CSV with the model's feature columns (for --remote --task mnist: a .npy of uint8 "
                        "[n, 28, 28] images)")
    p.add_argument("--task", default="california", choices=["california", "csv", "mnist"],
                   help="default: california (mnist only with --remote)")
    p.add_argument("--scaler", type=Path, default=None,
                   help="an agent's scaler.json (feature and target standardisers); required for task csv; "
                        "for california the whole training split's standardisers are used by default")
    p.add_argument("--ledger", type=Path, default=None,
                   help="refuse a model that this ledger does not record; name its round and block")
    add_remote_arguments(p)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    if args.remote:
        from fledger.remote_predict import predict_remote

        return predict_remote(args)
    # torch only for a local prediction: --help and --remote start fast and run without it.
    import torch

    from federation.tasks import CaliforniaTask, get_task

    if args.model is None:
        raise PredictError("--model is required (or --remote to ask the fleet's coordinator)")
    if args.task == "mnist":
        raise PredictError("local predictions are for regression tasks; use --remote for mnist")
    if args.scaler is not None:
        try:
            scaler = json.loads(args.scaler.read_text())
            x_scaler, y_scaler = Standardizer.from_dict(scaler["features"]), Standardizer.from_dict(scaler["target"])
            columns = list(scaler["feature_names"])
        except (ValueError, TypeError, KeyError) as exc:
            raise PredictError(f"{args.scaler}: not an agent's scaler.json ({exc!r})") from None
    elif args.task == "california":
        task = CaliforniaTask()
        x_scaler, y_scaler = task.central_scalers()
        columns = list(task.table().feature_names)
    else:
        raise PredictError("task csv needs --scaler (the agent's scaler.json)")
    model_weights = load_model_file(args.model)
    provenance = ""
    if args.ledger is not None:
        block = ledger_block_for(model_weights, args.ledger)
        provenance = f" (model of round {block.data['round']}, ledger block {block.index} {block.hash.hex()[:16]})"
    model = (get_task("csv", n_features=len(columns)) if args.task == "csv" else get_task(args.task)).build_model()
    model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in model_weights.items()})
    model.eval()
    values, rows = read_rows(args.data, columns)
    with torch.no_grad():
        out = model(torch.from_numpy(x_scaler.transform(values))).reshape(-1).numpy()
    predictions = y_scaler.inverse_transform(out)
    writer = csv.writer(sys.stdout)
    writer.writerow(["row", "prediction"])
    for i, value in enumerate(predictions):
        writer.writerow([i, f"{float(value):.6g}"])
    print(f"# {len(rows)} predictions{provenance}", file=sys.stderr)
    return 0
