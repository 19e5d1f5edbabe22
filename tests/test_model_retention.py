"""Model retention: the last N model files plus the ledger's restore targets stay."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from coordinator.storage import ModelStore


def test_prune_keeps_the_last_models_and_the_restore_targets(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "models")
    for r in range(1, 8):
        store.save(r, {"w": np.full(2, r, np.float32)})
    (tmp_path / "models" / "notes.txt").write_text("not a model")
    assert store.prune(0, set()) == [] and store.rounds() == list(range(1, 8))  # 0: keep all
    assert store.prune(3, {2}) == [1, 3, 4]
    assert store.rounds() == [2, 5, 6, 7]
    assert float(store.load(2)["w"][0]) == 2.0  # type: ignore[index]
    assert (tmp_path / "models" / "notes.txt").exists()
