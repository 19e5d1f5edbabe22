"""Aggregation strategies: small pure classes, separate from round orchestration.

``fedavg`` and ``mean`` stream: ``add`` folds one update into a running sum, so memory is
O(model) whatever the number of clients (Flower's ``aggregate`` stacks every update instead).
The robust ones (``clipped-fedavg``, the default; ``median``; ``trimmed-mean``; ``krum``;
``multi-krum``) need every update of the round at once: they keep them in a float32 matrix
file read with pread, not in memory (see :class:`UpdateMatrix`). New strategies (FedProx's
server side, FedAdam, ...) implement ``add``/``result``/``count`` and register in
``STRATEGIES``; ``decisions`` and ``parameters()`` say what they did, for the ledger.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from federation.codec import TensorDict


class AggregationError(ValueError):
    pass


class Strategy(Protocol):
    name: str
    decisions: dict[str, dict[str, Any]]  # client -> {"action": "clipped" | "excluded", "reason": ..., numbers}

    def add(self, weights: TensorDict, num_samples: int, client: str = "") -> None: ...

    def parameters(self) -> dict[str, Any]: ...

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
        self.decisions: dict[str, dict[str, Any]] = {}  # a plain mean clips and excludes nothing

    def _weight(self, num_samples: int) -> float:
        if num_samples <= 0:
            raise AggregationError(f"sample count must be positive, got {num_samples}")
        return float(num_samples)

    def parameters(self) -> dict[str, Any]:
        return {}

    def add(self, weights: TensorDict, num_samples: int, client: str = "") -> None:
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


# -- robust strategies ------------------------------------------------------------------------------
# They need every update of the round at once (a median, a distance to every other update), so
# the updates go, as they arrive, into a float32 matrix file (one row per update) that is
# read back with pread a row or a block of columns at a time: memory stays O(model + block), however
# many devices send. The file is unlinked from the start, so a crash leaves nothing behind; a
# restarted coordinator rebuilds it from the spool like the running sum.

BLOCK_VALUES = 1 << 21  # float32 values read from the matrix at a time (8 MiB; 16 MiB as float64)


@dataclass(frozen=True)
class StrategyParams:
    """Settings of the robust strategies (command line and TOML: see coordinator.daemon)."""

    clip_factor: float = 3.0  # clipped-fedavg: bound = clip_factor x the median distance (0: none)
    exclude_factor: float = 10.0  # clipped-fedavg: leave out updates beyond this x the median (0: never)
    clip_norm: float = 0.0  # clipped-fedavg: absolute bound on the distance (0: none)
    trim_fraction: float = 0.2  # trimmed-mean: fraction cut off at each end, per coordinate
    byzantine: int = -1  # krum: hostile updates tolerated (-1: the most possible, (n - 3) // 2)
    krum_select: int = 0  # multi-krum: updates averaged (0: n - byzantine)

    def __post_init__(self) -> None:
        for name in ("clip_factor", "exclude_factor", "clip_norm"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise AggregationError(f"{name} must be a finite number >= 0, got {value}")
        if 0 < self.exclude_factor < max(1.0, self.clip_factor):
            raise AggregationError(f"exclude_factor ({self.exclude_factor}) must be 0 (off) or >= 1 and >= clip_factor "
                                   f"({self.clip_factor}): else it would leave out the median update itself")
        if not 0 <= self.trim_fraction < 0.5:
            raise AggregationError(f"trim_fraction must be in [0, 0.5), got {self.trim_fraction}")
        if self.byzantine < -1 or self.krum_select < 0:
            raise AggregationError("byzantine must be >= -1 and krum_select >= 0")


@dataclass(frozen=True)
class _Layout:
    names: list[str]
    shapes: list[tuple[int, ...]]
    dtypes: list[np.dtype]
    offsets: list[int]
    size: int

    @classmethod
    def of(cls, model: TensorDict) -> _Layout:
        offsets, size = [], 0
        for array in model.values():
            offsets.append(size)
            size += int(array.size)
        return cls(list(model), [a.shape for a in model.values()], [a.dtype for a in model.values()], offsets, size)

    def check(self, weights: TensorDict) -> None:
        if list(weights) != self.names:
            raise AggregationError("update tensor names differ from the first update's")
        for name, shape, array in zip(self.names, self.shapes, weights.values(), strict=True):
            if array.shape != shape:
                raise AggregationError(f"tensor {name!r}: shape {array.shape} != {shape}")

    def unflatten(self, flat: np.ndarray) -> TensorDict:
        out: TensorDict = {}
        for name, shape, dtype, offset in zip(self.names, self.shapes, self.dtypes, self.offsets, strict=True):
            part = flat[offset:offset + int(np.prod(shape, dtype=np.int64))].reshape(shape)
            if not np.isfinite(part).all():
                raise AggregationError(f"aggregate of tensor {name!r} is not finite")
            out[name] = (np.rint(part) if dtype.kind in "iu" else part).astype(dtype)
        return out


def _iov_max() -> int:
    try:
        return max(1, os.sysconf("SC_IOV_MAX"))
    except (ValueError, OSError):
        return 1024


_IOV_MAX = _iov_max()  # buffers one pwritev takes at most (Linux: 1,024; the codec allows 4,096 tensors)


class UpdateMatrix:
    """The round's updates as rows of a float32 matrix in an unlinked temporary file.

    Read back with ``pread`` (a row, or a block of columns of every row), never memory-mapped:
    mapped file pages count in the process's RSS, and N x model would then be resident at the
    end of a round; read this way only one block is in memory at a time (page cache aside)."""

    def __init__(self, layout: _Layout, directory: Path | None) -> None:
        self.layout = layout
        if directory is not None:
            Path(directory).mkdir(parents=True, exist_ok=True)
        self._file = tempfile.TemporaryFile(dir=directory, prefix="updates-")  # noqa: SIM115 (lives for the round)
        self.rows = 0

    def append(self, weights: TensorDict) -> None:
        """One row, written at its place with one system call and no copy of float32 tensors."""
        parts = [np.ascontiguousarray(array, dtype=np.float32).data.cast("B") for array in weights.values()]
        offset = self.rows * self.layout.size * 4
        while parts:
            written = os.pwritev(self._file.fileno(), parts[:_IOV_MAX], offset)  # a model may have more tensors
            offset += written
            while parts and written >= len(parts[0]):
                written -= len(parts[0])
                parts.pop(0)
            if parts and written:
                parts[0] = parts[0][written:]
        self.rows += 1

    def _read_into(self, out: np.ndarray, offset: int) -> None:
        view = out.data.cast("B")
        while view:
            got = os.preadv(self._file.fileno(), [view], offset)
            if got <= 0:
                raise AggregationError(f"the round's update matrix ended early ({got} bytes at {offset})")
            view, offset = view[got:], offset + got

    def row(self, index: int) -> np.ndarray:
        """One update, flat, as float64."""
        self._file.flush()
        out = np.empty(self.layout.size, dtype=np.float32)
        self._read_into(out, index * self.layout.size * 4)
        return out.astype(np.float64)

    def column_blocks(self) -> Iterator[tuple[int, int, np.ndarray]]:
        """(start, stop, rows x (stop - start) float64) for consecutive blocks of columns."""
        self._file.flush()
        step = max(1, BLOCK_VALUES // max(1, self.rows))
        for start in range(0, self.layout.size, step):
            stop = min(start + step, self.layout.size)
            block = np.empty((self.rows, stop - start), dtype=np.float32)
            for i in range(self.rows):
                self._read_into(block[i], (i * self.layout.size + start) * 4)
            yield start, stop, block.astype(np.float64)

    def close(self) -> None:
        self._file.close()


def _squared_distance(weights: TensorDict, reference: TensorDict) -> float:
    total = 0.0
    for name, array in weights.items():
        diff = (array.astype(np.float64) - reference[name].astype(np.float64)).ravel()
        # einsum, not np.dot: OpenBLAS's threads made this ~50x slower (10 ms per MNIST update)
        # on a busy 2-core machine; it runs once per update on the coordinator's hot path.
        total += float(np.einsum("i,i->", diff, diff))
    return total


def _squared_norm(weights: TensorDict) -> float:
    total = 0.0
    for array in weights.values():
        flat = array.astype(np.float64).ravel()
        total += float(np.einsum("i,i->", flat, flat))  # einsum: see _squared_distance
    return total


def lower_median(values: list[float]) -> float:
    """The lower of the two middle values: with n = 2 (one honest, one hostile) the honest one."""
    ordered = sorted(values)
    return ordered[(len(ordered) - 1) // 2]


class _MatrixStrategy:
    """Common part: updates go to an :class:`UpdateMatrix`; subclasses reduce it in ``result``."""

    name = ""

    def __init__(self, params: StrategyParams | None = None, global_model: TensorDict | None = None,
                 workdir: Path | None = None) -> None:
        self.params = params or StrategyParams()
        self.global_model = global_model
        self._workdir = workdir
        self._matrix: UpdateMatrix | None = None
        self.clients: list[str] = []
        self.samples: list[int] = []
        self.distances: list[float] = []  # L2 distance of each update from the global model
        self.decisions: dict[str, dict[str, Any]] = {}  # client -> what was done to its update and why

    def add(self, weights: TensorDict, num_samples: int, client: str = "") -> None:
        if num_samples <= 0:
            raise AggregationError(f"sample count must be positive, got {num_samples}")
        if self._matrix is None:
            self._matrix = UpdateMatrix(_Layout.of(weights), self._workdir)
        self._matrix.layout.check(weights)
        if self.global_model is not None:
            self._matrix.layout.check(self.global_model)
            distance = math.sqrt(_squared_distance(weights, self.global_model))
        else:  # deltas (the coordinator's case): the distance from the base is the delta's norm
            distance = math.sqrt(_squared_norm(weights))
        self._matrix.append(weights)
        self.clients.append(client or f"#{len(self.clients)}")
        self.samples.append(int(num_samples))
        self.distances.append(distance)

    @property
    def count(self) -> int:
        return len(self.clients)

    def parameters(self) -> dict[str, Any]:
        """The settings this strategy used, for the ledger's aggregate record."""
        return {}

    def result(self) -> TensorDict:
        if self._matrix is None:
            raise AggregationError("no updates to aggregate")
        try:
            return self._matrix.layout.unflatten(self._reduce(self._matrix))
        finally:
            self._matrix.close()
            self._matrix = None

    def _reduce(self, matrix: UpdateMatrix) -> np.ndarray:
        raise NotImplementedError


def coordinate_median(block: np.ndarray) -> np.ndarray:
    """Coordinate-wise median of the rows of ``block`` (Yin et al. 2018)."""
    return np.median(block, axis=0)


def trimmed_mean(block: np.ndarray, trim: int) -> np.ndarray:
    """Per coordinate, drop the ``trim`` largest and smallest values and average the rest."""
    ordered = np.sort(block, axis=0)
    return ordered[trim:block.shape[0] - trim].mean(axis=0)


class CoordinateMedian(_MatrixStrategy):
    name = "median"

    def _reduce(self, matrix: UpdateMatrix) -> np.ndarray:
        out = np.empty(matrix.layout.size, dtype=np.float64)
        for start, stop, block in matrix.column_blocks():
            out[start:stop] = coordinate_median(block)
        return out


class TrimmedMean(_MatrixStrategy):
    name = "trimmed-mean"

    def trim_count(self) -> int:
        n = self.count
        return min(int(self.params.trim_fraction * n), (n - 1) // 2)

    def parameters(self) -> dict[str, Any]:
        return {"trim_fraction": self.params.trim_fraction, "trimmed_each_end": self.trim_count()}

    def _reduce(self, matrix: UpdateMatrix) -> np.ndarray:
        trim = self.trim_count()
        out = np.empty(matrix.layout.size, dtype=np.float64)
        for start, stop, block in matrix.column_blocks():
            out[start:stop] = trimmed_mean(block, trim)
        return out


def krum_scores(squared_distances: np.ndarray, byzantine: int) -> np.ndarray:
    """Krum (Blanchard et al. 2017): each update's score is the sum of its squared distances to
    its n - f - 2 nearest other updates; the lowest score is the most central update."""
    n = squared_distances.shape[0]
    nearest = max(1, n - byzantine - 2)
    scores = np.empty(n)
    for i in range(n):
        others = np.delete(squared_distances[i], i)
        scores[i] = np.sort(others)[:nearest].sum() if others.size else 0.0
    return scores


class MultiKrum(_MatrixStrategy):
    """Multi-Krum: the sample-weighted mean of the ``krum_select`` updates with the lowest Krum
    scores; every other update is excluded (recorded with its score)."""

    name = "multi-krum"

    def byzantine(self) -> int:
        most = max(0, (self.count - 3) // 2)  # Krum needs n > 2f + 2
        return most if self.params.byzantine < 0 else min(self.params.byzantine, most)

    def selected_count(self) -> int:
        chosen = self.params.krum_select or self.count - self.byzantine()
        return max(1, min(chosen, self.count))

    def parameters(self) -> dict[str, Any]:
        return {"byzantine": self.byzantine(), "krum_select": self.selected_count()}

    def _reduce(self, matrix: UpdateMatrix) -> np.ndarray:
        n = matrix.rows
        squared = np.zeros((n, n))
        for _, _, block in matrix.column_blocks():
            for i in range(n - 1):
                diff = block[i + 1:] - block[i]
                squared[i, i + 1:] += np.einsum("ij,ij->i", diff, diff)
        squared = squared + squared.T
        scores = krum_scores(squared, self.byzantine())
        chosen = sorted(np.argsort(scores, kind="stable")[:self.selected_count()].tolist())
        for i in set(range(n)) - set(chosen):
            self.decisions[self.clients[i]] = {"action": "excluded", "reason": "krum_score",
                                               "score": float(scores[i]),
                                               "worst_selected_score": float(max(scores[j] for j in chosen))}
        weights = np.array([self.samples[i] for i in chosen], dtype=np.float64)
        out = np.zeros(matrix.layout.size, dtype=np.float64)
        for weight, i in zip(weights / weights.sum(), chosen, strict=True):
            out += weight * matrix.row(i)
        return out


class Krum(MultiKrum):
    """Krum: the single most central update becomes the model."""

    name = "krum"

    def selected_count(self) -> int:
        return 1


class ClippedFedAvg(_MatrixStrategy):
    """FedAvg of updates whose distance from the current global model is bounded.

    The bound comes from the round itself: ``clip_factor`` times the (lower) median distance
    of the round's updates, and/or the absolute ``clip_norm``. An update beyond the bound is
    scaled back onto it (g + s (w - g), s = bound / distance); one beyond ``exclude_factor``
    times the median is left out. Sample counts are capped at ``clip_factor`` times the median
    count too, so no device can outweigh the others by claiming more data. Honest rounds are
    unchanged: their distances are alike. Every clip and exclusion is recorded with its numbers."""

    name = "clipped-fedavg"

    def parameters(self) -> dict[str, Any]:
        return {"clip_factor": self.params.clip_factor, "exclude_factor": self.params.exclude_factor,
                "clip_norm": self.params.clip_norm}

    def bounds(self) -> tuple[float, float, float]:
        """(median distance, clipping bound, exclusion threshold); inf where off."""
        median = lower_median(self.distances)
        bound = math.inf
        if self.params.clip_factor > 0:
            bound = self.params.clip_factor * median
        if self.params.clip_norm > 0:
            bound = min(bound, self.params.clip_norm)
        exclude = self.params.exclude_factor * median if self.params.exclude_factor > 0 else math.inf
        return median, bound, exclude

    def _reduce(self, matrix: UpdateMatrix) -> np.ndarray:
        median, bound, exclude = self.bounds()
        sample_cap = self.params.clip_factor * lower_median([float(s) for s in self.samples]) \
            if self.params.clip_factor > 0 else math.inf
        scales: dict[int, float] = {}
        weights: dict[int, float] = {}
        for i, (client, distance, samples) in enumerate(zip(self.clients, self.distances, self.samples, strict=True)):
            if distance > exclude:
                self.decisions[client] = {"action": "excluded", "reason": "distance", "distance": distance,
                                          "median_distance": median, "threshold": exclude,
                                          "factor": distance / median if median > 0 else None}
                continue
            scales[i] = bound / distance if distance > bound else 1.0
            weights[i] = min(float(samples), sample_cap)
            if scales[i] < 1.0 or weights[i] < samples:
                self.decisions[client] = {"action": "clipped", "reason": "distance" if scales[i] < 1.0 else "samples",
                                          "distance": distance, "median_distance": median,
                                          "bound": bound if math.isfinite(bound) else None, "scale": scales[i],
                                          "num_samples": samples, "weight": weights[i]}
        if not weights:  # cannot happen while exclude_factor >= clip_factor >= ... the median is kept
            raise AggregationError("every update was excluded")
        total = sum(weights.values())
        layout = matrix.layout
        flat_global = np.zeros(layout.size) if self.global_model is None else \
            np.concatenate([self.global_model[name].astype(np.float64).ravel() for name in layout.names])
        out = flat_global.copy()
        for i, weight in weights.items():
            out += (weight / total) * scales[i] * (matrix.row(i) - flat_global)
        return out


StrategyFactory = Callable[[StrategyParams, "TensorDict | None", "Path | None"], Strategy]

STRATEGIES: dict[str, StrategyFactory] = {
    WeightedAverage.name: lambda params, model, workdir: WeightedAverage(),
    PlainMean.name: lambda params, model, workdir: PlainMean(),
    ClippedFedAvg.name: ClippedFedAvg,
    CoordinateMedian.name: CoordinateMedian,
    TrimmedMean.name: TrimmedMean,
    Krum.name: Krum,
    MultiKrum.name: MultiKrum,
}
DEFAULT_STRATEGY = ClippedFedAvg.name  # bounded: no single update can move the model arbitrarily far


def make_strategy(name: str, params: StrategyParams | None = None, *, global_model: TensorDict | None = None,
                  workdir: Path | None = None) -> Strategy:
    """A fresh strategy for one round. Its inputs are deltas against the round's base model
    (the coordinator's case, ``global_model=None``: the result is the aggregated delta, distances
    are the deltas' norms), or full models with ``global_model`` the model they trained from
    (the result is a model, distances are from it); ``workdir`` holds the robust strategies'
    update matrix (default: the system's temporary directory)."""
    try:
        factory = STRATEGIES[name]
    except KeyError:
        raise AggregationError(f"unknown aggregation strategy {name!r}; choose from {sorted(STRATEGIES)}") from None
    return factory(params or StrategyParams(), global_model, workdir)
