"""Evaluation of a model on a test set: used by agents (local test split) and by the
coordinator (held-out test set of the global model), so it lives in the shared package."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from federation.tasks import Kind

KINDS = ("regression", "classification")


def check_kind(kind: str | None) -> Kind:
    if kind == "regression":
        return "regression"
    if kind == "classification":
        return "classification"
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def model_outputs(model: nn.Module, x: torch.Tensor, kind: Kind) -> torch.Tensor:
    out: torch.Tensor = model(x)
    if kind == "regression" and out.ndim == 2 and out.shape[1] == 1:
        out = out.squeeze(1)
    return out


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, kind: str,
             batch_size: int = 1024, on_batch: Callable[[], None] | None = None) -> dict[str, float]:
    """Metrics of ``model`` on (x, y), batched to bound memory. ``on_batch`` runs after every
    batch (a service's watchdog ping and stop check; an exception it raises aborts).

    Regression: ``{"mse": ...}`` (in the units of ``y``, i.e. the standardised target);
    classification: ``{"accuracy": ..., "loss": ...}`` (fraction correct, mean cross-entropy).
    """
    task_kind = check_kind(kind)
    n = len(x)
    if n == 0 or len(y) != n:
        raise ValueError(f"need a non-empty evaluation set with as many targets as inputs, got {n} and {len(y)}")
    was_training = model.training
    model.eval()
    squared = 0.0
    loss_sum = 0.0
    correct = 0
    try:
        with torch.no_grad():
            for begin in range(0, n, batch_size):
                xb, yb = x[begin:begin + batch_size], y[begin:begin + batch_size]
                out = model_outputs(model, xb, task_kind)
                if task_kind == "regression":
                    squared += float(((out - yb.to(out.dtype)) ** 2).sum())
                else:
                    loss_sum += float(nn.functional.cross_entropy(out, yb, reduction="sum"))
                    correct += int((out.argmax(dim=1) == yb).sum())
                if on_batch is not None:
                    on_batch()
    finally:
        model.train(was_training)
    if task_kind == "regression":
        return {"mse": squared / n}
    return {"accuracy": correct / n, "loss": loss_sum / n}
