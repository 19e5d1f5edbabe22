"""Local training and evaluation on an edge device."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from federation.evaluation import KINDS, check_kind, evaluate, model_outputs
from federation.tasks import Kind, LocalData

OPTIMIZERS = ("adam", "sgd")


class TrainingDivergedError(RuntimeError):
    """The training loss became NaN or infinite."""


@dataclass(frozen=True)
class TrainResult:
    train_loss: float  # mean loss over the samples of the last epoch
    num_samples: int
    seconds: float


def _loss_fn(kind: Kind) -> nn.Module:
    return nn.MSELoss() if kind == "regression" else nn.CrossEntropyLoss()


def _make_optimizer(model: nn.Module, optimizer: str, lr: float) -> torch.optim.Optimizer:
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr)
    if optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")


def train_local(
    model: nn.Module,
    data: LocalData | torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    epochs: int,
    optimizer: str,
    lr: float,
    batch_size: int,
    seed: int,
    kind: str | None = None,
    on_batch: Callable[[], None] | None = None,
) -> TrainResult:
    """Train ``model`` in place for ``epochs`` passes over the training data.

    ``data`` is either a :class:`LocalData` (its train part and kind are used) or the training
    inputs, with the targets in ``y`` and ``kind`` given. Mini-batches are shuffled with a
    generator seeded by ``seed``, so the result is reproducible. Raises
    :class:`TrainingDivergedError` if the loss becomes NaN/Inf. ``on_batch`` runs after every
    mini-batch (a service's watchdog ping and stop check; an exception it raises aborts training).
    """
    if isinstance(data, LocalData):
        if y is not None:
            raise TypeError("give either LocalData or (x, y), not both")
        x, targets, task_kind = data.train_x, data.train_y, check_kind(kind or data.kind)
    else:
        if y is None:
            raise TypeError("train_local(model, x, y, kind=...): y is missing")
        x, targets, task_kind = data, y, check_kind(kind)
    n = len(x)
    if n == 0 or len(targets) != n:
        raise ValueError(f"need a non-empty training set with as many targets as inputs, got {n} and {len(targets)}")
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {epochs} and {batch_size}")
    if task_kind == "regression":
        targets = targets.to(torch.float32)
    opt = _make_optimizer(model, optimizer, lr)
    loss_fn = _loss_fn(task_kind)
    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.train()
    start = time.perf_counter()
    epoch_loss = math.nan
    try:
        for epoch in range(epochs):
            order = torch.randperm(n, generator=generator)
            total = 0.0
            for begin in range(0, n, batch_size):
                batch = order[begin:begin + batch_size]
                opt.zero_grad(set_to_none=True)
                loss = loss_fn(model_outputs(model, x[batch], task_kind), targets[batch])
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise TrainingDivergedError(
                        f"training loss became {value} at epoch {epoch + 1}, batch {begin // batch_size + 1} "
                        f"(optimizer {optimizer}, lr {lr}); lower the learning rate or check the data")
                loss.backward()
                opt.step()
                total += value * len(batch)
                if on_batch is not None:
                    on_batch()
            epoch_loss = total / n
    finally:
        model.train(was_training)
    return TrainResult(train_loss=epoch_loss, num_samples=n, seconds=time.perf_counter() - start)


__all__ = ["KINDS", "TrainResult", "TrainingDivergedError", "evaluate", "train_local"]
