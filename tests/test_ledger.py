"""Unit tests of the ledger package: encoding, blocks, signatures, records, verification, proofs, replica."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import nacl.signing
import pytest

from federation import records
from federation.fleet_state import FleetLedger, FleetState, RoundProof, verify_chain, verify_file, verify_round_proof
from fledger.ledger_format import format_table, to_json
from ledger import (
    Block,
    CanonicalError,
    Ed25519Signer,
    LedgerError,
    ProofError,
    Replica,
    ReplicaAlert,
    VerifyError,
    canonical,
    chain_root_of,
    key_id_of,
    leading_zero_bits,
    make_block,
    verify_consistency,
)
from ledger.block import ZERO_HASH, sign_block

FLEET = "fleet-a"
COORD = Ed25519Signer(bytes(range(32)))
DEV = {"dev1": Ed25519Signer(bytes([1] * 32)), "dev2": Ed25519Signer(bytes([2] * 32)),
       "dev3": Ed25519Signer(bytes([3] * 32))}


def clock(start: float = 1_700_000_000.0) -> Callable[[], float]:
    t = [start]

    def now() -> float:
        t[0] += 0.5
        return t[0]

    return now


def signed_update(device: str, round_number: int, *, n: int = 10, msg: bytes = b"") -> dict[str, Any]:
    signer = DEV[device]
    st = records.statement(FLEET, device, round_number, signer.key_id, (msg or device.encode()).ljust(16, b"."),
                           hashlib.sha256(f"{device}{round_number}".encode()).digest(), n, {"loss": 0.25})
    return records.update(st, signer.sign(st))


def build(path: Path, rounds: int = 2, devices: tuple[str, ...] = ("dev1", "dev2"), start: float = 1.7e9,
          **kw: Any) -> FleetLedger:
    ledger = FleetLedger.open(path, signer=COORD, fleet=FLEET, now=clock(start), **kw)
    for d in devices:
        ledger.append(records.device_key(d, DEV[d].public_key))
        ledger.append(records.dataset(d, hashlib.sha256(d.encode()).digest(), 1234, {"columns": ["a", "b"]}))
    for r in range(1, rounds + 1):
        ledger.append(records.round_opened(r))
        for d in devices:
            ledger.append(signed_update(d, r))
        ledger.append(records.update_rejected("dev1", r, "stale_round", bytes(32)))
        ledger.append(records.aggregate(r, sorted(devices), hashlib.sha256(b"model%d" % r).digest(), "fedavg",
                                        {"test_mse": 0.3}, merkle_root=ledger.state.merkle_root_for(r)))
        ledger.append(records.model_published(r + 1, hashlib.sha256(b"model%d" % r).digest()))
    return ledger


# -- canonical encoding ------------------------------------------------------------------------------


def test_canonical_sorts_keys_recursively_and_uses_float64() -> None:
    a = canonical.encode({"b": 1, "a": {"z": 1.5, "y": [1, (2, 3)]}})
    b = canonical.encode({"a": {"y": [1, [2, 3]], "z": 1.5}, "b": 1})
    assert a == b
    assert canonical.decode(a) == {"a": {"y": [1, [2, 3]], "z": 1.5}, "b": 1}
    assert b"\xcb" in canonical.encode(1.5)  # float64 marker, even when float32 would be exact


@pytest.mark.parametrize("bad", [{1, 2}, float("nan"), float("inf"), {1: "int key"}, object(), 2**64, -(2**63) - 1,
                                 {"x": [float("-inf")]}])
def test_canonical_rejects_non_canonical_values(bad: Any) -> None:
    with pytest.raises(CanonicalError):
        canonical.encode({"type": "x", "v": bad})


@pytest.mark.parametrize("raw", [
    msgpack.packb({"b": 1, "a": 2}),  # unsorted keys
    msgpack.packb(1.5, use_single_float=True),  # float32
    b"\xcd\x00\x05",  # non-shortest integer
    msgpack.packb(msgpack.ExtType(1, b"x")),  # ext type
    msgpack.packb({"a": float("nan")}),  # NaN
])
def test_canonical_decode_rejects_non_canonical_bytes(raw: bytes) -> None:
    with pytest.raises(CanonicalError):
        canonical.decode(raw)


def test_append_rejects_non_canonical_record(tmp_path: Path) -> None:
    ledger = FleetLedger.open(tmp_path / "l", signer=COORD, fleet=FLEET)
    with pytest.raises(CanonicalError, match="set"):
        ledger.append({"type": "note", "tags": {"a", "b"}})
    with pytest.raises(CanonicalError, match="not finite"):
        ledger.append({"type": "note", "loss": math.nan})
    with pytest.raises(ValueError, match="type"):
        ledger.append({"no": "type"})
    assert ledger.height == 1


# -- blocks -----------------------------------------------------------------------------------------


def test_block_roundtrip_hash_and_fields() -> None:
    data = {"type": "anything.new", "x": [1, 2.5, b"\x00"], "nested": {"b": None, "a": True}}
    block = make_block(3, 12.5, data, b"\x11" * 32, signer=COORD)
    again = Block.from_bytes(block.to_bytes())
    assert again == block and again.body == block.body
    expected = hashlib.sha256(canonical.encode([1, 3, 12.5, data, b"\x11" * 32, block.nonce])).digest()
    assert block.hash == expected == block.computed_hash()
    assert block.key_id == COORD.key_id and len(block.signature) == 64
    assert again.data["nested"] == {"a": True, "b": None}


def test_block_from_bytes_rejects_garbage() -> None:
    from ledger import BlockFormatError

    block = make_block(0, 1.0, {"type": "x"}, ZERO_HASH)
    for raw in (b"", b"\xc1", msgpack.packb([1, 2, 3]), msgpack.packb([block.body, b"short", "", b""]),
                msgpack.packb([b"\x93\x01\x02\x03", block.hash, "", b""], use_bin_type=True)):
        with pytest.raises(BlockFormatError):
            Block.from_bytes(raw)


@pytest.mark.parametrize("difficulty", [0, 4, 10])
def test_proof_of_work(difficulty: int) -> None:
    block = make_block(1, 2.0, {"type": "x"}, ZERO_HASH, difficulty=difficulty)
    assert leading_zero_bits(block.hash) >= difficulty


def test_ledger_with_difficulty_and_verify_detects_weak_pow(tmp_path: Path) -> None:
    ledger = FleetLedger.open(tmp_path / "l", signer=COORD, fleet=FLEET, difficulty=6)
    ledger.append({"type": "note"})
    assert all(leading_zero_bits(b.hash) >= 6 for b in ledger)
    assert verify_chain(ledger).ok
    # a block without enough work, correctly hashed and signed, is refused
    weak = sign_block(make_block(2, 3.0, {"type": "note", "n": 0}, ledger.head.hash), COORD)
    nonce = 0
    while leading_zero_bits(weak.hash) >= 6:
        nonce += 1
        weak = sign_block(make_block(2, 3.0, {"type": "note", "n": nonce}, ledger.head.hash), COORD)
    report = verify_chain([*ledger, weak])
    assert not report.ok and report.bad_index == 2 and "proof of work" in report.reason


# -- keys -------------------------------------------------------------------------------------------


def test_signer_pem_roundtrip(tmp_path: Path) -> None:
    signer = Ed25519Signer.generate()
    signer.save(tmp_path / "k.pem")
    loaded = Ed25519Signer.load(tmp_path / "k.pem")
    assert loaded.public_key == signer.public_key and loaded.key_id == key_id_of(signer.public_key)
    assert (tmp_path / "k.pem").stat().st_mode & 0o077 == 0
    # Never over an existing key, and 0600 even when a stale world-readable .tmp lies around.
    with pytest.raises(FileExistsError):
        Ed25519Signer.generate().save(tmp_path / "k.pem")
    assert Ed25519Signer.load(tmp_path / "k.pem").public_key == signer.public_key
    (tmp_path / "k2.pem.tmp").write_text("stale")
    (tmp_path / "k2.pem.tmp").chmod(0o644)
    signer.save(tmp_path / "k2.pem")
    assert (tmp_path / "k2.pem").stat().st_mode & 0o077 == 0 and not (tmp_path / "k2.pem.tmp").exists()


# -- ledger and verification ------------------------------------------------------------------------


def test_ledger_build_reopen_and_verify(tmp_path: Path) -> None:
    ledger = build(tmp_path / "l")
    height, head = ledger.height, ledger.head
    assert ledger.block(0).data["coordinator_key"]["public_key"] == COORD.public_key
    assert [b.index for b in ledger.blocks(2, 5)] == [2, 3, 4]
    ledger.close()
    again = FleetLedger.open(tmp_path / "l", signer=COORD, verify="all")
    assert again.height == height and again.head == head
    report = verify_file(tmp_path / "l", trusted_coordinator_key=COORD.public_key)
    assert report.ok and report.height == height and report.fleet == FLEET, report
    assert "verified" in str(report)
    # read-only open needs no signer and cannot append
    again.close()
    ro = FleetLedger.open(tmp_path / "l")
    with pytest.raises(LedgerError, match="read-only"):
        ro.append({"type": "note"})


def test_aggregate_merkle_root_checked_and_never_filled_in(tmp_path: Path) -> None:
    ledger = build(tmp_path / "l", rounds=1)
    agg = next(b for b in ledger if b.type == "aggregate")
    assert len(agg.data["merkle_root"]) == 32
    ledger.append(records.round_opened(2))
    ledger.append(signed_update("dev1", 2))
    root = ledger.state.merkle_root_for(2)
    with pytest.raises(VerifyError, match="merkle_root"):
        ledger.append(records.aggregate(2, ["dev1"], bytes(32), "fedavg", {}, merkle_root=bytes(32)))
    with pytest.raises(VerifyError, match="participants"):
        ledger.append(records.aggregate(2, ["dev1", "dev2"], bytes(32), "fedavg", {}, merkle_root=root))
    # the log stores what the writer gives it: an aggregate without a root is refused, not completed
    with pytest.raises(VerifyError, match="merkle_root"):
        ledger.append({k: v for k, v in records.aggregate(2, ["dev1"], bytes(32), "fedavg", {},
                                                          merkle_root=root).items() if k != "merkle_root"})


def test_aggregate_states_what_was_used_excluded_and_clipped(tmp_path: Path) -> None:
    """participants = accepted minus excluded; every excluded or clipped device was accepted in
    that round and says why. A coordinator that signs anything else fails verification."""
    ledger = build(tmp_path / "l", rounds=1, devices=("dev1", "dev2", "dev3"))
    ledger.append(records.round_opened(2))
    for d in ("dev1", "dev2", "dev3"):
        ledger.append(signed_update(d, 2))
    why = {"reason": "distance", "distance": 1e6, "median_distance": 1.0}
    lies = [
        ({"participants": ["dev1", "dev2"]}, "participants"),  # dev3 silently dropped
        ({"participants": ["dev1", "dev2"], "excluded": {"dev4": why}}, "participants"),  # not accepted
        ({"participants": ["dev1", "dev2", "dev3"], "excluded": {"dev3": why}}, "excluded"),  # both
        ({"participants": ["dev1", "dev2"], "excluded": {"dev3": {"distance": 1.0}}}, "reason"),
        ({"participants": ["dev1", "dev2"], "excluded": {"dev3": why}, "clipped": {"dev3": why}}, "clipped"),
        ({"participants": ["dev1", "dev2"], "excluded": ["dev3"]}, "excluded"),
    ]
    for fields, reason in lies:
        participants = fields.pop("participants")
        with pytest.raises(VerifyError, match=reason):
            ledger.append(records.aggregate(2, participants, bytes(32), "clipped-fedavg", {},
                                            merkle_root=ledger.state.merkle_root_for(2), **fields))
    honest = ledger.append(records.aggregate(2, ["dev1", "dev2"], bytes(32), "clipped-fedavg", {},
                                             merkle_root=ledger.state.merkle_root_for(2),
                                             excluded={"dev3": why}, clipped={"dev2": {**why, "scale": 0.5}},
                                             strategy_params={"clip_factor": 3.0}))
    assert verify_file(tmp_path / "l").ok
    proof = ledger.inclusion_proof(2, "dev3")  # an excluded update was accepted: it is in the root
    assert proof.verify(honest)
    # The same record re-signed without its exclusion: the chain no longer verifies.
    blocks = list(ledger)
    edited = {k: v for k, v in honest.data.items() if k != "excluded"}
    forged = make_block(honest.index, honest.timestamp, edited, blocks[honest.index - 1].hash, signer=COORD)
    report = verify_chain([*blocks[:honest.index], forged])
    assert not report.ok and report.bad_index == honest.index and "participants" in report.reason


def test_wrong_signer_fleet_and_trusted_key(tmp_path: Path) -> None:
    build(tmp_path / "l", rounds=1).close()
    with pytest.raises(LedgerError, match="coordinator key"):
        FleetLedger.open(tmp_path / "l", signer=Ed25519Signer.generate())
    with pytest.raises(LedgerError, match="fleet"):
        FleetLedger.open(tmp_path / "l", signer=COORD, fleet="other")
    report = verify_file(tmp_path / "l", trusted_coordinator_key=Ed25519Signer.generate().public_key)
    assert not report.ok and report.bad_index == 0 and "trusted key" in report.reason
    with pytest.raises(LedgerError, match="locked"):
        a = FleetLedger.open(tmp_path / "l", signer=COORD)
        FleetLedger.open(tmp_path / "l", signer=COORD)
    a.close()


def test_forged_block_valid_hash_wrong_signature_rejected(tmp_path: Path) -> None:
    ledger = build(tmp_path / "l", rounds=1)
    blocks = list(ledger)
    mallory = Ed25519Signer.generate()
    k = 5
    forged = make_block(k, blocks[k].timestamp, {"type": "note", "text": "forged"}, blocks[k - 1].hash)
    assert forged.computed_hash() == forged.hash  # the hash is valid
    # signed by someone else, claiming the coordinator's key id
    forged = Block(forged.index, forged.timestamp, forged.data, forged.prev_hash, forged.nonce, forged.hash,
                   COORD.key_id, mallory.sign(forged.hash), forged.version, forged.body)
    report = verify_chain([*blocks[:k], forged])
    assert not report.ok and report.bad_index == k and "signature" in report.reason
    # the original block's signature moved onto a different block also fails
    swapped = Block(forged.index, forged.timestamp, forged.data, forged.prev_hash, forged.nonce, forged.hash,
                    COORD.key_id, blocks[k].signature, forged.version, forged.body)
    assert verify_chain([*blocks[:k], swapped]).bad_index == k
    # a tampered data field with the stored hash: bad hash
    tampered_body = blocks[k].body.replace(b"round.opened", b"round.closed", 1)
    assert tampered_body != blocks[k].body
    tampered = Block.from_bytes(msgpack.packb([tampered_body, blocks[k].hash, COORD.key_id, blocks[k].signature]))
    report = verify_chain([*blocks[:k], tampered])
    assert report.bad_index == k and "hash" in report.reason


def test_verify_chain_checks_links_and_indices(tmp_path: Path) -> None:
    blocks = list(build(tmp_path / "l", rounds=1))
    assert verify_chain(blocks).ok
    report = verify_chain(blocks[:3] + blocks[4:])
    assert report.bad_index == 3 and "index" in report.reason
    relinked = sign_block(make_block(3, 1.0, {"type": "note"}, b"\x01" * 32), COORD)
    report = verify_chain([*blocks[:3], relinked])
    assert report.bad_index == 3 and "link" in report.reason
    assert not verify_chain([]).ok


def test_update_record_rules(tmp_path: Path) -> None:
    ledger = FleetLedger.open(tmp_path / "l", signer=COORD, fleet=FLEET)
    with pytest.raises(VerifyError, match="not registered"):
        ledger.append(signed_update("dev1", 1))
    ledger.append(records.device_key("dev1", DEV["dev1"].public_key))
    ledger.append(records.device_key("dev2", DEV["dev2"].public_key))
    good = signed_update("dev1", 1)
    with pytest.raises(VerifyError, match="device signature"):
        ledger.append({**good, "device_sig": bytes(64)})
    with pytest.raises(VerifyError, match="num_samples"):
        ledger.append({**good, "num_samples": 999})
    # dev2 cannot present dev1's statement as its own
    with pytest.raises(VerifyError):
        ledger.append({**good, "device": "dev2", "key_id": DEV["dev2"].key_id})
    # a statement for another fleet
    st = records.statement("other", "dev1", 1, DEV["dev1"].key_id, b"x" * 16, bytes(32), 1, {})
    with pytest.raises(VerifyError, match="fleet"):
        ledger.append(records.update(st, DEV["dev1"].sign(st)))
    ledger.append(good)
    with pytest.raises(VerifyError, match="second accepted update"):
        ledger.append(signed_update("dev1", 1, msg=b"again"))
    ledger.append(records.device_key_revoked("dev2", DEV["dev2"].key_id, "stolen"))
    with pytest.raises(VerifyError, match="revoked"):
        ledger.append(signed_update("dev2", 1))
    with pytest.raises(VerifyError, match="revoked"):
        ledger.append(records.device_key("dev2", DEV["dev2"].public_key))
    with pytest.raises(VerifyError, match="not registered to"):
        ledger.append(records.device_key_revoked("dev1", DEV["dev2"].key_id, "x"))
    ledger.append(records.aggregate(1, ["dev1"], bytes(32), "fedavg", {}, merkle_root=ledger.state.merkle_root_for(1)))
    ledger.append(records.device_key("dev3", DEV["dev3"].public_key))
    with pytest.raises(VerifyError, match="aggregated"):
        ledger.append(signed_update("dev3", 1))
    assert verify_chain(ledger, COORD.public_key).ok


def test_unknown_record_types_are_stored_and_hashed(tmp_path: Path) -> None:
    ledger = FleetLedger.open(tmp_path / "l", signer=COORD, fleet=FLEET)
    block = ledger.append({"type": "future.thing", "payload": {"z": [1, 2], "a": b"\xff"}})
    ledger.close()
    again = FleetLedger.open(tmp_path / "l")
    assert again.block(1) == block and again.block(1).data["payload"]["a"] == b"\xff"
    assert verify_file(tmp_path / "l").ok


# -- round inclusion proofs ---------------------------------------------------------------------------


def test_round_inclusion_proof(tmp_path: Path) -> None:
    ledger = build(tmp_path / "l", rounds=2, devices=("dev1", "dev2", "dev3"))
    for r in (1, 2):
        for d in ("dev1", "dev2", "dev3"):
            proof = ledger.inclusion_proof(r, d)
            agg = ledger.block(proof.aggregate_index)
            assert proof.tree_size == 3 and proof.root == agg.data["merkle_root"]
            verify_round_proof(proof, agg, COORD.public_key, statement=ledger.block(proof.update_index)
                               .data["statement"])
            assert RoundProof.from_dict(json.loads(proof.to_json())) == proof
    # a device that was not in the round: no proof
    with pytest.raises(ProofError, match="no accepted update"):
        ledger.inclusion_proof(1, "dev9")
    with pytest.raises(ProofError, match="no aggregate"):
        ledger.inclusion_proof(7, "dev1")
    proof = ledger.inclusion_proof(1, "dev1")
    agg = ledger.block(proof.aggregate_index)
    # claiming dev1's proof for a device that was not in the round fails
    with pytest.raises(ProofError):
        verify_round_proof(RoundProof(**{**proof.__dict__, "device": "dev9"}), agg)
    # dev1's round-2 update does not verify against round 1's root
    other = ledger.inclusion_proof(2, "dev1")
    forged = RoundProof(**{**proof.__dict__, "statement": other.statement, "device_sig": other.device_sig,
                           "leaf": other.leaf})
    assert not forged.verify()
    # a wrong path, index or aggregate block fails
    assert not RoundProof(**{**proof.__dict__, "leaf_index": 1}).verify()
    assert not RoundProof(**{**proof.__dict__, "path": [bytes(32)] * len(proof.path)}).verify()
    assert not proof.verify(ledger.block(other.aggregate_index))
    assert not proof.verify(agg, Ed25519Signer.generate().public_key)
    assert proof.verify(agg, COORD.public_key)


def test_round_proof_for_device_outside_round(tmp_path: Path) -> None:
    ledger = FleetLedger.open(tmp_path / "l", signer=COORD, fleet=FLEET)
    for d in DEV:
        ledger.append(records.device_key(d, DEV[d].public_key))
    ledger.append(signed_update("dev1", 1))
    ledger.append(signed_update("dev2", 1))
    ledger.append(records.aggregate(1, ["dev1", "dev2"], bytes(32), "fedavg", {},
                                    merkle_root=ledger.state.merkle_root_for(1)))
    with pytest.raises(ProofError):
        ledger.inclusion_proof(1, "dev3")
    # dev3 builds its own leaf and tries a real path: it cannot land on the root
    st = records.statement(FLEET, "dev3", 1, DEV["dev3"].key_id, b"z" * 16, bytes(32), 1, {})
    real = ledger.inclusion_proof(1, "dev2")
    fake = RoundProof(**{**real.__dict__, "device": "dev3", "statement": st, "device_sig": DEV["dev3"].sign(st),
                         "leaf": records.update_leaf(st, DEV["dev3"].sign(st))})
    assert not fake.verify(ledger.block(real.aggregate_index))


# -- chain consistency --------------------------------------------------------------------------------


def test_chain_consistency_between_heights(tmp_path: Path) -> None:
    ledger = build(tmp_path / "l", rounds=3)
    n = ledger.height
    for old in range(1, n + 1):
        old_root = ledger.chain_root(old)
        proof = ledger.consistency_proof(old)
        assert verify_consistency(old, n, old_root, ledger.chain_root(), proof)
    with pytest.raises(ProofError):  # nothing to prove from the empty chain (RFC 6962 §2.1.2)
        ledger.consistency_proof(0)
    # a rewritten history is not consistent
    other = build(tmp_path / "m", rounds=3, start=1.8e9)  # different timestamps -> different hashes
    assert not verify_consistency(5, n, other.chain_root(5), ledger.chain_root(), ledger.consistency_proof(5))


# -- replica ----------------------------------------------------------------------------------------


def test_replica_follows_and_catches_up_with_gaps(tmp_path: Path) -> None:
    blocks = list(build(tmp_path / "l", rounds=2))
    replica = Replica(trusted_coordinator_key=COORD.public_key, rules=FleetState)
    assert replica.ingest(blocks[0].to_bytes()).kind == "appended"
    # a new monitor sees the retained head first: gap, then the replay fills it
    event = replica.ingest(blocks[-1])
    assert event.kind == "gap" and replica.missing() == (1, len(blocks) - 2)
    for b in blocks[1:-1]:
        replica.ingest(b)
    assert replica.height == len(blocks) and replica.missing() is None
    assert replica.ingest(blocks[3]).kind == "duplicate"
    with pytest.raises(ReplicaAlert) as info:
        Replica(strict_gaps=True, rules=FleetState).ingest(blocks[2])
    assert info.value.kind == "gap"
    # before genesis, a pinned key still rejects forged blocks; without one they wait for genesis
    mallory = Ed25519Signer.generate()
    forged = make_block(3, 1.0, {"type": "note"}, blocks[2].hash, signer=mallory)
    with pytest.raises(ReplicaAlert) as info:
        Replica(trusted_coordinator_key=COORD.public_key, rules=FleetState).ingest(forged)
    assert info.value.kind == "bad_signature"
    naive = Replica(rules=FleetState)
    assert naive.ingest(forged).kind == "gap"
    assert naive.ingest(blocks[3]).kind == "gap"  # the real block replaces the unverifiable one
    for b in blocks:
        naive.ingest(b)
    assert naive.height == len(blocks)
    naive2 = Replica(rules=FleetState)
    naive2.ingest(blocks[3])
    naive2.ingest(forged)  # junk from anyone on the topic does not displace the real block
    naive2.ingest_all(blocks)
    assert naive2.height == len(blocks)


def _rewrite_from(blocks: list[Block], k: int) -> list[Block]:
    """What a dishonest coordinator does: change block k, re-hash and re-sign k and everything after."""
    out = list(blocks[:k])
    for b in blocks[k:]:
        data = {**b.data, "text": "rewritten"} if b.index == k else b.data
        out.append(make_block(b.index, b.timestamp, data, out[-1].hash, signer=COORD))
    return out


def test_replica_detects_rewritten_block(tmp_path: Path) -> None:
    ledger = build(tmp_path / "l", rounds=2)
    ledger.append({"type": "note", "text": "original"})
    blocks = list(ledger)
    k = 4
    rewritten = _rewrite_from(blocks, k)
    assert verify_chain(rewritten).ok  # internally consistent, correctly signed...
    replica = Replica(trusted_coordinator_key=COORD.public_key, rules=FleetState)
    replica.ingest_all(blocks)
    with pytest.raises(ReplicaAlert) as info:  # ...but not what the monitor saw
        replica.ingest(rewritten[k])
    assert info.value.kind == "rewrite" and info.value.index == k
    # a fork at the head and a block that does not extend the head
    with pytest.raises(ReplicaAlert) as info:
        replica.ingest(rewritten[-1])
    assert info.value.kind == "fork"
    nxt = make_block(len(blocks), 1.0, {"type": "note"}, rewritten[-1].hash, signer=COORD)
    with pytest.raises(ReplicaAlert) as info:
        replica.ingest(nxt)
    assert info.value.kind == "fork"
    # a monitor holding only (height, chain root) catches it with a consistency proof too
    n = len(blocks)
    assert chain_root_of(blocks) == ledger.chain_root()
    assert not verify_consistency(n - 1, n, chain_root_of(blocks[:-1]), chain_root_of(rewritten),
                                  ledger.consistency_proof(n - 1))


def test_replica_bad_signature_and_bad_hash(tmp_path: Path) -> None:
    blocks = list(build(tmp_path / "l", rounds=1))
    replica = Replica(rules=FleetState)
    replica.ingest_all(blocks[:4])
    mallory = Ed25519Signer.generate()
    bad_sig = dataclasses.replace(blocks[4], signature=mallory.sign(blocks[4].hash))
    with pytest.raises(ReplicaAlert) as info:
        replica.ingest(bad_sig)
    assert info.value.kind == "bad_signature"
    bad_hash = Block.from_bytes(msgpack.packb([blocks[4].body, bytes(32), COORD.key_id, blocks[4].signature]))
    with pytest.raises(ReplicaAlert) as info:
        replica.ingest(bad_hash)
    assert info.value.kind == "bad_hash"
    with pytest.raises(ReplicaAlert) as info:
        replica.ingest(b"junk")
    assert info.value.kind == "malformed"
    replica.ingest(blocks[4])  # the real block is still accepted


def test_replica_stores_what_it_verified_not_what_arrived_first(tmp_path: Path) -> None:
    """A new monitor without a pinned key sees live blocks ahead of its replay; someone posts a
    forged block at a missing index before the genuine one arrives. What the monitor keeps
    (on_append) must be the genuine block: a stored forgery would later look like a coordinator
    misbehaving."""
    blocks = list(build(tmp_path / "l", rounds=1))
    stored: list[Block] = []
    replica = Replica(on_append=stored.append, rules=FleetState)
    mallory = Ed25519Signer.generate()
    forged = make_block(3, 1.0, {"type": "note"}, blocks[2].hash, signer=mallory)
    replica.ingest(blocks[3])  # live, ahead of the replay: gaps
    replica.ingest(blocks[4])
    replica.ingest(forged)  # unverifiable yet: held as a second candidate for index 3
    for b in blocks:
        replica.ingest(b)
    assert [b.hash for b in stored] == [b.hash for b in blocks]
    # Junk held alone for an index is dropped once the key is known; the index stays missing.
    alone: list[Block] = []
    lonely = Replica(on_append=alone.append, rules=FleetState)
    lonely.ingest(forged)
    lonely.ingest_all(blocks[:3])
    assert lonely.height == 3 and lonely.missing() is None
    lonely.ingest_all(blocks[3:])
    assert [b.hash for b in alone] == [b.hash for b in blocks]
    # Candidates per index are bounded while no key is known.
    flood = Replica(rules=FleetState)
    with pytest.raises(ReplicaAlert) as info:
        for n in range(100):
            flood.ingest(make_block(3, float(n), {"type": "note"}, blocks[2].hash, signer=mallory))
    assert info.value.kind == "gap" and "unverified" in info.value.reason


def test_a_forged_genesis_is_a_bad_signature_not_a_rewrite(tmp_path: Path) -> None:
    blocks = list(build(tmp_path / "l", rounds=1))
    mallory = Ed25519Signer.generate()
    fake_genesis = make_block(0, 1.0, records.genesis(FLEET, mallory.public_key), ZERO_HASH,
                              signer=mallory)
    fake_chain = [fake_genesis, *(make_block(b.index, b.timestamp, b.data, ZERO_HASH, signer=mallory)
                                  for b in blocks[1:2])]
    pinned = verify_chain(fake_chain, COORD.public_key)
    assert not pinned.ok and pinned.bad_index == 0
    replica = Replica(rules=FleetState)
    replica.ingest_all(blocks)  # trust on first use: the genuine genesis came first
    with pytest.raises(ReplicaAlert) as info:
        replica.ingest(fake_genesis)
    assert info.value.kind == "bad_signature" and info.value.index == 0
    with pytest.raises(ReplicaAlert) as info:
        Replica(trusted_coordinator_key=COORD.public_key, rules=FleetState).ingest(fake_genesis)
    assert info.value.kind == "bad_signature"


def test_malformed_records_are_verify_errors_not_crashes(tmp_path: Path) -> None:
    """A dishonest coordinator signs records of the wrong shape: verification names the block
    (and a monitor alerts) instead of raising TypeError."""
    genesis = make_block(0, 1.0, {"type": "genesis", "fleet": FLEET, "difficulty": 0, "version": 1,
                                  "coordinator_key": {"key_id": COORD.key_id, "public_key": "not bytes"}},
                         ZERO_HASH, signer=COORD)
    report = verify_chain([genesis])
    assert not report.ok and report.bad_index == 0
    with pytest.raises(ReplicaAlert):
        Replica(rules=FleetState).ingest(genesis)
    blocks = list(build(tmp_path / "l", rounds=1))
    agg_index = next(b.index for b in blocks if b.data["type"] == "aggregate")
    bad = make_block(agg_index, 1.0, {**blocks[agg_index].data, "participants": [{}]}, blocks[agg_index - 1].hash,
                     signer=COORD)
    report = verify_chain([*blocks[:agg_index], bad])
    assert not report.ok and report.bad_index == agg_index and "participants" in report.reason
    replica = Replica(rules=FleetState)
    replica.ingest_all(blocks[:agg_index])
    with pytest.raises(ReplicaAlert) as info:
        replica.ingest(bad)
    assert info.value.kind == "invalid"


# -- output -----------------------------------------------------------------------------------------


def test_format_table_and_json(tmp_path: Path) -> None:
    blocks = list(build(tmp_path / "l", rounds=1))
    table = format_table(blocks)
    assert "genesis" in table and "aggregate" in table and "dev1" in table
    assert len(table.splitlines()) == len(blocks) + 2
    parsed = json.loads(to_json(blocks))
    assert parsed[0]["data"]["coordinator_key"]["public_key"] == COORD.public_key.hex()
    update = next(p for p in parsed if p["data"]["type"] == "update")
    assert update["data"]["statement_decoded"]["device"] == "dev1"
    assert parsed[-1]["hash"] == blocks[-1].hash.hex()


def test_ledger_imports_nothing_from_the_project() -> None:
    import ast

    allowed = {"ledger", "msgpack", "Crypto", "nacl"}
    import sys

    stdlib = sys.stdlib_module_names
    for path in Path(__file__).resolve().parent.parent.joinpath("ledger").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for name in names:
                top = name.split(".")[0]
                assert top in allowed or top in stdlib or top == "__future__", f"{path.name} imports {name}"


def test_replica_offer_acts_only_on_what_the_pinned_coordinator_signed(tmp_path: Path) -> None:
    """What a monitor does with messages off the ledger topics: junk, bad hashes, other keys'
    blocks and a forged genesis are counted and ignored (never an alert) and never stored;
    the genuine chain is taken; a contradiction the coordinator signed is still an alert."""
    ledger = build(tmp_path / "l", rounds=1)
    blocks = list(ledger)
    mallory = Ed25519Signer.generate()
    forged = make_block(3, 1.0, {"type": "note"}, blocks[2].hash, signer=mallory)
    fake_genesis = make_block(0, 1.0, records.genesis(FLEET, mallory.public_key), ZERO_HASH, signer=mallory)
    bad_hash = msgpack.packb([blocks[1].body, bytes(32), COORD.key_id, blocks[1].signature])
    junk = [b"twelve bytes", bad_hash, forged.to_bytes(), fake_genesis.to_bytes()]

    stored: list[Block] = []
    pinned = Replica(COORD.public_key, on_append=stored.append, rules=FleetState)
    for raw in junk:
        assert pinned.offer(raw).kind == "ignored"
    for b in blocks:
        pinned.offer(b.to_bytes())
        for raw in junk:  # also interleaved with the genuine chain
            assert pinned.offer(raw).kind == "ignored"
    assert pinned.height == len(blocks) and [b.hash for b in stored] == [b.hash for b in blocks]
    assert pinned.ignored["malformed"] and pinned.ignored["bad_hash"] and pinned.ignored["not_coordinator_signed"]
    with pytest.raises(ReplicaAlert) as info:  # signed by the coordinator, and contradicting: an alert
        pinned.offer(_rewrite_from(blocks, 2)[2].to_bytes())
    assert info.value.kind == "rewrite"

    # Pinned by the genesis hash: nothing is taken before that genesis, no other genesis is.
    by_genesis = Replica(genesis_hash=blocks[0].hash, rules=FleetState)
    assert by_genesis.offer(blocks[3].to_bytes()).message.startswith("unverifiable")
    assert by_genesis.offer(fake_genesis.to_bytes()).message.startswith("not_pinned_genesis")
    for b in blocks:
        by_genesis.offer(b.to_bytes())
    assert by_genesis.height == len(blocks) and by_genesis.offer(forged.to_bytes()).kind == "ignored"

    # Nothing pinned: nothing is taken, unless trust on first use was asked for, which takes
    # the first genesis that signs itself (so a forger who is first wins: hence the flag).
    assert Replica(rules=FleetState).offer(blocks[0].to_bytes()).kind == "ignored"
    tofu = Replica(trust_on_first_use=True, rules=FleetState)
    unsigned = dataclasses.replace(fake_genesis, signature=bytes(64))
    assert tofu.offer(unsigned.to_bytes()).message.startswith("bad_genesis")
    assert tofu.offer(blocks[0].to_bytes()).kind == "appended"


def test_a_vouched_device_signature_is_not_verified_again_on_append_but_only_those_bytes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The coordinator's admission has just verified an update's signature: the append's check
    of those very bytes need not repeat it. A vouch for other bytes (another signature, key or
    statement) changes nothing, and verifying the file afterwards checks every signature."""
    ledger = FleetLedger.open(tmp_path / "l.log", signer=COORD, fleet=FLEET, now=clock())
    for d in ("dev1", "dev2"):
        ledger.append(records.device_key(d, DEV[d].public_key))
        ledger.append(records.dataset(d, hashlib.sha256(d.encode()).digest(), 1234, {"columns": ["a"]}))
    ledger.append(records.round_opened(1))
    verified: list[bytes] = []  # messages libsodium verified
    real = nacl.signing.VerifyKey.verify

    def counting(self: nacl.signing.VerifyKey, smessage: bytes, signature: bytes | None = None) -> bytes:
        verified.append(bytes(smessage))
        return real(self, smessage, signature)

    good = signed_update("dev1", 1)
    ledger.vouch(DEV["dev1"].public_key, good["statement"], good["device_sig"])
    monkeypatch.setattr(nacl.signing.VerifyKey, "verify", counting)
    ledger.append(good)
    assert good["statement"] not in verified  # vouched: not verified again
    forged = signed_update("dev2", 1)
    ledger.vouch(DEV["dev2"].public_key, forged["statement"], bytes(64))  # a vouch for other bytes
    with pytest.raises(VerifyError, match="device signature"):
        ledger.append({**forged, "device_sig": bytes(63) + b"\x01"})
    ledger.append(forged)
    assert verified.count(forged["statement"]) == 2  # checked as ever, the forgery and then the genuine one
    monkeypatch.undo()
    ledger.close()
    assert verify_file(tmp_path / "l.log").ok
    bad = tmp_path / "bad.log"
    bad_ledger = FleetLedger.open(bad, signer=COORD, fleet=FLEET, now=clock())
    bad_ledger.append(records.device_key("dev1", DEV["dev1"].public_key))
    bad_ledger.append(records.dataset("dev1", hashlib.sha256(b"dev1").digest(), 1234, {"columns": ["a"]}))
    bad_ledger.append(records.round_opened(1))
    statement = signed_update("dev1", 1)["statement"]
    bad_ledger.vouch(DEV["dev1"].public_key, statement, bytes(64))  # a false vouch: the ledger trusts its caller,
    bad_ledger.append({**signed_update("dev1", 1), "device_sig": bytes(64)})
    bad_ledger.close()
    assert not verify_file(bad).ok  # but verifying the file proves every signature
