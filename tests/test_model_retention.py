"""Model retention: the last N model files plus the ledger's restore targets stay."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from coordinator.storage import ModelStore
from federation import exit_codes


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


def test_the_coordinator_keeps_the_last_models_and_what_an_operator_restored(tmp_path: Path) -> None:
    """Wired into the coordinator: each closed round prunes to --keep-models, but never the model an
    operator restored nor the round it opened, and the ledger still names every model's hash."""
    from test_coordinator import Harness, weights

    from coordinator.restore import apply_request
    from fledger.cli import main

    h = Harness(tmp_path, mode={"keep_models": 1})

    def close_round(value: float) -> None:
        number = h.coordinator.round.number
        for device in ("dev-a", "dev-b"):
            assert h.send(device, h.update(device, number, weights(value))).accepted

    close_round(1.0)
    close_round(2.0)  # round 3 open; model files 1 and 2 pruned
    assert h.coordinator.models.rounds() == [3]
    # The operator restores round 1's model... from a backup of its file (it was pruned).
    assert h.coordinator.models.load(1) is None
    h.coordinator.models.save(1, {k: np.zeros_like(v) for k, v in weights(0.0).items()})
    assert main(["restore-model", "--state-dir", str(tmp_path), "--round", "1", "--reason", "t", "--wait", "0.1"]) \
        == exit_codes.TIMEOUT  # written; no coordinator process answered in time
    apply_request(h.coordinator, tmp_path)
    assert h.coordinator.round.number == 4
    for value in (3.0, 4.0, 5.0):
        close_round(value)
    assert h.coordinator.round.number == 7
    assert h.coordinator.models.rounds() == [1, 4, 7]  # the last one, the restore source and its round
    assert sorted(h.coordinator.fleet_state.published_models) == list(range(1, 8))
