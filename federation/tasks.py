"""Registry of learning tasks: the model, each agent's data shard and the default hyper-parameters.

Tasks:

* ``california``: regression on California Housing, MLP 8-64-64-1. 20% of the rows (fixed
  seed) are the held-out test set; the other 80% are sharded IID among the agents, and each
  agent's share of the test set is sharded the same way. Features and target are standardised
  with statistics fitted on the agent's own training part (saved via :attr:`LocalData.scaler`).
* ``mnist``: classification on MNIST (60k train sharded IID, the official 10k test set
  sharded the same way per agent), a ~106k-parameter CNN.
* ``csv``: regression on a user CSV file (``csv_task(path, target)``), split like california,
  with an MLP sized to the number of numeric feature columns.

``central_test_set(task)`` gives the whole held-out test set for coordinator-side evaluation.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from federation.datasets import (
    CALIFORNIA_FILE,
    ImageData,
    Standardizer,
    TabularData,
    load_california,
    load_csv,
    load_mnist,
    mnist_path,
    shard_indices,
    train_test_split_indices,
)

Kind = Literal["regression", "classification"]

TEST_FRACTION = 0.2
SPLIT_SEED = 20240  # fixed: every agent and the coordinator agree on the held-out rows
# Feature standardisers clip each column to these quantiles (see Standardizer): without it,
# heavy-tailed columns get very different stds on different agents and FedAvg suffers.
FEATURE_CLIP_QUANTILE = 0.001
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081


@dataclass(frozen=True)
class HyperParameters:
    """Default local-training settings of a task."""

    optimizer: Literal["adam", "sgd"]
    lr: float
    batch_size: int
    local_epochs: int


@dataclass
class LocalData:
    """One agent's torch-ready data.

    ``train_x``/``test_x`` are float32; ``train_y``/``test_y`` are float32 [n] for regression
    (standardised) and int64 [n] for classification. ``scaler`` is a JSON-ready dict with the
    feature and target standardisers (None for MNIST), so predictions can be mapped back to
    the original units with :meth:`target_standardizer.inverse_transform`.
    """

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    kind: Kind
    feature_standardizer: Standardizer | None = None
    target_standardizer: Standardizer | None = None
    feature_names: list[str] = field(default_factory=list)

    @property
    def scaler(self) -> dict[str, Any] | None:
        if self.feature_standardizer is None or self.target_standardizer is None:
            return None
        return {"features": self.feature_standardizer.to_dict(), "target": self.target_standardizer.to_dict(),
                "feature_names": list(self.feature_names)}


class Task:
    """Base class of a task; see the module docstring for the concrete ones."""

    name: str = ""
    kind: Kind = "regression"
    hyperparameters: HyperParameters = HyperParameters("adam", 1e-3, 64, 1)

    def build_model(self) -> nn.Module:
        """A fresh model; its weights are deterministic given ``torch.manual_seed`` by the caller."""
        raise NotImplementedError

    def load(self, shard: int, num_shards: int, seed: int = 0, limit: int | None = None) -> LocalData:
        """Shard ``shard`` of ``num_shards`` (IID, permutation seeded by ``seed``).

        ``limit`` caps the number of train samples and of test samples of this shard (for tests).
        """
        raise NotImplementedError

    def central_test_set(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole held-out test set, prepared as the agents prepare theirs."""
        raise NotImplementedError

    def dataset_files(self) -> list[Path]:
        """The files this task's local data comes from (what a device registers in the ledger)."""
        raise NotImplementedError

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.build_model().parameters())


def _cap(indices: np.ndarray, limit: int | None, seed: int) -> np.ndarray:
    """At most ``limit`` of ``indices``: a seeded random subset (rows are often stored in order, e.g. by region)."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 (or None), got {limit}")
    if limit is None or limit >= len(indices):
        return indices
    chosen = np.random.default_rng(seed).choice(len(indices), size=limit, replace=False)
    return indices[np.sort(chosen)]


def mlp(n_features: int, hidden: tuple[int, ...] = (64, 64)) -> nn.Sequential:
    """ReLU MLP ``n_features -> hidden... -> 1``."""
    layers: list[nn.Module] = []
    width = n_features
    for size in hidden:
        layers += [nn.Linear(width, size), nn.ReLU()]
        width = size
    layers.append(nn.Linear(width, 1))
    return nn.Sequential(*layers)


class SmallCNN(nn.Module):
    """conv16-pool-conv32-pool-fc64-fc10 for 1x28x28 inputs (105,866 parameters)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(32 * 7 * 7, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.classifier(self.features(x))
        return out


class TabularTask(Task):
    """Regression on a table: fixed 80/20 train/test split, then IID shards of both parts."""

    kind: Kind = "regression"
    hyperparameters = HyperParameters("adam", 1e-3, 64, 5)

    def table(self) -> TabularData:
        raise NotImplementedError

    def _split(self) -> tuple[TabularData, np.ndarray, np.ndarray]:
        data = self.table()
        train_idx, test_idx = train_test_split_indices(len(data), TEST_FRACTION, SPLIT_SEED)
        return data, train_idx, test_idx

    def load(self, shard: int, num_shards: int, seed: int = 0, limit: int | None = None) -> LocalData:
        data, train_idx, test_idx = self._split()
        train = _cap(train_idx[shard_indices(len(train_idx), shard, num_shards, seed)], limit, seed)
        test = _cap(test_idx[shard_indices(len(test_idx), shard, num_shards, seed)], limit, seed)
        if len(train) == 0:
            raise ValueError(f"shard {shard}/{num_shards} of {len(train_idx)} training rows is empty")
        x_scaler = Standardizer.fit(data.features[train], FEATURE_CLIP_QUANTILE)
        y_scaler = Standardizer.fit(data.target[train])
        return LocalData(
            train_x=torch.from_numpy(x_scaler.transform(data.features[train])),
            train_y=torch.from_numpy(y_scaler.transform(data.target[train])),
            test_x=torch.from_numpy(x_scaler.transform(data.features[test])),
            test_y=torch.from_numpy(y_scaler.transform(data.target[test])),
            kind=self.kind, feature_standardizer=x_scaler, target_standardizer=y_scaler,
            feature_names=list(data.feature_names),
        )

    def central_scalers(self) -> tuple[Standardizer, Standardizer]:
        """Standardisers fitted on the whole training split (as used by :meth:`central_test_set`)."""
        data, train_idx, _ = self._split()
        return (Standardizer.fit(data.features[train_idx], FEATURE_CLIP_QUANTILE),
                Standardizer.fit(data.target[train_idx]))

    def central_test_set(self) -> tuple[torch.Tensor, torch.Tensor]:
        data, _, test_idx = self._split()
        x_scaler, y_scaler = self.central_scalers()
        return (torch.from_numpy(x_scaler.transform(data.features[test_idx])),
                torch.from_numpy(y_scaler.transform(data.target[test_idx])))


@functools.lru_cache(maxsize=1)
def _california() -> TabularData:
    return load_california()


@functools.lru_cache(maxsize=1)
def _mnist() -> ImageData:
    return load_mnist()


class CaliforniaTask(TabularTask):
    name = "california"

    def dataset_files(self) -> list[Path]:
        return [CALIFORNIA_FILE]

    def table(self) -> TabularData:
        return _california()

    def build_model(self) -> nn.Module:
        return mlp(8)


class CsvTask(TabularTask):
    """Regression on a user CSV. The coordinator, which has no data, may give only ``n_features``."""

    name = "csv"

    def __init__(self, path: str | Path | None = None, target: str | None = None,
                 n_features: int | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self.target = target
        self._table: TabularData | None = None
        if self.path is not None:
            if not target:
                raise ValueError("task csv: give the target column name with the CSV path")
            table = self.table()
            if n_features is not None and n_features != table.features.shape[1]:
                raise ValueError(f"task csv: {self.path} has {table.features.shape[1]} numeric feature columns, "
                                 f"but n_features={n_features}")
            n_features = table.features.shape[1]
        if n_features is None or n_features < 1:
            raise ValueError("task csv needs a data file (path and target) or n_features")
        self.n_features = n_features

    def dataset_files(self) -> list[Path]:
        if self.path is None:
            raise ValueError("task csv was built without a data file")
        return [self.path]

    def table(self) -> TabularData:
        if self.path is None or self.target is None:
            raise ValueError("task csv was built without a data file; give path and target to load data")
        if self._table is None:
            self._table = load_csv(self.path, self.target)
        return self._table

    def build_model(self) -> nn.Module:
        return mlp(self.n_features)


class MnistTask(Task):
    name = "mnist"
    kind: Kind = "classification"
    hyperparameters = HyperParameters("adam", 1e-3, 32, 1)

    def dataset_files(self) -> list[Path]:
        return [mnist_path()]

    def build_model(self) -> nn.Module:
        return SmallCNN()

    @staticmethod
    def prepare(images: np.ndarray) -> torch.Tensor:
        """uint8 [n, 28, 28] -> normalised float32 [n, 1, 28, 28]."""
        x = torch.from_numpy(np.ascontiguousarray(images)).to(torch.float32).div_(255.0)
        return x.sub_(MNIST_MEAN).div_(MNIST_STD).unsqueeze(1)

    def load(self, shard: int, num_shards: int, seed: int = 0, limit: int | None = None) -> LocalData:
        data = _mnist()
        train = _cap(shard_indices(len(data.train_y), shard, num_shards, seed), limit, seed)
        test = _cap(shard_indices(len(data.test_y), shard, num_shards, seed), limit, seed)
        return LocalData(
            train_x=self.prepare(data.train_x[train]), train_y=torch.from_numpy(data.train_y[train]),
            test_x=self.prepare(data.test_x[test]), test_y=torch.from_numpy(data.test_y[test]),
            kind=self.kind,
        )

    def central_test_set(self) -> tuple[torch.Tensor, torch.Tensor]:
        data = _mnist()
        return self.prepare(data.test_x), torch.from_numpy(data.test_y.copy())


def csv_task(path: str | Path, target: str) -> CsvTask:
    """Regression task on a user CSV file with ``target`` as the label column."""
    return CsvTask(path, target)


TASKS = ("california", "mnist", "csv")


def get_task(name: str, **options: Any) -> Task:
    """The task called ``name``. Options: for ``csv``, ``path``, ``target`` and/or ``n_features``.

    Options set to None are ignored, so callers may pass e.g. ``n_features=None`` for any task.
    """
    given = {key: value for key, value in options.items() if value is not None}
    if name == "csv":
        unknown = set(given) - {"path", "target", "n_features"}
        if unknown:
            raise ValueError(f"task csv: unknown options {sorted(unknown)}")
        return CsvTask(given.get("path"), given.get("target"), given.get("n_features"))
    if name in ("california", "mnist"):
        if given:
            raise ValueError(f"task {name} takes no options (such as --csv-features, --data, --target), "
                             f"got {sorted(given)}")
        return CaliforniaTask() if name == "california" else MnistTask()
    raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")


def central_test_set(task: Task) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole held-out test set of ``task`` (coordinator-side evaluation of the global model)."""
    return task.central_test_set()
