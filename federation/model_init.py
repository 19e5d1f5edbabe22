"""Initial weights of each task's model, without torch.

The coordinator publishes round 1's model but never trains, so it must not need torch (a
gateway or a ledger host should not install 1 GB for a random initialisation). This module
lists each model's parameters (names and shapes exactly as ``task.build_model().state_dict()``
has them; tests/test_model_init.py checks that) and draws them from PyTorch's default
distribution for Linear and Conv2d layers: weight and bias uniform in +-1/sqrt(fan_in)
(``kaiming_uniform_(a=sqrt(5))``). Seeded with numpy, so the initial model is the same with or
without torch installed.
"""

from __future__ import annotations

import numpy as np

from federation.codec import TensorDict

# (name prefix, weight shape): Linear weights are (out, in), Conv2d (out, in, kh, kw).
Layer = tuple[str, tuple[int, ...]]

MNIST_LAYERS: tuple[Layer, ...] = (
    ("features.0", (16, 1, 3, 3)), ("features.3", (32, 16, 3, 3)),
    ("classifier.1", (64, 32 * 7 * 7)), ("classifier.3", (10, 64)),
)


def mlp_layers(n_features: int, hidden: tuple[int, ...] = (64, 64)) -> tuple[Layer, ...]:
    """The Linear layers of ``federation.tasks.mlp`` (ReLUs sit at the odd indices)."""
    widths = (n_features, *hidden, 1)
    return tuple((str(2 * i), (widths[i + 1], widths[i])) for i in range(len(widths) - 1))


def task_layers(task: str, n_features: int = 0) -> tuple[Layer, ...]:
    """The layers of ``task``'s model; ValueError for an unknown task or a csv task without features."""
    if task != "csv" and n_features:
        raise ValueError(f"task {task} takes no --csv-features")
    if task == "california":
        return mlp_layers(8)
    if task == "mnist":
        return MNIST_LAYERS
    if task == "csv":
        if n_features < 1:
            raise ValueError("task csv needs --csv-features (the number of feature columns of the model)")
        return mlp_layers(n_features)
    raise ValueError(f"unknown task {task!r}; known tasks: california, mnist, csv")


def initial_weights(task: str, n_features: int = 0, seed: int = 0) -> TensorDict:
    """Fresh float32 weights for ``task``'s model, deterministic given ``seed``."""
    rng = np.random.default_rng(seed)
    weights: TensorDict = {}
    for prefix, shape in task_layers(task, n_features):
        bound = 1.0 / np.sqrt(int(np.prod(shape[1:])))  # fan_in: inputs times kernel size
        weights[f"{prefix}.weight"] = rng.uniform(-bound, bound, size=shape).astype(np.float32)
        weights[f"{prefix}.bias"] = rng.uniform(-bound, bound, size=shape[0]).astype(np.float32)
    return weights
