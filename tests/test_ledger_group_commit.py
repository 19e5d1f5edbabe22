"""Ledger group commit: many records per fsync and one signature per commit group, while every
record stays proven (hash chain up to a signed block) for the writer, verify, monitors and an
outside verifier."""

from __future__ import annotations

import random
from pathlib import Path

import independent_verifier as outsider
import pytest

from ledger import Ed25519Signer, Ledger, LedgerCorrupt, LedgerError, Replica, verify_chain, verify_file
from ledger import core as ledger_core
from ledger.block import Block, make_block
from ledger.storage import read as read_frames

COORD = Ed25519Signer(bytes(range(32)))


def note(i: int) -> dict[str, object]:
    return {"type": "note", "i": i}


def grouped_ledger(path: Path, groups: int = 3, size: int = 5) -> Ledger:
    ledger = Ledger.open(path, signer=COORD, fleet="f")
    for g in range(groups):
        ledger.append_many([note(g * size + i) for i in range(size)])
    return ledger


def count_fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = ledger_core.storage.os.fsync

    def fsync(fd: int) -> None:
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(ledger_core.storage.os, "fsync", fsync)
    return calls


def test_a_batch_costs_one_fsync_and_one_signature(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ledger = Ledger.open(tmp_path / "l.log", signer=COORD, fleet="f")
    fsyncs = count_fsyncs(monkeypatch)
    blocks = ledger.append_many([note(i) for i in range(50)])
    assert len(fsyncs) == 1
    assert [b.index for b in blocks] == list(range(1, 51))
    assert all(b.unsigned for b in blocks[:-1]) and not blocks[-1].unsigned
    assert ledger.head == blocks[-1] and ledger.head.signature  # the head is always signed
    ledger.close()
    # Everything is proven: the signed last block covers the others through prev_hash.
    assert verify_file(tmp_path / "l.log").ok
    assert verify_file(tmp_path / "l.log", signatures="head").ok
    reopened = Ledger.open(tmp_path / "l.log", signer=COORD, verify="all")
    assert reopened.height == 51 and reopened.head.hash == blocks[-1].hash
    reopened.close()


def test_nothing_is_written_before_the_group_ends_and_sign_true_keeps_a_signature(tmp_path: Path) -> None:
    ledger = Ledger.open(tmp_path / "l.log", signer=COORD, fleet="f")
    size = (tmp_path / "l.log").stat().st_size
    with ledger.group_commit() as committed:
        alone = ledger.append(note(0))  # sign=True: may travel alone (a model message, a receipt)
        ledger.append(note(1), sign=False)
        inner = ledger.append(note(2), sign=False)
        assert (tmp_path / "l.log").stat().st_size == size and not committed
        assert inner.unsigned  # not yet: it becomes the group's seal when the group ends
    assert [b.index for b in committed] == [1, 2, 3]
    assert alone.signature and committed[0] is alone
    assert committed[1].unsigned and not committed[2].unsigned
    assert committed[2].hash == inner.hash and ledger.head is committed[2]
    assert [b.to_bytes() for b in committed] == [Block.from_bytes(p).to_bytes()
                                                 for p in read_frames(tmp_path / "l.log").payloads[1:]]


def test_a_single_append_and_a_group_of_one_are_signed(tmp_path: Path) -> None:
    ledger = Ledger.open(tmp_path / "l.log", signer=COORD, fleet="f")
    assert ledger.append(note(0), sign=False).signature  # outside a group: its own group
    assert ledger.append_many([note(1)])[0].signature


def test_a_long_group_is_written_in_signed_pieces(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ledger_core, "MAX_GROUP_BLOCKS", 4)
    ledger = Ledger.open(tmp_path / "l.log", signer=COORD, fleet="f")
    fsyncs = count_fsyncs(monkeypatch)
    blocks = ledger.append_many([note(i) for i in range(10)])
    assert len(fsyncs) == 1
    assert [b.index for b in blocks if not b.unsigned] == [4, 8, 10]


def test_a_crash_inside_a_group_leaves_an_unsealed_tail_that_the_writer_sets_aside(tmp_path: Path) -> None:
    path = tmp_path / "l.log"
    grouped_ledger(path).close()
    scanned = read_frames(path)
    whole = path.read_bytes()
    cut = scanned.offsets[-1]  # the sealing frame never reached the disk; its group's others did
    path.write_bytes(whole[:cut])
    report = verify_file(path)
    assert report.ok and report.height == 11 and "unsealed tail: blocks 11..14" in report.warnings[0]
    assert not verify_chain(Block.from_bytes(p) for p in read_frames(path).payloads).ok
    with pytest.raises(outsider.Invalid, match="last block carries no signature"):
        outsider.verify_chain(outsider.read_frames(str(path)))
    reader = Ledger.open(path)  # read-only: ignored, never cut
    assert reader.height == 11 and path.stat().st_size == cut
    writer = Ledger.open(path, signer=COORD)
    assert writer.height == 11 and writer.head.signature
    assert path.stat().st_size == scanned.offsets[11]
    assert (tmp_path / f"l.log.torn-{scanned.offsets[11]}").read_bytes() == whole[scanned.offsets[11]:cut]
    writer.append(note(99))
    writer.close()
    assert verify_file(path).ok


def test_more_unsigned_blocks_than_a_group_are_never_cut(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "l.log"
    grouped_ledger(path, groups=1, size=8).close()
    path.write_bytes(path.read_bytes()[:read_frames(path).offsets[-1]])
    monkeypatch.setattr(ledger_core, "MAX_GROUP_BLOCKS", 4)
    with pytest.raises(LedgerCorrupt, match="more than one commit group"):
        Ledger.open(path, signer=COORD)


def test_an_unsigned_block_cannot_be_swapped(tmp_path: Path) -> None:
    path = tmp_path / "l.log"
    ledger = grouped_ledger(path)
    blocks = ledger.blocks()
    ledger.close()
    victim = blocks[7]
    assert victim.unsigned
    forged = make_block(victim.index, victim.timestamp, {"type": "note", "i": -1}, victim.prev_hash)
    report = verify_chain([*blocks[:7], forged, *blocks[8:]])
    assert not report.ok and report.bad_index == 8 and "prev_hash" in report.reason
    # An unsigned genesis proves nothing at all.
    genesis = blocks[0]
    bare = Block(0, genesis.timestamp, genesis.data, genesis.prev_hash, genesis.nonce, genesis.hash,
                 version=genesis.version, body=genesis.body)
    report = verify_chain([bare, *blocks[1:]])
    assert not report.ok and report.bad_index == 0 and "genesis" in report.reason


def test_the_outsider_verifies_a_grouped_ledger(tmp_path: Path) -> None:
    path = tmp_path / "l.log"
    grouped_ledger(path).close()
    parsed = outsider.verify_chain(outsider.read_frames(str(path)))
    assert len(parsed) == 16 and sum(1 for b in parsed if b["signature"]) == 4


def test_a_monitor_applies_a_group_when_its_signed_block_arrives(tmp_path: Path) -> None:
    ledger = grouped_ledger(tmp_path / "l.log")
    blocks = ledger.blocks()
    replica = Replica(COORD.public_key)
    replica.offer(blocks[0].to_bytes())
    events = [replica.offer(b.to_bytes()).kind for b in blocks[1:6]]
    assert events == ["held"] * 4 + ["appended"] and replica.height == 6
    # Out of order, with unsigned junk at the same indices: only the chain the seal links is taken.
    rest = blocks[6:]
    random.Random(7).shuffle(rest)
    for b in rest:
        junk = make_block(b.index, b.timestamp, {"type": "note", "i": -b.index}, b.prev_hash)
        replica.offer(junk.to_bytes())
        replica.offer(b.to_bytes())
    assert replica.height == 16 and replica.hashes == [b.hash for b in blocks]
    assert not replica.waiting_for_seal and not replica.pending
    # Unsigned blocks that no signed block seals are held, never applied.
    extra = make_block(16, 1.0, {"type": "note", "i": 0}, blocks[-1].hash)
    assert replica.offer(extra.to_bytes()).kind == "held"
    assert replica.height == 16 and replica.waiting_for_seal


def test_a_failed_group_write_disables_the_writer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ledger = Ledger.open(tmp_path / "l.log", signer=COORD, fleet="f")
    file = ledger._file
    assert file is not None

    def full(payloads: list[bytes], *, sync: bool = True) -> list[int]:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(file, "append_many", full)
    with pytest.raises(OSError), ledger.group_commit():
        ledger.append(note(0), sign=False)
    assert ledger.height == 1 and ledger.chain_root() == ledger.checkpoint(1).root
    monkeypatch.undo()
    with pytest.raises(LedgerError, match="writer disabled"):
        ledger.append(note(1))


def test_a_round_close_is_one_commit_group_announced_after_the_model(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from test_coordinator import TOPICS, Harness, weights

    h = Harness(tmp_path)
    assert h.send("dev-a", h.update("dev-a", 1, weights(1.0))).accepted
    file = h.ledger._file
    assert file is not None
    fsyncs = count_fsyncs(monkeypatch)
    height, published = h.ledger.height, len(h.published)
    assert h.send("dev-b", h.update("dev-b", 1, weights(3.0))).accepted  # the round closes on it
    assert fsyncs.count(file._fd) == 2  # its update record, then the round's three records together
    new = h.ledger.blocks(height)
    assert [b.type for b in new] == ["update", "aggregate", "round.opened", "model.published"]
    assert [bool(b.signature) for b in new] == [True, True, False, True]  # the aggregate travels alone
    after = h.published[published:]
    topics = [t for t, _, _ in after]
    model_at = topics.index(TOPICS.model)
    blocks_at = [i for i, t in enumerate(topics) if t == TOPICS.ledger_blocks]
    assert len(blocks_at) == 4 and blocks_at[1] > model_at  # the model once its records are durable
    heads = [p for t, p, _ in after if t == TOPICS.ledger_head]
    assert [Block.from_bytes(p).hash for p in heads] == [new[0].hash, new[-1].hash]  # heads are signed
    replica = Replica(h.keys.public.sign_public)
    for block in h.ledger:
        replica.offer(block.to_bytes())
    assert replica.height == h.ledger.height
