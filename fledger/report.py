"""``fledger report``: PNG plots of a training run, from the ledger and the saved models alone.

- ``metric.png``: the global model's test metric per round (the coordinator's central
  evaluation when it ran one, else computed here from the saved models when the task's test
  set is at hand) and what the devices reported (sample-weighted means);
- ``participation.png``: devices and training samples per round;
- ``rejections.png``: rejected updates recorded in the ledger, per round and reason;
- ``confusion.png`` (classification tasks): the confusion matrix of the current model;
- ``summary.json``: the numbers behind the plots.

Every model used is checked against the ledger first (its SHA-256 must be the one the
aggregate block records): a report never shows a model the ledger does not vouch for.
Needs the ``report`` extra (matplotlib); the confusion matrix and evaluation need torch.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from federation.config import ConfigError
from federation.fleet_state import FleetLedger

log = logging.getLogger("fledger.report")


class ReportError(ValueError):
    pass


@dataclass
class RoundRow:
    round: int
    participants: list[str]
    num_samples: int
    metrics: dict[str, float | None]
    model_sha256: bytes
    block: int
    rejected: Counter[str] = field(default_factory=Counter)


@dataclass
class RunSummary:
    fleet: str
    task: str | None
    height: int
    head: str
    rounds: list[RoundRow]
    rejected_open_round: Counter[str]  # rejections recorded in the round still open (no aggregate yet)
    confusion: list[list[int]] | None = None  # rows: true class, columns: predicted (current model)

    def to_json(self) -> dict[str, Any]:
        return {
            "fleet": self.fleet, "task": self.task, "height": self.height, "head": self.head,
            "rounds": [{"round": r.round, "participants": r.participants, "num_samples": r.num_samples,
                        "metrics": r.metrics, "model_sha256": r.model_sha256.hex(), "block": r.block,
                        "rejected": dict(r.rejected)} for r in self.rounds],
            "rejected_in_open_round": dict(self.rejected_open_round),
            "confusion_matrix": self.confusion,
        }


def summarize_ledger(ledger: FleetLedger) -> RunSummary:
    """Rounds, participation, metrics and recorded rejections, as the fleet's fold of the chain reads them."""
    history = ledger.state.history
    rounds = [RoundRow(r.round, list(r.participants), r.num_samples or 0, dict(r.metrics), r.model_sha256, r.block,
                       history.rejected_in(r.round))
              for r in history.results.values()]
    return RunSummary(ledger.fleet, history.task, ledger.height, ledger.head.hash.hex(), rounds,
                      history.rejected_unaggregated())


def verified_model(models: Path, row: RoundRow) -> Any:
    """The model round ``row`` produced (the one round+1 trains from), checked against the ledger;
    None if the file is not there."""
    from coordinator.storage import ModelStore, read_model_file
    from federation.codec import encode_tensors

    path = ModelStore(models).path(row.round + 1)
    if not path.exists():
        return None
    weights = read_model_file(path)
    digest = hashlib.sha256(encode_tensors(weights)).digest()
    if digest != row.model_sha256:
        raise ReportError(f"{path} is not the model the ledger records for round {row.round} "
                          f"(SHA-256 {digest.hex()[:16]}, ledger {row.model_sha256.hex()[:16]}): refusing to use it")
    return weights


def _torch_model(task: Any, weights: Any) -> Any:
    import torch

    model = task.build_model()
    model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in weights.items()})
    model.eval()
    return model


def evaluate_missing(summary: RunSummary, models: Path, task: Any) -> int:
    """Fill in ``test_*`` metrics the ledger lacks by evaluating the saved models; returns how many."""
    from federation.evaluation import evaluate
    from federation.tasks import central_test_set

    test: tuple[Any, Any] | None = None
    done = 0
    for row in summary.rounds:
        if any(k.startswith("test_") and v is not None for k, v in row.metrics.items()):
            continue
        weights = verified_model(models, row)
        if weights is None:
            continue
        test = test or central_test_set(task)
        test_x, test_y = test
        metrics = evaluate(_torch_model(task, weights), test_x, test_y, task.kind)
        row.metrics.update({f"test_{k}": v for k, v in metrics.items()})
        done += 1
    return done


def confusion_matrix(predicted: Any, actual: Any, classes: int) -> Any:
    import numpy as np

    matrix = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(actual), np.asarray(predicted)), 1)
    return matrix


# -- plots ------------------------------------------------------------------------------------------
def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise ConfigError("fledger report needs matplotlib: pip install 'fledger[report]'") from None
    matplotlib.use("Agg")  # files only: no display on a gateway
    import matplotlib.pyplot as plt

    return plt


def _save(plt: Any, fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _title(summary: RunSummary, what: str) -> str:
    return f"fleet {summary.fleet}" + (f", task {summary.task}" if summary.task else "") + f": {what}"


QUALITY_METRICS = ("accuracy", "mse")
_PREFIXES = ("clients_global_test_", "clients_test_", "clients_", "test_")


def base_metric(name: str) -> str:
    """``clients_test_mse`` -> ``mse``: what is measured, whoever measured it on what."""
    for prefix in _PREFIXES:
        if name.startswith(prefix):
            return name.removeprefix(prefix)
    return name


def metric_label(name: str) -> str:
    """What a recorded metric name means, for a legend."""
    if name.startswith("clients_global_test_"):
        return f"{name.removeprefix('clients_global_test_')}: devices' local test data, global model before training"
    if name.startswith("clients_test_"):
        return f"{name.removeprefix('clients_test_')}: devices' local test data, after local training"
    if name.startswith("clients_"):
        return f"{name.removeprefix('clients_')}: devices' mean"
    if name.startswith("test_"):
        return f"{name.removeprefix('test_')}: new global model, held-out test set"
    return name


def plot_metric(summary: RunSummary, out: Path) -> Path:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    rounds = [r.round for r in summary.rounds]
    names = sorted({k for r in summary.rounds for k, v in r.metrics.items() if v is not None})
    quality = [n for n in names if base_metric(n) in QUALITY_METRICS]
    losses = [n for n in names if base_metric(n).endswith("loss")]
    for ax, chosen, title in ((axes[0], quality, "model quality per round"), (axes[1], losses, "loss")):
        for name in chosen:
            points = [(r.round, r.metrics[name]) for r in summary.rounds if r.metrics.get(name) is not None]
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=metric_label(name))
        if chosen:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no metric recorded", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel("round")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if rounds:
            ax.set_xticks(rounds if len(rounds) <= 20 else rounds[:: max(1, len(rounds) // 10)])
    fig.suptitle(_title(summary, "metric per round"))
    return _save(plt, fig, out / "metric.png")


def plot_participation(summary: RunSummary, out: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.2))
    rounds = [r.round for r in summary.rounds]
    devices = [len(r.participants) for r in summary.rounds]
    bars = ax.bar(rounds, devices, color="#2f6fde", label="devices in the aggregate")
    ax.set_xlabel("round")
    ax.set_ylabel("devices")
    ax.set_ylim(0, max(devices, default=1) * 1.35)  # headroom for the legend
    ax.yaxis.get_major_locator().set_params(integer=True)
    samples = ax.twinx()
    line = samples.plot(rounds, [r.num_samples for r in summary.rounds], color="#b07800", marker="o",
                        label="training samples")
    samples.set_ylabel("training samples")
    samples.set_ylim(0, max((r.num_samples for r in summary.rounds), default=1) * 1.2)
    ax.legend(handles=[bars, *line], loc="upper left", fontsize=8)
    ax.set_title(_title(summary, "participation per round"))
    if not rounds:
        ax.text(0.5, 0.5, "no round aggregated", ha="center", va="center", transform=ax.transAxes)
    return _save(plt, fig, out / "participation.png")


def plot_rejections(summary: RunSummary, out: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.2))
    rows = [(r.round, r.rejected) for r in summary.rounds]
    if summary.rejected_open_round:
        rows.append(((summary.rounds[-1].round + 1) if summary.rounds else 1, summary.rejected_open_round))
    reasons = sorted({reason for _, counts in rows for reason in counts})
    bottom = [0] * len(rows)
    for reason in reasons:
        heights = [counts.get(reason, 0) for _, counts in rows]
        ax.bar([r for r, _ in rows], heights, bottom=bottom, label=reason)
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    if reasons:
        ax.legend(fontsize=8)
    else:
        ax.set_ylim(0, 1)
        ax.text(0.5, 0.5, "no rejected update recorded in the ledger", ha="center", va="center",
                transform=ax.transAxes)
    ax.set_xlabel("round")
    ax.set_ylabel("rejected updates (recorded)")
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.set_title(_title(summary, "rejections per round"))
    return _save(plt, fig, out / "rejections.png")


def plot_confusion(summary: RunSummary, matrix: Any, round_number: int, out: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 5.6))
    image = ax.imshow(matrix, cmap="Blues")
    fig.colorbar(image, ax=ax, fraction=0.046)
    classes = matrix.shape[0]
    ax.set_xticks(range(classes))
    ax.set_yticks(range(classes))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    threshold = matrix.max() / 2 if matrix.size else 0
    for i in range(classes):
        for j in range(classes):
            ax.text(j, i, str(int(matrix[i, j])), ha="center", va="center", fontsize=7,
                    color="white" if matrix[i, j] > threshold else "black")
    accuracy = float(matrix.trace()) / max(1, int(matrix.sum()))
    ax.set_title(f"{_title(summary, 'confusion matrix')}\nmodel of round {round_number}, "
                 f"accuracy {accuracy:.4f} on {int(matrix.sum())} test samples", fontsize=9)
    return _save(plt, fig, out / "confusion.png")


# -- command ----------------------------------------------------------------------------------------
def add_parser(sub: Any) -> None:
    p = sub.add_parser("report", help="PNG plots of a run from the ledger and saved models",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ledger", type=Path, required=True, help="the coordinator's ledger.log (read only)")
    p.add_argument("--models", type=Path, default=None,
                   help="the coordinator's models/ directory (default: models/ beside the ledger)")
    p.add_argument("--out", type=Path, required=True, help="directory for the PNG files and summary.json")
    p.add_argument("--coordinator-key", default=None,
                   help="pin the coordinator's signing key: hex, a device bundle, or the coordinator key file "
                        "(default: trust the key in the genesis block)")
    p.add_argument("--no-evaluate", dest="evaluate", action="store_false",
                   help="do not compute missing test metrics from the saved models")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from fledger.ledger_cli import _trusted_key

    _pyplot()  # say at once if matplotlib is missing, before any work
    models = args.models or args.ledger.parent / "models"
    with FleetLedger.open(args.ledger, trusted_coordinator_key=_trusted_key(args)) as ledger:
        summary = summarize_ledger(ledger)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    task = None
    if summary.task in ("california", "mnist"):  # a csv task's test set is on the devices, not here
        from federation.tasks import get_task

        task = get_task(summary.task)
        if args.evaluate:
            evaluated = evaluate_missing(summary, models, task)
            if evaluated:
                print(f"evaluated {evaluated} saved models on the {summary.task} test set")
    written = [plot_metric(summary, out), plot_participation(summary, out), plot_rejections(summary, out)]
    if task is not None and task.kind == "classification" and summary.rounds:
        import torch

        from federation.tasks import central_test_set

        row = summary.rounds[-1]
        weights = verified_model(models, row)
        if weights is None:
            raise ReportError(f"no saved model for round {row.round} in {models}: cannot draw the confusion matrix")
        test_x, test_y = central_test_set(task)
        with torch.no_grad():
            predicted = _torch_model(task, weights)(test_x).argmax(dim=1)
        classes = int(max(int(test_y.max()), int(predicted.max())) + 1)
        matrix = confusion_matrix(predicted.numpy(), test_y.numpy(), classes)
        summary.confusion = matrix.tolist()
        written.append(plot_confusion(summary, matrix, row.round, out))
    (out / "summary.json").write_text(json.dumps(summary.to_json(), indent=2) + "\n")
    for path in written:
        print(f"wrote {path}")
    print(f"{len(summary.rounds)} rounds, ledger height {summary.height}, head {summary.head[:16]}")
    return 0
