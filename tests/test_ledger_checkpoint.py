"""C2SP signed notes and tlog-checkpoints: the Go reference vector, the ledger's own checkpoints,
and what a verifier must refuse."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from conftest import BrokerInfo
from test_coordinator import TOPICS

from federation import records
from federation.fleet_state import FleetLedger
from ledger import Ed25519Signer, LedgerError
from ledger.block import Block
from ledger.checkpoint import (
    Checkpoint,
    NoteError,
    key_id,
    open_checkpoint,
    open_note,
    parse_verifier_key,
    sign_checkpoint,
    sign_note,
    verifier_key,
)
from ledger.merkle import EMPTY_ROOT, check_consistency

# The example key and note of golang.org/x/mod/sumdb/note (note_test.go), the reference
# implementation of signed notes: Ed25519 is deterministic, so signing the same text with the
# same seed must give the published note byte for byte.
GO_SKEY = "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz"
GO_VKEY = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
GO_TEXT = "If you think cryptography is the answer to your problem,\nthen you don't know what your problem is.\n"
GO_NOTE = GO_TEXT + ("\n\u2014 PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfq"
                     "dngotpRZb6KE6RyyBwJnAM=\n")


def go_signer() -> Ed25519Signer:
    raw = base64.b64decode(GO_SKEY.split("+", 4)[4])
    assert raw[0] == 1
    return Ed25519Signer(raw[1:])


def test_reference_note_vector() -> None:
    signer = go_signer()
    name, public = parse_verifier_key(GO_VKEY)
    assert name == "PeterNeumann" and public == signer.public_key
    assert key_id(name, public).hex() == "c74f20a3"
    assert verifier_key(name, public) == GO_VKEY
    assert sign_note(GO_TEXT, name, signer) == GO_NOTE
    assert open_note(GO_NOTE, name, public) == GO_TEXT
    assert open_note(GO_NOTE.encode(), name, public) == GO_TEXT


def test_note_verification_refuses_what_the_spec_refuses() -> None:
    name, public = parse_verifier_key(GO_VKEY)
    other = Ed25519Signer(bytes(range(32)))
    witness_line = sign_note(GO_TEXT, "witness.example", other).split("\n\n")[-1]
    # another key's signature is ignored, ours still decides
    assert open_note(GO_NOTE + witness_line, name, public) == GO_TEXT
    bad = {
        "changed text": GO_NOTE.replace("cryptography", "cryptographY"),
        "only another key": GO_TEXT + "\n" + witness_line,
        "no blank line": GO_NOTE.replace("\n\n", "\n"),
        "hyphen, not em dash": GO_NOTE.replace("\u2014", "-"),
        "bad base64": GO_NOTE.replace("x08go", "x08g!"),
        "truncated signature": GO_NOTE.replace("JnAM=", "Jn=="),
        "control character": GO_NOTE.replace("answer", "ans\twer"),
        "no signatures": GO_TEXT + "\n",
        "same name, other key id": GO_TEXT + "\n" + sign_note(GO_TEXT, name, other).split("\n\n")[-1],
        "too many signatures": GO_NOTE + witness_line * 100,
        "not utf-8": GO_NOTE.encode() + b"\xff",
    }
    for why, note in bad.items():
        with pytest.raises(NoteError):
            open_note(note, name, public)
        assert why
    forged = GO_NOTE.replace("x08go", "y08go")  # same key id, wrong signature bytes
    with pytest.raises(NoteError):
        open_note(forged, name, public)
    for vkey in (GO_VKEY.replace("c74f20a3", "c74f20a4"), "PeterNeumann+c74f20a3", GO_VKEY[:-2], "a b+00+AA==",
                 None, 5, GO_VKEY.encode()):
        with pytest.raises(NoteError):
            parse_verifier_key(vkey)  # type: ignore[arg-type]
    # wrong types are refused as malformed input too, never a TypeError from inside
    for junk in (None, 5, "x", public[:31], public.hex(), [public]):
        with pytest.raises(NoteError):
            open_note(GO_NOTE, name, junk)  # type: ignore[arg-type]
        with pytest.raises(NoteError):
            open_note(GO_NOTE, junk, public)  # type: ignore[arg-type]
        with pytest.raises(NoteError):
            open_note(junk, name, public)  # type: ignore[arg-type]


def test_checkpoint_text_round_trip_and_strict_parsing() -> None:
    cp = Checkpoint("example.com/log", 12, bytes(range(32)))
    assert cp.text() == f"example.com/log\n12\n{base64.b64encode(bytes(range(32))).decode()}\n"
    assert Checkpoint.parse(cp.text()) == cp
    root = base64.b64encode(bytes(32)).decode()
    for text in (f"o\n012\n{root}\n", f"o\n-1\n{root}\n", f"o\n1\n{root}", "o\n1\n\n", f"\n1\n{root}\n",
                 f"o\n1\n{base64.b64encode(bytes(31)).decode()}\n", f"o\n1\n{root}\n\n", f"o\n0\n{root}\n",
                 f"o\n١\n{root}\n"):
        with pytest.raises(NoteError):
            Checkpoint.parse(text)
    assert Checkpoint.parse(f"o\n0\n{base64.b64encode(EMPTY_ROOT).decode()}\n").size == 0


def test_ledger_checkpoints_verify_and_prove_consistency(tmp_path: Path) -> None:
    signer = Ed25519Signer(bytes(32))
    ledger = FleetLedger.open(tmp_path / "l.log", signer=signer, fleet="demo", now=lambda: 1.7e9)
    first = ledger.signed_checkpoint()
    for r in range(1, 6):
        ledger.append(records.round_opened(r))
    second = ledger.signed_checkpoint()
    name, public = parse_verifier_key(ledger.verifier_key())
    assert name == ledger.origin and public == signer.public_key
    assert ledger.origin.startswith("fledger/demo/")
    old, new = open_checkpoint(first, ledger.origin, public), open_checkpoint(second, ledger.origin, public)
    assert (old.size, new.size) == (1, 6) and new.root == ledger.chain_root() and old.root == ledger.chain_root(1)
    check_consistency(old.size, new.size, old.root, new.root, ledger.consistency_proof(old.size, new.size))
    # another log's checkpoint, or the same text under another key, is refused
    other = FleetLedger.open(tmp_path / "m.log", signer=signer, fleet="demo", now=lambda: 1.8e9)
    with pytest.raises(NoteError):
        open_checkpoint(other.signed_checkpoint(), ledger.origin, public)
    with pytest.raises(NoteError):
        open_checkpoint(sign_checkpoint(ledger.checkpoint(), Ed25519Signer(bytes([1]) * 32)), ledger.origin, public)
    ledger.close()
    with FleetLedger.open(tmp_path / "l.log") as reader:
        assert reader.checkpoint() == new and reader.checkpoint(1) == old
        with pytest.raises(LedgerError, match="read-only"):
            reader.signed_checkpoint()


def test_the_coordinator_publishes_a_signed_checkpoint_after_every_block_or_commit_group(tmp_path: Path) -> None:
    from test_coordinator import Harness, weights

    h = Harness(tmp_path)
    assert h.send("dev-a", h.update("dev-a", 1, weights(1.0), n=10)).accepted
    assert h.send("dev-b", h.update("dev-b", 1, weights(2.0), n=20)).accepted  # closes round 1
    notes = [p for t, p, retain in h.published if t == TOPICS.ledger_checkpoint and retain]
    blocks = [Block.from_bytes(p) for t, p, _ in h.published if t == TOPICS.ledger_blocks]
    assert 0 < len(notes) < len(blocks)  # the round's close is one commit group: one checkpoint for three blocks
    origin, public = parse_verifier_key(h.ledger.verifier_key())
    sizes = [open_checkpoint(note, origin, public).size for note in notes]
    assert sizes == sorted(sizes) and sizes[-1] == h.ledger.height
    # every announced block is covered by the next checkpoint, which is the height of a signed block
    assert all(h.ledger.block(size - 1).signature for size in sizes)
    assert all(any(size > b.index for size in sizes) for b in blocks)
    latest = open_checkpoint(notes[-1], origin, public)
    assert latest == h.ledger.checkpoint()
    first = open_checkpoint(notes[0], origin, public)
    check_consistency(first.size, latest.size, first.root, latest.root,
                      h.ledger.consistency_proof(first.size, latest.size))


# -- the command line --------------------------------------------------------------------------------


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    from fledger.cli import main

    code = main(["--log-level", "WARNING", "ledger", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def forked(tmp_path: Path) -> tuple[Path, Path, Path]:
    """An honest ledger, a fork of it (same genesis and key, rewritten after block 3), and the coordinator key file."""
    from federation.keys import CoordinatorKeys

    keys = CoordinatorKeys.generate("demo")
    keys.save(tmp_path / "coordinator.json")
    signer = Ed25519Signer(keys.sign_seed)
    honest = FleetLedger.open(tmp_path / "honest.log", signer=signer, fleet="demo", now=lambda: 1.7e9)
    for r in range(1, 3):
        honest.append(records.round_opened(r))
    honest.close()
    (tmp_path / "fork.log").write_bytes((tmp_path / "honest.log").read_bytes())
    for name, start in (("honest", 3), ("fork", 30)):
        with FleetLedger.open(tmp_path / f"{name}.log", signer=signer, now=lambda: 1.7e9) as ledger:
            for r in range(start, start + 5):
                ledger.append(records.round_opened(r))
    return tmp_path / "honest.log", tmp_path / "fork.log", tmp_path / "coordinator.json"


def test_cli_checkpoints_and_consistency_between_them(forked: tuple[Path, Path, Path], tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    honest, fork, key = forked
    notes = {}
    for name, path, size in (("a", honest, "3"), ("b", honest, "8"), ("fork", fork, "8")):
        code, out, _ = run(capsys, "checkpoint", str(path), "--size", size, "--key", str(key))
        assert code == 0 and out.count("\n\n\u2014 ") == 1
        notes[name] = tmp_path / f"{name}.note"
        notes[name].write_text(out)
    code, vkey, _ = run(capsys, "checkpoint", str(honest), "--verifier-key")
    origin, public = parse_verifier_key(vkey)
    assert open_checkpoint(notes["b"].read_text(), origin, public).size == 8

    code, out, _ = run(capsys, "consistency", str(honest), "--old-checkpoint", str(notes["a"]),
                       "--new-checkpoint", str(notes["b"]))
    result = json.loads(out)
    assert code == 0 and result["verified"] is True and (result["old"], result["new"]) == (3, 8)
    # The coordinator signed two heads that cannot both be true (a split view): a monitor holding
    # both checkpoints and the honest file proves it, and the file's own root tells which it matches.
    code, out, _ = run(capsys, "consistency", str(honest), "--old-checkpoint", str(notes["a"]),
                       "--new-checkpoint", str(notes["fork"]))
    result = json.loads(out)
    assert code == 1 and result["verified"] is False and result["file_matches_new"] is False
    code, _, err = run(capsys, "checkpoint", str(honest), "--verify", str(notes["fork"]))
    assert code == 1 and "DIFFERENT HISTORIES" in err
    assert run(capsys, "checkpoint", str(fork), "--verify", str(notes["fork"]))[0] == 0
    # a note altered in transit does not verify
    notes["a"].write_text(notes["a"].read_text().replace("\n3\n", "\n4\n"))
    code, _, err = run(capsys, "checkpoint", str(honest), "--verify", str(notes["a"]))
    assert code == 1 and "DOES NOT VERIFY" in err


def test_cli_consistency_bad_requests_are_one_line_usage_errors(forked: tuple[Path, Path, Path],
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    honest = str(forked[0])
    for argv in (("--old", "2", "--old-root", "not-hex"), ("--old", "2", "--old-root", "00" * 31),
                 ("--old", "0"), ("--old", "0", "--old-root", "11" * 32), ("--old", "99"),
                 ("--old", "5", "--new", "4")):
        code, out, err = run(capsys, "consistency", honest, *argv)
        assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and "Traceback" not in err, argv
    code, out, _ = run(capsys, "consistency", honest, "--old", "3", "--old-root", "11" * 32)
    assert code == 1 and json.loads(out)["verified"] is False


def test_checkpoint_watch_confirms_notes_and_catches_a_split_view(tmp_path: Path) -> None:
    from ledger.checkpoint import CheckpointWatch, SplitView

    signer = Ed25519Signer(bytes(32))
    ledger = FleetLedger.open(tmp_path / "l.log", signer=signer, fleet="demo", now=lambda: 1.7e9)
    notes = [ledger.signed_checkpoint()]
    for r in range(1, 6):
        ledger.append(records.round_opened(r))
        notes.append(ledger.signed_checkpoint())
    hashes = [b.hash for b in ledger]
    watch = CheckpointWatch(ledger.origin, signer.public_key)
    # notes ahead of the monitor wait for its blocks; one at its height or below is checked at once
    assert watch.note(notes[4], hashes[:2]).size == 5 and watch.latest is None
    assert [c.size for c in watch.blocks(hashes)] == [5]
    watch.note(notes[1], hashes)
    watch.note(notes[5], hashes)
    assert watch.latest is not None and watch.latest.size == 6
    with pytest.raises(NoteError):  # someone else's note: the caller ignores it
        watch.note(sign_checkpoint(ledger.checkpoint(), Ed25519Signer(bytes([7]) * 32)), hashes)
    # the coordinator signs a head for another history with the same origin (a fork of this file)
    fork_path = tmp_path / "fork.log"
    ledger.close()
    fork_path.write_bytes((tmp_path / "l.log").read_bytes())
    with FleetLedger.open(fork_path, signer=signer, now=lambda: 1.7e9) as fork:
        fork.append(records.round_opened(99))
        forked_note = fork.signed_checkpoint()  # size 7: ahead of the monitor
    watch.note(forked_note, hashes)
    with FleetLedger.open(tmp_path / "l.log", signer=signer, now=lambda: 1.7e9) as honest:
        honest.append(records.round_opened(6))
        with pytest.raises(SplitView, match="size 7"):
            watch.blocks([b.hash for b in honest])


def test_follow_counts_junk_and_foreign_checkpoints_without_flooding_the_log(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """What `ledger follow` does with notes on ledger/checkpoint that the pinned coordinator did not
    sign (anyone the broker lets publish could send them): each is counted with the replica's other
    ignored messages and none is an alert; the log names them at the 1st, 2nd, 4th... only."""
    import logging

    from federation.fleet_state import FleetState
    from fledger.ledger_cli import FollowedCheckpoints
    from ledger import Replica

    signer = Ed25519Signer(bytes(32))
    with FleetLedger.open(tmp_path / "l.log", signer=signer, fleet="demo", now=lambda: 1.7e9) as ledger:
        ledger.append(records.round_opened(1))
        blocks, genuine = list(ledger), ledger.signed_checkpoint()
        foreign = sign_checkpoint(ledger.checkpoint(), Ed25519Signer(bytes([7]) * 32))
    replica = Replica(signer.public_key, rules=FleetState)
    followed = FollowedCheckpoints(replica)
    for block in blocks:
        replica.offer(block.to_bytes())
        followed.blocks()
    with caplog.at_level(logging.WARNING, logger="fledger.ledger"):
        for i in range(50):
            followed.note(b"\xff twelve junk" if i % 2 else foreign.encode())
    followed.note(genuine.encode())  # the coordinator's own note still confirms
    assert replica.ignored["checkpoint_not_signed"] == 50
    assert followed.watch is not None and followed.watch.latest is not None
    assert followed.watch.latest.size == len(blocks)
    warnings = [r for r in caplog.records if "ignored a checkpoint" in r.getMessage()]
    assert len(warnings) == 6  # the 1st, 2nd, 4th, 8th, 16th and 32nd


def test_follow_alerts_on_a_signed_checkpoint_of_another_history(tmp_path: Path, embedded_broker: BrokerInfo) -> None:
    """The coordinator publishes blocks of one history but signs a checkpoint of another (what it
    would show someone else): the monitor's replica disagrees with the signed root and it says so."""
    from test_coordinator import FLEET, Harness, weights
    from test_ledger_cli import _follower, _publish_to

    (tmp_path / "coordinator").mkdir()
    h = Harness(tmp_path / "coordinator")
    assert h.send("dev-a", h.update("dev-a", 1, weights(1.0), n=10)).accepted
    copy = tmp_path / "seen.log"
    copy.write_bytes(h.ledger.path.read_bytes())
    fork = tmp_path / "fork.log"
    fork.write_bytes(h.ledger.path.read_bytes()[: _frame_end(h.ledger.path.read_bytes(), 3)])
    with FleetLedger.open(fork, signer=Ed25519Signer(h.keys.sign_seed), fleet=FLEET) as other:
        while other.height < h.ledger.height:
            other.append(records.round_opened(100 + other.height))
        note = other.signed_checkpoint()
    follower = _follower(embedded_broker, copy, h.keys.public.sign_public)
    _, err = _publish_to(follower, embedded_broker, note.encode(), topic=TOPICS.ledger_checkpoint)
    assert follower.returncode == 1, err
    assert "ALERT: split view" in err and f"size {h.ledger.height}" in err


def _frame_end(data: bytes, count: int) -> int:
    """Byte offset just after the first ``count`` frames of a ledger file."""
    pos = 0
    for _ in range(count):
        pos += 12 + int.from_bytes(data[pos + 4:pos + 8], "big")
    return pos
