"""Tensor codec: named tensors <-> msgpack bytes (wire format ``fledger.tensors`` v1).

Each tensor travels as raw little-endian bytes with its dtype and shape, never as a list of
floats; the order of the state dict is kept. Decoding is strict and bounded so that bytes
from the network cannot make us allocate without limit or build odd arrays.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from typing import Any

import msgpack
import numpy as np

CODEC_NAME = "fledger.tensors"
CODEC_VERSION = 1

# Only plain numeric dtypes cross the wire; names are numpy's little-endian spellings.
_ALLOWED_DTYPES: dict[str, np.dtype[Any]] = {
    "float32": np.dtype("<f4"),
    "float64": np.dtype("<f8"),
    "float16": np.dtype("<f2"),
    "int64": np.dtype("<i8"),
    "int32": np.dtype("<i4"),
    "uint8": np.dtype("u1"),
}
MAX_TENSORS = 4096
MAX_NDIM = 8
MAX_DIM = 2**31  # per dimension

TensorDict = dict[str, np.ndarray]


class CodecError(ValueError):
    """The bytes are not a valid tensor message."""


def _as_numpy(value: Any) -> np.ndarray:
    # torch tensors are converted without importing torch here (keeps the codec torch-free).
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def encode_tensors(tensors: Mapping[str, Any]) -> bytes:
    """Encode named tensors (numpy arrays or torch tensors), keeping their order."""
    items = []
    for name, value in tensors.items():
        array = _as_numpy(value)
        dtype_name = array.dtype.name
        if dtype_name not in _ALLOWED_DTYPES:
            raise CodecError(f"tensor {name!r}: dtype {dtype_name} is not supported on the wire")
        # astype, not ascontiguousarray (which turns 0-d tensors into 1-d); tobytes is C order.
        wire = array.astype(_ALLOWED_DTYPES[dtype_name], copy=False)
        items.append([name, dtype_name, list(wire.shape), wire.tobytes(order="C")])
    return msgpack.packb(
        {"codec": CODEC_NAME, "v": CODEC_VERSION, "tensors": items}, use_bin_type=True
    )


def decode_tensors(data: bytes, *, max_bytes: int | None = None) -> TensorDict:
    """Decode bytes made by :func:`encode_tensors`; raise :class:`CodecError` on anything odd."""
    if max_bytes is not None and len(data) > max_bytes:
        raise CodecError(f"tensor message of {len(data)} bytes exceeds the limit of {max_bytes}")
    try:
        message = msgpack.unpackb(
            data, raw=False, strict_map_key=True, max_array_len=MAX_TENSORS * 4,
            max_map_len=16, max_str_len=1024,
        )
    except Exception as exc:  # msgpack raises several unrelated types
        raise CodecError(f"not a msgpack tensor message: {exc}") from exc
    if not isinstance(message, dict) or message.get("codec") != CODEC_NAME:
        raise CodecError("not a fledger tensor message")
    if message.get("v") != CODEC_VERSION:
        raise CodecError(f"unsupported tensor codec version {message.get('v')!r}")
    items = message.get("tensors")
    if not isinstance(items, list) or len(items) > MAX_TENSORS:
        raise CodecError("tensor list missing or too long")
    result: TensorDict = {}
    for item in items:
        if not (isinstance(item, list) and len(item) == 4):
            raise CodecError("malformed tensor entry")
        name, dtype_name, shape, raw = item
        if not isinstance(name, str) or name in result:
            raise CodecError(f"bad or repeated tensor name {name!r}")
        if dtype_name not in _ALLOWED_DTYPES:
            raise CodecError(f"tensor {name!r}: dtype {dtype_name!r} not allowed")
        if (
            not isinstance(shape, list)
            or len(shape) > MAX_NDIM
            # bool is an int to Python; a dimension beyond MAX_DIM (2**31) cannot be real here
            # and numpy refuses huge ones even when another dimension is 0
            or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= MAX_DIM for d in shape)
        ):
            raise CodecError(f"tensor {name!r}: bad shape {shape!r}")
        if not isinstance(raw, bytes):
            raise CodecError(f"tensor {name!r}: data is not bytes")
        dtype = _ALLOWED_DTYPES[dtype_name]
        count = math.prod(shape)  # exact: np.prod in int64 wraps for huge shapes
        if count * dtype.itemsize != len(raw):
            raise CodecError(
                f"tensor {name!r}: {len(raw)} bytes do not match shape {shape} of {dtype_name}"
            )
        result[name] = np.frombuffer(raw, dtype=dtype).reshape(tuple(shape))
    return result


def tensors_sha256(data: bytes) -> bytes:
    """Digest of the encoded tensors: the identity of a set of weights on the wire and ledger."""
    return hashlib.sha256(data).digest()


TensorSpec = dict[str, tuple[str, tuple[int, ...]]]


def spec_of(tensors: Mapping[str, Any]) -> TensorSpec:
    """Names, dtypes and shapes: what an update must match to be accepted."""
    spec: TensorSpec = {}
    for name, value in tensors.items():
        array = _as_numpy(value)
        spec[name] = (array.dtype.name, tuple(array.shape))
    return spec


def check_against_spec(tensors: TensorDict, spec: TensorSpec) -> None:
    """Raise CodecError unless ``tensors`` has exactly the spec's names, dtypes and shapes,
    and every floating value is finite."""
    if list(tensors) != list(spec):
        missing = [n for n in spec if n not in tensors]
        extra = [n for n in tensors if n not in spec]
        raise CodecError(f"tensor names differ from the model: missing {missing}, extra {extra}")
    for name, array in tensors.items():
        dtype_name, shape = spec[name]
        if array.dtype.name != dtype_name or tuple(array.shape) != shape:
            raise CodecError(
                f"tensor {name!r}: got {array.dtype.name}{list(array.shape)}, "
                f"model has {dtype_name}{list(shape)}"
            )
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise CodecError(f"tensor {name!r} contains NaN or Inf")
