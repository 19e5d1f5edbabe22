"""The coordinator's initial model (numpy, no torch) has exactly the layout the agents' torch models have."""

from __future__ import annotations

import numpy as np
import pytest

from federation.model_init import initial_weights, task_layers
from federation.tasks import get_task


@pytest.mark.parametrize(("task", "n_features"), [("california", 0), ("mnist", 0), ("csv", 3), ("csv", 12)])
def test_initial_weights_match_the_torch_model(task: str, n_features: int) -> None:
    weights = initial_weights(task, n_features, seed=0)
    state = get_task(task, n_features=n_features or None).build_model().state_dict()
    assert list(weights) == list(state)  # same names in the same order
    for name, tensor in state.items():
        assert weights[name].shape == tuple(tensor.shape) and weights[name].dtype == np.float32, name
        # PyTorch's default range for Linear and Conv2d: +-1/sqrt(fan_in)
        fan_in = int(np.prod(state[name.rsplit(".", 1)[0] + ".weight"].shape[1:]))
        assert np.abs(weights[name]).max() <= 1 / np.sqrt(fan_in)
        if weights[name].size >= 16:  # spread over the range, not zeros
            assert np.abs(weights[name]).max() > 0.5 / np.sqrt(fan_in)


def test_initial_weights_are_reproducible_and_seeded() -> None:
    a, b = initial_weights("california", seed=1), initial_weights("california", seed=1)
    c = initial_weights("california")
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["0.weight"], c["0.weight"])


def test_bad_tasks_are_refused_before_anything_starts() -> None:
    with pytest.raises(ValueError, match="unknown task"):
        task_layers("cifar")
    with pytest.raises(ValueError, match="--csv-features"):
        task_layers("csv")
    with pytest.raises(ValueError, match="takes no --csv-features"):
        task_layers("california", 8)
