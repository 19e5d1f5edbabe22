"""The poisoning benchmark's verdicts: judged on the mean of per-seed differences, a halt fails."""

import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

BENCH = Path(__file__).resolve().parent.parent / "bench" / "poisoning.py"


def load_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("poisoning_bench", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def result(strategy: str, attack: str, seed: int, accuracy: float | None) -> dict[str, Any]:
    return {"strategy": strategy, "attack": attack, "seed": seed, "accuracy": accuracy}


def test_targets_use_the_mean_of_differences_paired_by_seed() -> None:
    bench = load_bench()
    # seed 1's clean run is 2 pp better than seed 0's: each attacked run is compared with its own seed's.
    results = [result("median", "clean", 0, 0.960), result("median", "signflip", 0, 0.954),
               result("median", "clean", 1, 0.980), result("median", "signflip", 1, 0.978),
               result("trimmed-mean", "clean", 0, 0.970), result("trimmed-mean", "signflip", 0, 0.960),
               result("trimmed-mean", "clean", 1, 0.970), result("trimmed-mean", "signflip", 1, None)]
    table, verdicts = bench.summarise(results, ["median", "trimmed-mean"], ["clean", "signflip"])
    median = next(v for v in verdicts if v.startswith("median under signflip"))
    assert "-0.40 pp" in median and "(-0.60, -0.20)" in median and median.endswith("PASS")
    trimmed = next(v for v in verdicts if v.startswith("trimmed-mean under signflip"))
    assert "halted" in trimmed and trimmed.endswith("FAIL")
    assert "| median | 2 | 97.00 ±1.41 | 96.60 ±1.70 (-0.40 ±0.28) |" in table
    assert "halted* in 1 of 2 seeds" in table


def test_a_mean_beyond_the_target_fails_even_if_one_seed_passes() -> None:
    bench = load_bench()
    results = [result("median", "clean", 0, 0.970), result("median", "labelflip", 0, 0.969),
               result("median", "clean", 1, 0.970), result("median", "labelflip", 1, 0.955)]
    _, verdicts = bench.summarise(results, ["median"], ["clean", "labelflip"])
    assert verdicts == ["median under labelflip: -0.80 pp, mean of 2 seeds (-0.10, -1.50) "
                        "(target within 0.5 pp): FAIL"]
