"""Run the global model on a client's inputs: the prediction service's model side.

A predictor checks the shape of the inputs (before anything is charged), then maps raw inputs
to the model's scale, runs the model and maps the outputs back: regression values in the
target's original units (the task's standardisers: California's are computed from the vendored
data, a CSV task's come from an agent's scaler.json), class probabilities for MNIST.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from federation.codec import TensorDict
from federation.datasets import Standardizer

if TYPE_CHECKING:  # federation.tasks imports torch: only a coordinator that predicts loads it
    from federation.tasks import Task


class InputError(ValueError):
    """Inputs of the wrong shape, type or values for this model."""


class Predictor:
    """Inputs -> predictions with one task's model; the torch model is rebuilt only when the
    global model changes (keyed by its hash)."""

    output = "values"
    scaler_sha256: bytes | None = None  # what maps inputs and outputs to the data's units, if anything

    def __init__(self, task: Task) -> None:
        self.task = task
        self._model: Any = None
        self._model_sha256 = b""

    def check(self, x: np.ndarray) -> None:
        raise NotImplementedError

    def _prepare(self, x: np.ndarray) -> Any:
        raise NotImplementedError

    def _finish(self, out: Any) -> np.ndarray:
        raise NotImplementedError

    def __call__(self, model_sha256: bytes, weights: TensorDict, x: np.ndarray) -> np.ndarray:
        import torch

        if self._model is None or model_sha256 != self._model_sha256:
            model = self.task.build_model()
            model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in weights.items()})
            model.eval()
            self._model, self._model_sha256 = model, model_sha256
        with torch.no_grad():
            return self._finish(self._model(self._prepare(x)))


class RegressionPredictor(Predictor):
    """Rows of raw features [n, f] (float) -> predictions [n] in the target's units."""

    def __init__(self, task: Task, features: Standardizer, target: Standardizer) -> None:
        super().__init__(task)
        self.features, self.target = features, target
        self.n_features = int(features.mean.shape[0])
        self.scaler_sha256 = scaler_digest(features, target)

    def check(self, x: np.ndarray) -> None:
        if x.ndim != 2 or x.shape[1] != self.n_features:
            raise InputError(f"inputs must be rows of {self.n_features} features, got shape {list(x.shape)}")
        if x.dtype.kind != "f":
            raise InputError(f"features must be floats, got {x.dtype.name}")
        if not np.isfinite(x).all():
            raise InputError("features contain NaN or Inf")

    def _prepare(self, x: np.ndarray) -> Any:
        import torch

        return torch.from_numpy(self.features.transform(x))

    def _finish(self, out: Any) -> np.ndarray:
        return self.target.inverse_transform(out.reshape(-1).numpy())


class ClassificationPredictor(Predictor):
    """MNIST images [n, 28, 28] (uint8, or floats 0-255) -> class probabilities [n, 10]."""

    output = "probabilities"

    def check(self, x: np.ndarray) -> None:
        if x.ndim != 3 or tuple(x.shape[1:]) != (28, 28):
            raise InputError(f"inputs must be 28x28 images [n, 28, 28], got shape {list(x.shape)}")
        if x.dtype.kind not in "uf":
            raise InputError(f"pixels must be uint8 or floats, got {x.dtype.name}")
        if x.dtype.kind == "f" and (not np.isfinite(x).all() or x.min() < 0 or x.max() > 255):
            raise InputError("pixel values must be finite and within 0..255")

    def _prepare(self, x: np.ndarray) -> Any:
        from federation.tasks import MnistTask

        return MnistTask.prepare(np.clip(x, 0, 255).astype(np.uint8))

    def _finish(self, out: Any) -> np.ndarray:
        import torch

        return torch.softmax(out, dim=1).numpy()


def scaler_digest(features: Standardizer, target: Standardizer) -> bytes:
    """SHA-256 of the standardisers (canonical JSON of scaler.json's ``features`` and ``target``):
    receipts and replies name it beside the model's hash, so an answer in original units says
    which scaler produced them."""
    canonical = json.dumps({"features": features.to_dict(), "target": target.to_dict()}, sort_keys=True,
                           separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).digest()


def load_scaler(path: Path) -> tuple[Standardizer, Standardizer]:
    """Feature and target standardisers from an agent's scaler.json."""
    try:
        data = json.loads(Path(path).read_text())
        return Standardizer.from_dict(data["features"]), Standardizer.from_dict(data["target"])
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"{path}: not an agent's scaler.json ({exc})") from None


def make_predictor(task_name: str, *, n_features: int = 0, scaler: Path | None = None) -> Predictor:
    """The predictor of a task; ``scaler`` (an agent's scaler.json) is required for task csv and
    overrides California's standardisers computed from the vendored data. ValueError when the
    task cannot predict here (torch missing: the `train` extra; a csv task without a scaler)."""
    try:
        from federation.tasks import CaliforniaTask, get_task
    except ImportError as exc:
        raise ValueError(f"predictions need torch, which is not installed ({exc.name}): "
                         "pip install 'fledger[train]'") from None
    if task_name == "mnist":
        return ClassificationPredictor(get_task("mnist"))
    task = get_task(task_name, n_features=n_features or None)
    if scaler is not None:
        features, target = load_scaler(scaler)
    elif isinstance(task, CaliforniaTask):
        features, target = task.central_scalers()
    else:
        raise ValueError("predictions for task csv need --predict-scaler (an agent's scaler.json)")
    predictor = RegressionPredictor(task, features, target)
    expected = getattr(task, "n_features", 8)
    if predictor.n_features != expected:
        raise ValueError(f"the scaler has {predictor.n_features} features, the model {expected}")
    return predictor

