"""Canonical msgpack encoding: the one byte string a value hashes to.

Rules (checked on encode, and on decode by re-encoding):
- maps have ``str`` keys, sorted by code point, recursively; no duplicate keys;
- floats are always float64 and finite (NaN and infinities are refused);
- integers use msgpack's shortest form and fit in [-2**63, 2**64 - 1];
- ``str`` is UTF-8 text, ``bytes`` is msgpack bin; tuples become arrays;
- nothing else: no sets, no ext types, no custom objects.
"""

from __future__ import annotations

import math
from typing import Any

import msgpack


class CanonicalError(ValueError):
    """A value cannot be encoded canonically, or bytes are not a canonical encoding."""


_INT_MIN = -(2**63)
_INT_MAX = 2**64 - 1


def normalize(value: Any, path: str = "$") -> Any:
    """Return a copy of ``value`` with sorted map keys and tuples as lists; refuse anything else.

    The copy holds exactly the types :func:`decode` gives back (a str or bytes subclass, such as a
    StrEnum, becomes a plain str or bytes), so a block built from it equals the block read back."""
    if value is None or type(value) is str or type(value) is bool:
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        if not _INT_MIN <= value <= _INT_MAX:
            raise CanonicalError(f"{path}: integer {value} out of the 64-bit range")
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise CanonicalError(f"{path}: float {value!r} is not finite (NaN and infinities are not canonical)")
        return float(value)
    if type(value) is bytes:
        return value
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key in sorted(value, key=_key_of(path)):
            out[key] = normalize(value[key], f"{path}.{key}")
        return out
    if isinstance(value, list | tuple):
        return [normalize(item, f"{path}[{i}]") for i, item in enumerate(value)]
    raise CanonicalError(f"{path}: {type(value).__name__} cannot be encoded canonically "
                         "(allowed: None, bool, int, float, str, bytes, list, tuple, dict with str keys)")


def _key_of(path: str) -> Any:
    def check(key: Any) -> str:
        if not isinstance(key, str):
            raise CanonicalError(f"{path}: map key {key!r} is not a str")
        return key

    return check


def encode(value: Any) -> bytes:
    """Canonical msgpack bytes of ``value`` (validated and normalised first)."""
    return pack_normalized(normalize(value))


def pack_normalized(value: Any) -> bytes:
    """msgpack bytes of a value that is already canonical (sorted dicts, no tuples, finite floats)."""
    return msgpack.packb(value, use_bin_type=True)


def _sorted_pairs(pairs: list[tuple[Any, Any]]) -> dict[str, Any]:
    previous: str | None = None
    for key, _ in pairs:
        if not isinstance(key, str):
            raise CanonicalError(f"map key {key!r} is not a str")
        if previous is not None and key <= previous:
            raise CanonicalError(f"map keys not sorted or duplicated ({previous!r} before {key!r})")
        previous = key
    for _, value in pairs:
        if type(value) is float or type(value) is list:
            _check_finite(value)
    return dict(pairs)


def _no_ext(code: int, data: bytes) -> Any:
    raise CanonicalError(f"ext type {code} is not allowed")


def _check_finite(value: Any) -> None:
    if type(value) is float:
        if not math.isfinite(value):
            raise CanonicalError(f"float {value!r} is not finite")
    elif type(value) is list:
        for item in value:
            _check_finite(item)


def decode(data: bytes, *, max_len: int | None = None) -> Any:
    """Decode canonical bytes; raise :class:`CanonicalError` if they are not the canonical encoding."""
    try:
        value = msgpack.unpackb(data, raw=False, use_list=True, object_pairs_hook=_sorted_pairs,
                                strict_map_key=True, ext_hook=_no_ext)
    except CanonicalError:
        raise
    except Exception as exc:
        raise CanonicalError(f"not msgpack: {type(exc).__name__}: {exc}") from exc
    if pack_normalized(value) != bytes(data):
        raise CanonicalError("bytes are not the canonical encoding of their value "
                             "(non-shortest integer, float32, str/bin mix-up or ext type)")
    return value
