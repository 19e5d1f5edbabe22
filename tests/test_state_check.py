"""The start-up comparison of the local ledger with what the coordinator published (no network)."""

from __future__ import annotations

import pytest

from coordinator.state_check import Evidence, Head, StateRefused, check, model_round_of, signed_head
from federation.crypto import ed25519_public
from federation.fleet_state import FleetLedger
from ledger import Ed25519Signer

HASHES = [bytes([i]) * 32 for i in range(10)]


def evidence(height: int, *heads: Head, model_round: int | None = None, files: tuple[int, ...] = ()) -> Evidence:
    return Evidence(height, lambda i: HASHES[i], model_round, heads, files)


def test_ledger_at_or_ahead_of_every_published_head_starts() -> None:
    assert check(evidence(0)) is None  # a new fleet
    assert "height 5" in str(check(evidence(7, Head(5, HASHES[4], "checkpoint"), Head(7, HASHES[6], "broker"),
                                            model_round=3, files=(1, 2, 3))))


@pytest.mark.parametrize("case, words", [
    (evidence(4, Head(6, HASHES[5], "the broker's retained ledger head")), ["has 4 blocks", "height 6", "restore"]),
    (evidence(0, Head(6, HASHES[5], "the broker's retained ledger head")), ["is empty", "--new-chain"]),
    (evidence(7, Head(6, bytes(32), "checkpoint c")), ["block 5", "different history"]),
    (evidence(7, model_round=2, files=(1, 2, 3)), ["round 3", "only reaches round 2"]),
    (evidence(0, files=(1, 2)), ["round 2", "the ledger is empty"]),
])
def test_behind_or_beside_what_was_published_is_refused(case: Evidence, words: list[str]) -> None:
    with pytest.raises(StateRefused) as refused:
        check(case)
    assert all(w in str(refused.value) for w in words), str(refused.value)
    assert "\n" not in str(refused.value)


def test_a_model_file_written_just_before_a_crash_does_not_stop_the_start() -> None:
    """The next model's file is fsynced before its ledger records (then it is published): a
    crash between the two leaves one file the ledger does not name. With what was published
    known (a head) and no further than the ledger, the coordinator starts (it was refused,
    exit 5, and stayed down: seen in test_coordinator_sigkilled_at_random_moments)."""
    note = check(evidence(7, Head(7, HASHES[6], "checkpoint"), model_round=2, files=(1, 2, 3)))
    assert note is not None and "round 3" in note and "never published" in note
    with pytest.raises(StateRefused, match="round 4"):  # two ahead: not one crash
        check(evidence(7, Head(7, HASHES[6], "checkpoint"), model_round=2, files=(1, 2, 3, 4)))
    with pytest.raises(StateRefused, match="only reaches round 2"):  # nothing known of what was published
        check(evidence(7, model_round=2, files=(1, 2, 3)))


def test_new_chain_only_from_an_empty_state_directory() -> None:
    assert "new chain" in str(check(evidence(0, Head(6, HASHES[5], "broker")), new_chain=True))
    with pytest.raises(StateRefused, match="move the state directory away"):
        check(evidence(0, Head(6, HASHES[5], "broker"), files=(1,)), new_chain=True)
    with pytest.raises(StateRefused, match="has 4 blocks"):  # an existing chain continues, checked as usual
        check(evidence(4, Head(6, HASHES[5], "broker")), new_chain=True)


def test_signed_head_needs_this_coordinators_signature(tmp_path) -> None:  # type: ignore[no-untyped-def]
    seed, other = bytes(range(32)), bytes(range(1, 33))
    ledger = FleetLedger.open(tmp_path / "l.log", signer=Ed25519Signer(seed), fleet="f")
    ledger.append({"type": "model.published", "round": 1, "initial": True, "model_sha256": bytes(32)})
    raw = ledger.head.to_bytes()
    head = signed_head(raw, ed25519_public(seed), "x")
    assert head is not None and head.height == 2 and head.hash == ledger.head.hash
    assert signed_head(raw, ed25519_public(other), "x") is None
    assert signed_head(raw[:-3] + b"abc", ed25519_public(seed), "x") is None
    assert model_round_of(b.data for b in ledger) == 1
