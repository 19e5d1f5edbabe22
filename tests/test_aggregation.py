import numpy as np
import pytest

from coordinator.aggregation import AggregationError, make_strategy


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
