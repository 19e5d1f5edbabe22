"""RFC 6962 / RFC 9162 Merkle trees: root, inclusion and consistency proofs.

leaf hash = SHA-256(0x00 || data); node hash = SHA-256(0x01 || left || right);
the root of the empty tree is SHA-256(""). Functions taking ``leaves`` take *leaf hashes*
(use :func:`leaf_hash` on raw entries first) so callers can cache them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

EMPTY_ROOT = hashlib.sha256(b"").digest()


class ProofError(ValueError):
    """A proof is malformed or does not verify."""


def leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """Largest power of two strictly smaller than n (n >= 2)."""
    return 1 << ((n - 1).bit_length() - 1)


def root(leaves: Sequence[bytes]) -> bytes:
    """Merkle tree hash of a list of leaf hashes (iterative, O(n))."""
    if not leaves:
        return EMPTY_ROOT
    # Fold complete subtrees left to right: a stack of (size, hash) with decreasing powers of two.
    stack: list[tuple[int, bytes]] = []
    for leaf in leaves:
        size, node = 1, leaf
        while stack and stack[-1][0] == size:
            left_size, left = stack.pop()
            node = node_hash(left, node)
            size += left_size
        stack.append((size, node))
    node = stack.pop()[1]
    while stack:
        node = node_hash(stack.pop()[1], node)
    return node


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


def verify_inclusion(leaf: bytes, index: int, size: int, path: Sequence[bytes], expected_root: bytes) -> bool:
    """RFC 9162 §2.1.3.2: does ``leaf`` (a leaf hash) sit at ``index`` of the tree with ``expected_root``?"""
    if not 0 <= index < size:
        return False
    fn, sn = index, size - 1
    r = leaf
    for p in path:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    return sn == 0 and r == expected_root


def consistency_proof(leaves: Sequence[bytes], old_size: int) -> list[bytes]:
    """RFC 6962 §2.1.2 PROOF(m, D[n]) with n = len(leaves)."""
    n = len(leaves)
    if not 0 <= old_size <= n:
        raise ValueError(f"old size {old_size} not in 0..{n}")
    if old_size in (0, n):
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


def verify_consistency(old_size: int, new_size: int, old_root: bytes, new_root: bytes,
                       proof: Sequence[bytes]) -> bool:
    """RFC 9162 §2.1.4.2: is the tree (new_size, new_root) an append-only extension of (old_size, old_root)?"""
    if not 0 <= old_size <= new_size:
        return False
    if old_size == new_size:
        return not proof and old_root == new_root
    if old_size == 0:
        return not proof  # everything extends the empty tree
    path = list(proof)
    if old_size & (old_size - 1) == 0:  # a power of two: the old root is itself a node of the new tree
        path.insert(0, old_root)
    if not path:
        return False
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    return sn == 0 and fr == old_root and sr == new_root
