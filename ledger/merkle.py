"""RFC 6962 / RFC 9162 Merkle trees: root, inclusion and consistency proofs.

leaf hash = SHA-256(0x00 || data); node hash = SHA-256(0x01 || left || right);
the root of the empty tree is SHA-256(""). Functions taking ``leaves`` take *leaf hashes*
(use :func:`leaf_hash` on raw entries first) so callers can cache them.

The verifiers follow RFC 9162 §2.1.3.2 / §2.1.4.2 with the checks of the reference verifier
(github.com/transparency-dev/merkle, ``proof/verify.go``): every hash is exactly 32 bytes, a
proof has exactly the length its sizes call for, ``index < size``, ``old_size <= new_size``,
equal sizes need an empty proof and equal roots, and a consistency proof *from size 0* is an
error (RFC 6962 defines them for ``0 < old_size``; every tree extends the empty tree, so there
is nothing to prove, and a verifier that said "verified" would be vouching for roots it never
looked at). ``check_*`` raise :class:`ProofError` naming the problem; ``verify_*`` return
False instead. Malformed arguments (wrong types, negative sizes) are problems like any other,
never a ``TypeError`` from inside.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

HASH_SIZE = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()
MAX_SIZE = 2**64 - 1  # tree sizes and indices are uint64, as in RFC 9162


class ProofError(ValueError):
    """A proof is malformed or does not verify (the message says which)."""


def leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """Largest power of two strictly smaller than n (n >= 2)."""
    return 1 << ((n - 1).bit_length() - 1)


class Frontier:
    """The roots of the perfect subtrees of a growing tree (a "compact range"): O(log n) per
    append, and the root of the whole tree at any time without rehashing its leaves."""

    def __init__(self) -> None:
        self._stack: list[tuple[int, bytes]] = []  # (size, hash), sizes strictly decreasing powers of two
        self.size = 0

    def append(self, leaf: bytes) -> None:
        size, node = 1, leaf
        while self._stack and self._stack[-1][0] == size:
            left_size, left = self._stack.pop()
            node = node_hash(left, node)
            size += left_size
        self._stack.append((size, node))
        self.size += 1

    def root(self) -> bytes:
        if not self._stack:
            return EMPTY_ROOT
        node = self._stack[-1][1]
        for _, left in reversed(self._stack[:-1]):
            node = node_hash(left, node)
        return node


def root(leaves: Sequence[bytes]) -> bytes:
    """Merkle tree hash of a list of leaf hashes (iterative, O(n))."""
    frontier = Frontier()
    for leaf in leaves:
        frontier.append(leaf)
    return frontier.root()


def root_of_entries(entries: Sequence[bytes]) -> bytes:
    return root([leaf_hash(e) for e in entries])


def inclusion_proof(leaves: Sequence[bytes], index: int) -> list[bytes]:
    """RFC 6962 §2.1.1 audit path for leaf ``index`` in the tree of ``leaves``."""
    if not 0 <= index < len(leaves):
        raise IndexError(f"leaf {index} not in a tree of size {len(leaves)}")
    path: list[bytes] = []
    lo, hi = 0, len(leaves)
    # Walk down from the root, collecting sibling roots; the path is leaf-to-root order.
    while hi - lo > 1:
        k = _split(hi - lo)
        if index < lo + k:
            path.append(root(leaves[lo + k:hi]))
            hi = lo + k
        else:
            path.append(root(leaves[lo:lo + k]))
            lo = lo + k
    path.reverse()
    return path


def consistency_proof(leaves: Sequence[bytes], old_size: int) -> list[bytes]:
    """RFC 6962 §2.1.2 PROOF(m, D[n]) with n = len(leaves), for 0 < m <= n (empty when m = n)."""
    n = len(leaves)
    if old_size == 0:
        raise ProofError("no consistency proof from the empty tree: every tree extends it (RFC 6962 §2.1.2 "
                         "defines proofs for 0 < old size)")
    if not 0 < old_size <= n:
        raise ProofError(f"old size {old_size} not in 1..{n}")
    if old_size == n:
        return []
    return _subproof(leaves, old_size, 0, n, True)


def _subproof(leaves: Sequence[bytes], m: int, lo: int, hi: int, complete: bool) -> list[bytes]:
    n = hi - lo
    if m == n:
        return [] if complete else [root(leaves[lo:hi])]
    k = _split(n)
    if m <= k:
        return [*_subproof(leaves, m, lo, lo + k, complete), root(leaves[lo + k:hi])]
    return [*_subproof(leaves, m - k, lo + k, hi, False), root(leaves[lo:lo + k])]


# -- verifiers --------------------------------------------------------------------------------------

def _size(name: str, value: Any) -> int:
    if type(value) is not int or not 0 <= value <= MAX_SIZE:
        raise ProofError(f"{name} must be an integer in 0..2^64-1, not {value!r}"[:200])
    return value


def _hash(name: str, value: Any) -> bytes:
    if type(value) is not bytes or len(value) != HASH_SIZE:
        length = f"{len(value)} bytes" if isinstance(value, bytes | bytearray) else type(value).__name__
        raise ProofError(f"{name} must be a {HASH_SIZE}-byte hash, not {length}")
    return value


def _path(name: str, value: Any) -> list[bytes]:
    if isinstance(value, str | bytes | bytearray) or not isinstance(value, Sequence):
        raise ProofError(f"{name} must be a list of {HASH_SIZE}-byte hashes, not {type(value).__name__}")
    return [_hash(f"{name}[{i}]", h) for i, h in enumerate(value)]


def check_inclusion(leaf: bytes, index: int, size: int, path: Sequence[bytes], expected_root: bytes) -> None:
    """RFC 9162 §2.1.3.2: raise :class:`ProofError` unless ``leaf`` (a leaf hash) is leaf ``index``
    of the tree of ``size`` leaves with root ``expected_root``."""
    leaf, expected_root = _hash("leaf hash", leaf), _hash("root", expected_root)
    index, size, path = _size("leaf index", index), _size("tree size", size), _path("inclusion path", path)
    if index >= size:
        raise ProofError(f"leaf index {index} is not below tree size {size}")
    fn, sn = index, size - 1
    r = leaf
    for p in path:
        if sn == 0:
            raise ProofError(f"inclusion path too long for leaf {index} of {size}")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            while fn and not fn & 1:
                fn >>= 1
                sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofError(f"inclusion path too short for leaf {index} of {size}")
    if r != expected_root:
        raise ProofError("inclusion path does not lead to the root")


def verify_inclusion(leaf: bytes, index: int, size: int, path: Sequence[bytes], expected_root: bytes) -> bool:
    """True if :func:`check_inclusion` accepts; False for any malformed or wrong proof."""
    try:
        check_inclusion(leaf, index, size, path, expected_root)
    except ProofError:
        return False
    return True


def check_consistency(old_size: int, new_size: int, old_root: bytes, new_root: bytes,
                      proof: Sequence[bytes]) -> None:
    """RFC 9162 §2.1.4.2: raise :class:`ProofError` unless the tree (new_size, new_root) is an
    append-only extension of the tree (old_size, old_root)."""
    old_root, new_root = _hash("old root", old_root), _hash("new root", new_root)
    old_size, new_size = _size("old size", old_size), _size("new size", new_size)
    path = _path("consistency proof", proof)
    if old_size > new_size:
        raise ProofError(f"old size {old_size} is larger than new size {new_size}")
    if old_size == 0:
        raise ProofError("a consistency proof from the empty tree is meaningless: every tree extends it")
    if old_size == new_size:
        if path:
            raise ProofError("equal sizes need an empty proof")
        if old_root != new_root:
            raise ProofError(f"different roots at the same size {old_size}")
        return
    if not path:
        raise ProofError("empty consistency proof")
    if old_size & (old_size - 1) == 0:  # a power of two: the old root is itself a node of the new tree
        path.insert(0, old_root)
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            raise ProofError(f"consistency proof too long for sizes {old_size} -> {new_size}")
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            while fn and not fn & 1:
                fn >>= 1
                sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofError(f"consistency proof too short for sizes {old_size} -> {new_size}")
    if fr != old_root:
        raise ProofError(f"the proof does not lead to the old root: the first {old_size} leaves differ")
    if sr != new_root:
        raise ProofError("the proof does not lead to the new root")


def verify_consistency(old_size: int, new_size: int, old_root: bytes, new_root: bytes,
                       proof: Sequence[bytes]) -> bool:
    """True if :func:`check_consistency` accepts; False for any malformed or wrong proof."""
    try:
        check_consistency(old_size, new_size, old_root, new_root, proof)
    except ProofError:
        return False
    return True
