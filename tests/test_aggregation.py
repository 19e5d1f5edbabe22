import os
from pathlib import Path

import numpy as np
import pytest

from coordinator.aggregation import AggregationError, make_strategy
from federation import deltas


def updates(n: int, seed: int = 0) -> list[tuple[dict[str, np.ndarray], int]]:
    rng = np.random.default_rng(seed)
    return [({"w": rng.standard_normal((3, 4)).astype(np.float32), "b": rng.standard_normal(4).astype(np.float32)},
             int(rng.integers(1, 1000))) for _ in range(n)]


def test_fedavg_equals_weighted_mean() -> None:
    items = updates(7)
    strategy = make_strategy("fedavg")
    for weights, n in items:
        strategy.add(weights, n)
    result = strategy.result()
    total = sum(n for _, n in items)
    for name in ("w", "b"):
        expected = sum(w[name].astype(np.float64) * n for w, n in items) / total
        np.testing.assert_allclose(result[name], expected, rtol=1e-6)
        assert result[name].dtype == np.float32


def test_plain_mean_ignores_sample_counts() -> None:
    items = updates(3)
    strategy = make_strategy("mean")
    for weights, n in items:
        strategy.add(weights, n)
    np.testing.assert_allclose(strategy.result()["w"], np.mean([w["w"] for w, _ in items], axis=0), rtol=1e-6)


def test_order_does_not_matter() -> None:
    items = updates(5, seed=3)
    a, b = make_strategy("fedavg"), make_strategy("fedavg")
    for weights, n in items:
        a.add(weights, n)
    for weights, n in reversed(items):
        b.add(weights, n)
    np.testing.assert_allclose(a.result()["w"], b.result()["w"], rtol=1e-6)


def test_streaming_memory_does_not_grow_with_clients() -> None:
    strategy = make_strategy("fedavg")
    for weights, n in updates(50):
        strategy.add(weights, n)
    # One float64 accumulator per tensor, whatever the number of clients.
    assert sum(a.nbytes for a in strategy._sum.values()) == (12 + 4) * 8  # type: ignore[attr-defined]


def test_errors() -> None:
    strategy = make_strategy("fedavg")
    with pytest.raises(AggregationError):
        strategy.result()
    with pytest.raises(AggregationError):
        strategy.add({"w": np.zeros(2, np.float32)}, 0)
    strategy.add({"w": np.zeros(2, np.float32)}, 1)
    with pytest.raises(AggregationError):
        strategy.add({"w": np.zeros(3, np.float32)}, 1)
    with pytest.raises(AggregationError, match="unknown"):
        make_strategy("nope")


def test_float16_and_huge_weights_are_summed_in_float64() -> None:
    strategy = make_strategy("fedavg")
    for _ in range(3):
        strategy.add({"w": np.full(3, 1.5, np.float16)}, 60_000)  # 60000 * 1.5 overflows float16
    result = strategy.result()["w"]
    assert result.dtype == np.float16
    np.testing.assert_allclose(result.astype(np.float64), 1.5)


def test_non_finite_aggregate_is_refused() -> None:
    strategy = make_strategy("fedavg")
    strategy.add({"w": np.full(2, 3e38, np.float32)}, 1)
    strategy.add({"w": np.full(2, 3e38, np.float32)}, 1)
    np.testing.assert_allclose(strategy.result()["w"], 3e38, rtol=1e-6)  # float64 sum: no overflow
    big = make_strategy("fedavg")
    with np.errstate(over="ignore"):
        big.add({"w": np.full(2, np.finfo(np.float64).max, np.float64)}, 2)
        big.add({"w": np.full(2, np.finfo(np.float64).max, np.float64)}, 2)
    with pytest.raises(AggregationError, match="not finite"):
        big.result()


# -- robust strategies -------------------------------------------------------------------------------
from coordinator.aggregation import StrategyParams  # noqa: E402


def fleet(n_honest: int, seed: int = 1) -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]]]:
    """A global model and honest updates close to it (small local steps)."""
    rng = np.random.default_rng(seed)
    global_model = {"w": rng.standard_normal((4, 5)).astype(np.float32), "b": rng.standard_normal(5).astype(np.float32)}
    honest = [{k: (v + 0.01 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in global_model.items()}
              for _ in range(n_honest)]
    return global_model, honest


def run(name: str, global_model: dict[str, np.ndarray], items: list[tuple[str, dict[str, np.ndarray], int]],
        params: StrategyParams | None = None, tmp_path: object = None) -> tuple[dict[str, np.ndarray], object]:
    strategy = make_strategy(name, params, global_model=global_model, workdir=tmp_path)  # type: ignore[arg-type]
    for client, weights, n in items:
        strategy.add(weights, n, client)
    return strategy.result(), strategy


def test_median_and_trimmed_mean_match_numpy(tmp_path: object) -> None:
    global_model, honest = fleet(7)
    items = [(f"d{i}", w, 10 + i) for i, w in enumerate(honest)]
    median, _ = run("median", global_model, items, tmp_path=tmp_path)
    trimmed, strategy = run("trimmed-mean", global_model, items, StrategyParams(trim_fraction=0.3), tmp_path)
    for name in ("w", "b"):
        stack = np.stack([w[name] for w in honest]).astype(np.float64)
        np.testing.assert_allclose(median[name], np.median(stack, axis=0), rtol=1e-6)
        np.testing.assert_allclose(trimmed[name], np.sort(stack, axis=0)[2:5].mean(axis=0), rtol=1e-6)
        assert median[name].dtype == np.float32
    assert strategy.parameters() == {"trim_fraction": 0.3, "trimmed_each_end": 2}  # type: ignore[attr-defined]


def test_a_model_with_more_tensors_than_one_system_call_takes_is_stored_whole(tmp_path: object) -> None:
    """The codec allows 4,096 tensors; one pwritev takes 1,024 buffers (Linux's IOV_MAX)."""
    rng = np.random.default_rng(3)
    global_model = {f"t{i:04d}": np.zeros(2, np.float32) for i in range(1500)}
    honest = [{k: rng.standard_normal(2).astype(np.float32) for k in global_model} for _ in range(3)]
    median, _ = run("median", global_model, [(f"d{i}", w, 10) for i, w in enumerate(honest)], tmp_path=tmp_path)
    for name in ("t0000", "t1023", "t1024", "t1499"):
        np.testing.assert_allclose(median[name], np.median(np.stack([w[name] for w in honest]), axis=0), rtol=1e-6)


def test_median_is_not_moved_by_two_scaled_updates(tmp_path: object) -> None:
    global_model, honest = fleet(8)
    items = [(f"h{i}", w, 100) for i, w in enumerate(honest)]
    items += [(f"evil{i}", {k: v * 1e6 for k, v in honest[i].items()}, 100) for i in range(2)]
    for name in ("median", "trimmed-mean", "krum", "multi-krum"):
        result, _ = run(name, global_model, items, tmp_path=tmp_path)
        assert max(float(np.abs(result[k] - global_model[k]).max()) for k in result) < 0.1, name


def test_multi_krum_excludes_the_outliers_and_records_why(tmp_path: object) -> None:
    global_model, honest = fleet(8)
    items = [(f"h{i}", w, 100) for i, w in enumerate(honest)]
    items += [("evil", {k: -20 * v for k, v in honest[0].items()}, 100)]
    result, strategy = run("multi-krum", global_model, items, StrategyParams(byzantine=1), tmp_path)
    assert set(strategy.decisions) == {"evil"}  # type: ignore[attr-defined]
    assert strategy.decisions["evil"]["reason"] == "krum_score"  # type: ignore[attr-defined]
    for k in result:
        np.testing.assert_allclose(result[k], np.mean([w[k] for w in honest], axis=0), rtol=1e-5)
    single, krum = run("krum", global_model, items, tmp_path=tmp_path)
    assert len(krum.decisions) == len(items) - 1  # type: ignore[attr-defined]
    assert any(all(np.array_equal(single[k], w[k]) for k in single) for w in honest)  # one honest update, as is


def test_clipped_fedavg_leaves_honest_rounds_alone(tmp_path: object) -> None:
    global_model, honest = fleet(5)
    items = [(f"h{i}", w, 50) for i, w in enumerate(honest)]
    result, strategy = run("clipped-fedavg", global_model, items, tmp_path=tmp_path)
    assert strategy.decisions == {}  # type: ignore[attr-defined]
    for k in result:
        np.testing.assert_allclose(result[k], np.mean([w[k] for w in honest], axis=0), rtol=1e-5)


def test_clipped_fedavg_excludes_a_scaled_update_and_clips_a_far_one(tmp_path: object) -> None:
    global_model, honest = fleet(5)
    items = [(f"h{i}", w, 50) for i, w in enumerate(honest)]
    far = {k: global_model[k] + 5 * (honest[0][k] - global_model[k]) for k in global_model}  # 5 x an honest step
    items += [("scaled", {k: v * 1e6 for k, v in honest[1].items()}, 50), ("far", far, 50)]
    result, strategy = run("clipped-fedavg", global_model, items, tmp_path=tmp_path)
    decisions = strategy.decisions  # type: ignore[attr-defined]
    assert decisions["scaled"]["action"] == "excluded" and decisions["scaled"]["factor"] > 1e5
    assert decisions["far"]["action"] == "clipped" and 0 < decisions["far"]["scale"] < 1
    assert set(decisions) == {"scaled", "far"}
    assert max(float(np.abs(result[k] - global_model[k]).max()) for k in result) < 0.1


def test_clipped_fedavg_caps_claimed_sample_counts_and_absolute_norm(tmp_path: object) -> None:
    global_model, honest = fleet(4)
    items = [(f"h{i}", w, 50) for i, w in enumerate(honest[:3])] + [("greedy", honest[3], 10**9)]
    _, strategy = run("clipped-fedavg", global_model, items, tmp_path=tmp_path)
    assert strategy.decisions["greedy"] == {**strategy.decisions["greedy"], "reason": "samples", "weight": 150.0}  # type: ignore[attr-defined]
    result, strategy = run("clipped-fedavg", global_model, items[:3], StrategyParams(clip_norm=1e-6),
                           tmp_path=tmp_path)
    assert all(d["action"] == "clipped" for d in strategy.decisions.values())  # type: ignore[attr-defined]
    distance = np.sqrt(sum(float(((result[k] - global_model[k]).astype(np.float64) ** 2).sum()) for k in result))
    assert distance <= 1.01e-6


def test_robust_strategies_keep_updates_on_disk_not_in_memory(tmp_path: object) -> None:
    global_model, honest = fleet(3)
    strategy = make_strategy("median", global_model=global_model, workdir=tmp_path)  # type: ignore[arg-type]
    for i, w in enumerate(honest):
        strategy.add(w, 1, f"d{i}")
    matrix = strategy._matrix  # type: ignore[attr-defined]
    # one float32 row per update in a file, read back with pread (never mapped: RSS stays O(model))
    assert np.array_equal(matrix.row(1), np.concatenate([v.ravel() for v in honest[1].values()]).astype(np.float64))
    assert matrix.rows == 3 and os.fstat(matrix._file.fileno()).st_size == 3 * 25 * 4
    assert not any(isinstance(v, np.ndarray) for v in vars(strategy).values())


def test_strategy_parameters_are_checked() -> None:
    for bad in ({"trim_fraction": 0.5}, {"clip_factor": -1.0}, {"exclude_factor": 0.5}, {"byzantine": -2},
                {"clip_factor": float("nan")}):
        with pytest.raises(AggregationError):
            StrategyParams(**bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["fedavg", "clipped-fedavg", "median", "trimmed-mean", "krum", "multi-krum"])
def test_a_strategy_given_deltas_gives_the_delta_of_what_it_gives_for_full_models(name: str, tmp_path: Path) -> None:
    """Update envelope v2 carries deltas: base + strategy(deltas) must be strategy(models), one
    hostile update included (clipping, exclusion, medians and Krum act on the deltas alike)."""
    rng = np.random.default_rng(7)
    base = {"w": rng.normal(size=(3, 4)).astype(np.float32), "b": rng.normal(size=4).astype(np.float32)}
    models = [{k: (v + rng.normal(scale=0.1, size=v.shape)).astype(np.float32) for k, v in base.items()}
              for _ in range(5)]
    models.append({k: (v + 50).astype(np.float32) for k, v in base.items()})  # an attacker
    full = make_strategy(name, global_model=base, workdir=tmp_path)
    on_deltas = make_strategy(name, workdir=tmp_path)
    for i, model in enumerate(models):
        full.add(model, 10 + i, f"d{i}")
        on_deltas.add(deltas.delta(model, base), 10 + i, f"d{i}")
    expected, got = full.result(), deltas.apply_delta(base, on_deltas.result())
    for key in base:
        np.testing.assert_allclose(got[key], expected[key], rtol=0, atol=1e-5)
    assert on_deltas.decisions.keys() == full.decisions.keys()
