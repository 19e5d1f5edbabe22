"""Aggregation strategies: small pure classes, separate from round orchestration.

A strategy streams: ``add`` folds one update into a running sum, so memory is O(model)
whatever the number of clients (Flower's ``aggregate`` stacks every update instead).
New strategies (FedProx's server side, FedAdam, trimmed mean, ...) implement the same
three methods and register in ``STRATEGIES``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np

from federation.codec import TensorDict


class AggregationError(ValueError):
    pass


class Strategy(Protocol):
    name: str

    def add(self, weights: TensorDict, num_samples: int) -> None: ...

    def result(self) -> TensorDict: ...

    @property
    def count(self) -> int: ...


class WeightedAverage:
    """FedAvg: the mean of the updates weighted by their sample counts.

    Accumulates in float64 (so the order of arrival does not change the result in practice)
    and casts back to each tensor's dtype at the end; integer tensors (e.g. batch-norm
    counters) are averaged and rounded."""

    name = "fedavg"

    def __init__(self) -> None:
        self._sum: dict[str, np.ndarray] = {}
        self._dtypes: dict[str, np.dtype] = {}
        self._total = 0.0
        self._count = 0

    def _weight(self, num_samples: int) -> float:
        if num_samples <= 0:
            raise AggregationError(f"sample count must be positive, got {num_samples}")
        return float(num_samples)

    def add(self, weights: TensorDict, num_samples: int) -> None:
        weight = self._weight(num_samples)
        if not self._sum:
            for name, array in weights.items():
                self._sum[name] = np.zeros(array.shape, dtype=np.float64)
                self._dtypes[name] = array.dtype
        elif list(weights) != list(self._sum):
            raise AggregationError("update tensor names differ from the first update's")
        for name, array in weights.items():
            acc = self._sum[name]
            if acc.shape != array.shape:
                raise AggregationError(f"tensor {name!r}: shape {array.shape} != {acc.shape}")
            # In float64 (NumPy 2 would keep weight * float16 in float16 and overflow); in place.
            acc += weight * array.astype(np.float64, copy=False)
        self._total += weight
        self._count += 1

    @property
    def count(self) -> int:
        return self._count

    def result(self) -> TensorDict:
        if self._count == 0:
            raise AggregationError("no updates to aggregate")
        out: TensorDict = {}
        for name, acc in self._sum.items():
            mean = acc / self._total
            if not np.isfinite(mean).all():
                raise AggregationError(f"aggregate of tensor {name!r} is not finite")
            dtype = self._dtypes[name]
            out[name] = (np.rint(mean) if dtype.kind in "iu" else mean).astype(dtype)
        return out


class PlainMean(WeightedAverage):
    """Every update counts the same, whatever its sample count (the seed system's mean)."""

    name = "mean"

    def _weight(self, num_samples: int) -> float:
        return 1.0


STRATEGIES: dict[str, Callable[[], Strategy]] = {
    WeightedAverage.name: WeightedAverage,
    PlainMean.name: PlainMean,
}


def make_strategy(name: str) -> Strategy:
    try:
        return STRATEGIES[name]()
    except KeyError:
        raise AggregationError(f"unknown aggregation strategy {name!r}; choose from {sorted(STRATEGIES)}") from None
