"""RFC 6962 Merkle tree: root, inclusion and consistency proofs against the RFC's recursive definitions."""

from __future__ import annotations

import hashlib

import pytest

from ledger import merkle
from ledger.merkle import ProofError, leaf_hash, node_hash

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
    for m in range(1, n + 1):
        old_root = ref_mth(ENTRIES[:m])
        proof = merkle.consistency_proof(LEAVES[:n], m)
        if m < n:
            assert proof == ref_subproof(m, ENTRIES[:n], True)
        assert merkle.verify_consistency(m, n, old_root, new_root, proof)
        if m < n:
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


# -- published RFC 6962 vectors and the reference verifier's edge cases -------------------------------
# Data from github.com/transparency-dev/merkle, proof/verify_test.go (the RFC 6962 test tree that
# certificate-transparency's reference code uses): the 8 leaf inputs, the root of each prefix of
# the tree, and the published inclusion and consistency proofs. Leaf indices there are 1-based.

VEC_LEAVES = [bytes.fromhex(h) for h in ("", "00", "10", "2021", "3031", "40414243", "5051525354555657",
                                         "606162636465666768696a6b6c6d6e6f")]
VEC_ROOTS = [bytes.fromhex(h) for h in (
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328")]
_H = {k: bytes.fromhex(v) for k, v in {
    "96a2": "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
    "5f08": "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
    "6b47": "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
    "bc1a": "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
    "ca85": "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
    "d37e": "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "fac5": "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "6e34": "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "0ebc": "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
    "b086": "b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f",
}.items()}
VEC_INCLUSION = [(1, 1, []), (1, 8, ["96a2", "5f08", "6b47"]), (6, 8, ["bc1a", "ca85", "d37e"]), (3, 3, ["fac5"]),
                 (2, 5, ["6e34", "5f08", "bc1a"])]
VEC_CONSISTENCY = [(1, 1, []), (1, 8, ["96a2", "5f08", "6b47"]), (6, 8, ["0ebc", "ca85", "d37e"]),
                   (2, 5, ["5f08", "bc1a"]), (6, 7, ["0ebc", "b086", "d37e"])]
SOME_HASH = bytes.fromhex("abacaba000000000000000000000000000000000000000000060061e00123456")


def test_published_roots() -> None:
    vec_leaves = [leaf_hash(e) for e in VEC_LEAVES]
    for n in range(1, 9):
        assert merkle.root(vec_leaves[:n]) == VEC_ROOTS[n - 1]


@pytest.mark.parametrize(("leaf", "size", "names"), VEC_INCLUSION)
def test_published_inclusion_proofs_and_their_corruptions(leaf: int, size: int, names: list[str]) -> None:
    index, proof, root = leaf - 1, [_H[n] for n in names], VEC_ROOTS[size - 1]
    lh = leaf_hash(VEC_LEAVES[index])
    assert merkle.inclusion_proof([leaf_hash(e) for e in VEC_LEAVES[:size]], index) == proof
    merkle.check_inclusion(lh, index, size, proof, root)
    bad = [(index - 1, size, lh, proof, root), (index + 1, size, lh, proof, root), (index ^ 2, size, lh, proof, root),
           (index, size * 2, lh, proof, root), (index, size // 2, lh, proof, root),
           (index, size, b"WrongLeaf", proof, root), (index, size, lh, proof, merkle.EMPTY_ROOT),
           (index, size, lh, proof, SOME_HASH), (index, size, lh, [*proof, b""], root),
           (index, size, lh, [*proof, root], root), (index, size, lh, [b"", *proof], root),
           (index, size, lh, [root, *proof], root)]
    for i in range(len(proof)):
        flipped = list(proof)
        flipped[i] = bytes([flipped[i][0] ^ 8]) + flipped[i][1:]
        bad.append((index, size, lh, flipped, root))
    if proof:
        bad.append((index, size, lh, proof[:-1], root))
    if len(proof) > 1:
        bad.append((index, size, lh, [proof[0], SOME_HASH, *proof[1:]], root))
    for i, s, h, p, r in bad:
        assert not merkle.verify_inclusion(h, i, s, p, r), (i, s, h, p, r)


@pytest.mark.parametrize(("size1", "size2", "names"), VEC_CONSISTENCY)
def test_published_consistency_proofs_and_their_corruptions(size1: int, size2: int, names: list[str]) -> None:
    proof, root1, root2 = [_H[n] for n in names], VEC_ROOTS[size1 - 1], VEC_ROOTS[size2 - 1]
    assert merkle.consistency_proof([leaf_hash(e) for e in VEC_LEAVES[:size2]], size1) == proof
    merkle.check_consistency(size1, size2, root1, root2, proof)
    if not proof:
        return
    bad = [(size1 - 1, size2, root1, root2, proof), (size1 + 1, size2, root1, root2, proof),
           (size1 ^ 2, size2, root1, root2, proof), (size1, size2 * 2, root1, root2, proof),
           (size1, size2 // 2, root1, root2, proof), (size1, size2, b"WrongRoot", root2, proof),
           (size1, size2, root1, b"WrongRoot", proof), (size1, size2, root2, root1, proof),
           (size1, size2, root1, root2, []), (size1, size2, root1, root2, [*proof, b""]),
           (size1, size2, root1, root2, [*proof, root1]), (size1, size2, root1, root2, [*proof, root2]),
           (size1, size2, root1, root2, [b"", *proof]), (size1, size2, root1, root2, [root1, *proof]),
           (size1, size2, root1, root2, [root2, *proof]), (size1, size2, root1, root2, [proof[0], *proof]),
           (size1, size2, root1, root2, proof[:-1])]
    for i in range(len(proof)):
        flipped = list(proof)
        flipped[i] = bytes([flipped[i][0] ^ 16]) + flipped[i][1:]
        bad.append((size1, size2, root1, root2, flipped))
    for s1, s2, r1, r2, p in bad:
        assert not merkle.verify_consistency(s1, s2, r1, r2, p), (s1, s2, r1, r2, p)


def test_reference_edge_cases() -> None:
    """transparency-dev's TestVerifyConsistency / TestVerifyInclusionSingleEntry tables, with their
    2024 and 2026 rule (PRs #140, #236): a consistency proof from size 0 is always an error."""
    r1, r2 = SOME_HASH, leaf_hash(b"other")
    e = merkle.EMPTY_ROOT
    cases = [  # (size1, size2, root1, root2, proof, ok)
        (0, 0, r1, r2, [], False), (1, 1, r1, r2, [], False), (0, 0, r1, r1, [], False),
        (0, 1, r1, r2, [], False), (1, 1, r2, r2, [], True), (1, 0, r1, r2, [], False),
        (2, 1, r1, r2, [], False), (1, 2, r1, r2, [], False), (0, 0, e, r2, [], False),
        (1, 1, e, r2, [], False), (0, 0, e, e, [e], False), (0, 1, e, e, [e], False), (1, 1, e, e, [e], False),
        # wrong hash sizes never verify, even where the bytes would compare equal
        (1, 1, b"x", b"x", [], False), (1, 1, b"", b"", [], False),
    ]
    for s1, s2, a, b, p, ok in cases:
        assert merkle.verify_consistency(s1, s2, a, b, p) is ok, (s1, s2, a, b, p)
    h = leaf_hash(b"data")
    assert merkle.verify_inclusion(h, 0, 1, [], h)
    for leaf, root in ((b"", h), (h, b""), (b"", b""), (h[:31], h[:31])):
        assert not merkle.verify_inclusion(leaf, 0, 1, [], root)
    for index, size in ((0, 0), (1, 0), (2, 1)):
        assert not merkle.verify_inclusion(SOME_HASH, index, size, [], merkle.EMPTY_ROOT)
    with pytest.raises(ProofError, match="empty tree"):
        merkle.consistency_proof(LEAVES[:4], 0)


GARBAGE: list[object] = [None, "", "00" * 32, 1.0, True, -1, 2**64, [b"\x00" * 32], bytearray(32), object()]


def test_malformed_arguments_return_false_never_raise_something_else() -> None:
    leaves = LEAVES[:5]
    r5, r3 = merkle.root(leaves), merkle.root(leaves[:3])
    path, cproof = merkle.inclusion_proof(leaves, 2), merkle.consistency_proof(leaves, 3)
    good_inclusion = [leaves[2], 2, 5, path, r5]
    good_consistency = [3, 5, r3, r5, cproof]
    assert merkle.verify_inclusion(*good_inclusion) and merkle.verify_consistency(*good_consistency)
    for position in range(5):
        for junk in [*GARBAGE, [None], ["ab"], [b"\x00" * 31]]:
            args = list(good_inclusion)
            args[position] = junk
            assert merkle.verify_inclusion(*args) is False, (position, junk)  # type: ignore[arg-type]
            with pytest.raises(ProofError):
                merkle.check_inclusion(*args)  # type: ignore[arg-type]
            args = list(good_consistency)
            args[position] = junk
            assert merkle.verify_consistency(*args) is False, (position, junk)  # type: ignore[arg-type]
            with pytest.raises(ProofError):
                merkle.check_consistency(*args)  # type: ignore[arg-type]


def test_frontier_root_matches_the_tree_at_every_size() -> None:
    frontier = merkle.Frontier()
    assert frontier.root() == merkle.EMPTY_ROOT
    for n, leaf in enumerate(LEAVES, start=1):
        frontier.append(leaf)
        assert frontier.size == n and frontier.root() == ref_mth(ENTRIES[:n])
