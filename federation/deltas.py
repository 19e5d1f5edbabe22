"""Updates as deltas against a named base model (update envelope v2).

A device trains from the global model of version ``v`` (the round it trains for) and sends
``local - base``, naming the base by its SHA-256 (``base_sha256`` in the signed header). The
coordinator adds the aggregated delta to the base it holds. With deltas, the update no longer
depends on which model is current when it arrives: an asynchronous coordinator can fold in a
late update against an older base, and robust strategies (clipping, median, Krum) act on what
each device changed, which is what they measure anyway.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from federation import envelope
from federation.codec import TensorDict, encode_tensors, tensors_sha256
from federation.keys import DeviceBundle


def model_sha256(model: Mapping[str, Any]) -> bytes:
    """The identity of a model: the SHA-256 of its ``fledger.tensors`` encoding."""
    return tensors_sha256(encode_tensors(model))


def _numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor, without importing torch
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def delta(local: Mapping[str, Any], base: Mapping[str, Any]) -> TensorDict:
    """``local - base`` per tensor, in each tensor's own dtype (integer counters too)."""
    if list(local) != list(base):
        raise ValueError("the local model and its base have different tensors")
    out: TensorDict = {}
    for name, value in local.items():
        array, reference = _numpy(value), _numpy(base[name])
        if array.shape != reference.shape or array.dtype != reference.dtype:
            raise ValueError(f"tensor {name!r}: local {array.dtype}{list(array.shape)} vs base "
                             f"{reference.dtype}{list(reference.shape)}")
        out[name] = (array - reference).astype(array.dtype, copy=False)
    return out


def apply_delta(base: Mapping[str, np.ndarray], change: Mapping[str, np.ndarray]) -> TensorDict:
    """``base + change``, added in float64 and cast back to the base's dtypes (integer tensors
    rounded)."""
    if list(base) != list(change):
        raise ValueError("a delta must have the model's tensors")
    out: TensorDict = {}
    for name, array in base.items():
        total = array.astype(np.float64) + np.asarray(change[name], dtype=np.float64)
        if not np.isfinite(total).all():
            raise ValueError(f"tensor {name!r} is not finite after the delta")
        out[name] = (np.rint(total) if array.dtype.kind in "iu" else total).astype(array.dtype)
    return out


def seal_trained(bundle: DeviceBundle, round_number: int, local: Mapping[str, Any], base: Mapping[str, Any],
                 num_samples: int, metrics: dict[str, float], *, dataset_sha256: bytes,
                 now: float | None = None) -> bytes:
    """An update envelope (v2) for a model trained from ``base``, the model of version
    ``round_number``: the delta, sealed with the base's SHA-256."""
    return envelope.seal_update(bundle, round_number, encode_tensors(delta(local, base)), num_samples, metrics,
                                dataset_sha256=dataset_sha256, base_sha256=model_sha256(base), now=now)
