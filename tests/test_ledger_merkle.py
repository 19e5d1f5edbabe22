"""RFC 6962 Merkle tree: root, inclusion and consistency proofs against the RFC's recursive definitions."""

from __future__ import annotations

import hashlib

import pytest

from ledger import merkle
from ledger.merkle import leaf_hash, node_hash

MAX = 64


def ref_mth(entries: list[bytes]) -> bytes:
    """MTH from RFC 6962 §2.1, literally."""
    n = len(entries)
    if n == 0:
        return hashlib.sha256(b"").digest()
    if n == 1:
        return hashlib.sha256(b"\x00" + entries[0]).digest()
    k = 1
    while k * 2 < n:
        k *= 2
    return hashlib.sha256(b"\x01" + ref_mth(entries[:k]) + ref_mth(entries[k:])).digest()


def ref_path(m: int, entries: list[bytes]) -> list[bytes]:
    """PATH(m, D[n]) from RFC 6962 §2.1.1."""
    n = len(entries)
    if n == 1:
        return []
    k = 1
    while k * 2 < n:
        k *= 2
    if m < k:
        return [*ref_path(m, entries[:k]), ref_mth(entries[k:])]
    return [*ref_path(m - k, entries[k:]), ref_mth(entries[:k])]


def ref_subproof(m: int, entries: list[bytes], b: bool) -> list[bytes]:
    """SUBPROOF(m, D[n], b) from RFC 6962 §2.1.2."""
    n = len(entries)
    if m == n:
        return [] if b else [ref_mth(entries)]
    k = 1
    while k * 2 < n:
        k *= 2
    if m <= k:
        return [*ref_subproof(m, entries[:k], b), ref_mth(entries[k:])]
    return [*ref_subproof(m - k, entries[k:], False), ref_mth(entries[:k])]


ENTRIES = [b"entry-%d" % i for i in range(MAX + 1)]
LEAVES = [leaf_hash(e) for e in ENTRIES]


def test_domain_separation() -> None:
    assert leaf_hash(b"x") == hashlib.sha256(b"\x00x").digest()
    assert node_hash(b"a", b"b") == hashlib.sha256(b"\x01ab").digest()
    # a leaf whose data looks like two child hashes does not collide with the node
    a, b = leaf_hash(b"1"), leaf_hash(b"2")
    assert leaf_hash(a + b) != node_hash(a, b)
    assert merkle.root([]) == hashlib.sha256(b"").digest() == merkle.EMPTY_ROOT


@pytest.mark.parametrize("n", range(0, MAX + 1))
def test_root_matches_rfc_definition(n: int) -> None:
    assert merkle.root(LEAVES[:n]) == ref_mth(ENTRIES[:n])
    assert merkle.root_of_entries(ENTRIES[:n]) == ref_mth(ENTRIES[:n])


@pytest.mark.parametrize("n", range(1, MAX + 1))
def test_inclusion_proofs_all_indices(n: int) -> None:
    leaves, root = LEAVES[:n], ref_mth(ENTRIES[:n])
    for i in range(n):
        path = merkle.inclusion_proof(leaves, i)
        assert path == ref_path(i, ENTRIES[:n])
        assert merkle.verify_inclusion(leaves[i], i, n, path, root)
        # wrong leaf, wrong index, wrong size, tampered or shortened path, wrong root: all fail
        assert not merkle.verify_inclusion(LEAVES[n], i, n, path, root)
        assert not merkle.verify_inclusion(leaves[i], i, n, path, bytes(32))
        for j in range(n):
            if j != i:
                assert not merkle.verify_inclusion(leaves[i], j, n, path, root)
        assert not merkle.verify_inclusion(leaves[i], n, n, path, root)
        for k in range(len(path)):
            bad = list(path)
            bad[k] = leaf_hash(bad[k])
            assert not merkle.verify_inclusion(leaves[i], i, n, bad, root)
        if path:
            assert not merkle.verify_inclusion(leaves[i], i, n, path[:-1], root)
        assert not merkle.verify_inclusion(leaves[i], i, n, [*path, root], root)
    with pytest.raises(IndexError):
        merkle.inclusion_proof(leaves, n)


@pytest.mark.parametrize("n", range(1, MAX + 1))
def test_consistency_proofs_all_sizes(n: int) -> None:
    new_root = ref_mth(ENTRIES[:n])
    for m in range(0, n + 1):
        old_root = ref_mth(ENTRIES[:m])
        proof = merkle.consistency_proof(LEAVES[:n], m)
        if 0 < m < n:
            assert proof == ref_subproof(m, ENTRIES[:n], True)
        assert merkle.verify_consistency(m, n, old_root, new_root, proof)
        if 0 < m < n:
            # a different old tree (history rewritten at any leaf) is not consistent
            for changed in range(m):
                other = list(ENTRIES[:m])
                other[changed] = b"rewritten"
                assert not merkle.verify_consistency(m, n, ref_mth(other), new_root, proof)
            assert not merkle.verify_consistency(m, n, old_root, ref_mth(ENTRIES[1:n + 1]), proof)
            for k in range(len(proof)):
                bad = list(proof)
                bad[k] = leaf_hash(bad[k])
                assert not merkle.verify_consistency(m, n, old_root, new_root, bad)
            assert not merkle.verify_consistency(m, n, old_root, new_root, proof[:-1])
    assert not merkle.verify_consistency(n, n - 1, new_root, new_root, [])
    assert not merkle.verify_consistency(n, n, new_root, bytes(32), [])
