"""The fleet's one fold of the ledger (federation/fleet_state.py) and the log without it."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from federation import records
from federation.fleet_state import FleetLedger, FleetState, model_named_by, verify_file
from ledger import Ed25519Signer, Ledger, VerifyError, canonical
from ledger import verify_file as verify_log_file

FLEET = "fleet-s"
COORD = Ed25519Signer(bytes(range(32)))
DEV = {"d1": Ed25519Signer(bytes([1] * 32)), "d2": Ed25519Signer(bytes([2] * 32))}


def update(device: str, round_number: int, msg: bytes) -> dict[str, object]:
    st = records.statement(FLEET, device, round_number, DEV[device].key_id, msg.ljust(16, b"."),
                           hashlib.sha256(msg).digest(), 10, {"loss": 0.5})
    return records.update(st, DEV[device].sign(st))


def registration(device: str, created: float) -> dict[str, object]:
    sha = hashlib.sha256(device.encode()).digest()
    st = canonical.encode({"device": device, "sha256": sha, "created": created})
    return records.dataset(device, sha, 100, {"task": "csv"}, key_id=DEV[device].key_id, statement=st,
                           device_sig=DEV[device].sign(st))


def fleet(path: Path) -> FleetLedger:
    ledger = FleetLedger.open(path, signer=COORD, fleet=FLEET)
    for device, signer in DEV.items():
        ledger.append(records.device_key(device, signer.public_key))
        ledger.append(registration(device, 1.0))
    ledger.append(records.model_published(1, bytes(32), initial=True))
    ledger.append(records.round_opened(1))
    ledger.append(update("d1", 1, b"a"))
    ledger.append(records.update_rejected("d2", 1, "bad_tensors", bytes(32), msg_id=b"x" * 16))
    ledger.append(update("d2", 1, b"b"))
    ledger.append(records.aggregate(1, ["d1", "d2"], b"\x01" * 32, "fedavg", {},
                                    merkle_root=ledger.state.merkle_root_for(1)))
    ledger.append(records.round_opened(2))
    ledger.append(records.model_published(2, b"\x01" * 32))
    ledger.append(update("d1", 2, b"c"))
    return ledger


def test_the_fold_is_what_the_chain_says(tmp_path: Path) -> None:
    ledger = fleet(tmp_path / "l")
    state = ledger.state
    assert state.fleet == FLEET and state.height == ledger.height and state.genesis_hash == ledger.block(0).hash
    assert {d for d, _ in state.device_keys.values()} == {"d1", "d2"} and not state.revoked
    assert state.datasets["d1"].created == 1.0 and state.datasets["d1"].key_id == DEV["d1"].key_id
    assert state.rounds[1].devices == ["d1", "d2"] and state.rounds[1].aggregate is not None
    assert [u["device"] for u in state.rounds[2].updates] == ["d1"] and state.rounds[2].aggregate is None
    assert state.rounds[2].opened_at == ledger.block(ledger.height - 3).timestamp
    assert state.model_round == 2 and state.model_block is not None and state.model_block.type == "aggregate"
    assert state.published_rounds == {1, 2} and state.rejected_msg_ids == {b"x" * 16}
    assert b"c".ljust(16, b".") in state.accepted_msg_ids
    # the per-round caps count from the newest round.opened
    assert not state.rejections_this_round and not state.registrations_this_round
    # the run as reports and dashboards read it: results of aggregated rounds, rejections by open round
    history = state.history
    assert list(history.results) == [1] and history.results[1].participants == ["d1", "d2"]
    assert history.results[1].model_sha256 == b"\x01" * 32 and history.results[1].block == ledger.height - 4
    assert history.open_round == 2 and history.rejected == {1: {"bad_tensors": 1}}
    assert not history.rejected_unaggregated()
    # a fold read back from the file equals the one kept on append
    again = FleetState.of(FleetLedger.open(tmp_path / "l"))
    assert again.rounds == state.rounds and again.datasets == state.datasets and again.model_round == 2
    assert again.model_blocks.keys() == state.model_blocks.keys()


def test_a_record_the_rules_refuse_leaves_the_fold_untouched(tmp_path: Path) -> None:
    ledger = fleet(tmp_path / "l")
    before = (ledger.height, dict(ledger.state.rounds[2].__dict__))
    with pytest.raises(VerifyError, match="second accepted update"):
        ledger.append(update("d1", 2, b"d"))
    with pytest.raises(VerifyError, match="merkle_root"):
        ledger.append(records.aggregate(2, ["d1"], bytes(32), "fedavg", {}, merkle_root=bytes(32)))
    assert (ledger.height, dict(ledger.state.rounds[2].__dict__)) == before


def test_model_named_by_reads_aggregates_and_published_models() -> None:
    assert model_named_by(records.aggregate(3, [], b"m" * 32, "fedavg", {}, merkle_root=bytes(32))) == (4, b"m" * 32)
    assert model_named_by(records.model_published(5, b"n" * 32)) == (5, b"n" * 32)
    assert model_named_by(records.round_opened(5)) is None
    assert model_named_by({"type": "aggregate", "round": "5", "model_sha256": b"x"}) is None


def test_the_log_alone_stores_any_record_and_fills_nothing_in(tmp_path: Path) -> None:
    """Without rules the ledger is a generic signed log: it checks the chain, not what records mean."""
    log = Ledger.open(tmp_path / "l", signer=COORD, fleet=FLEET)
    assert log.rules is None
    unrooted = {k: v for k, v in records.aggregate(7, ["ghost"], bytes(32), "fedavg", {},
                                                   merkle_root=bytes(32)).items() if k != "merkle_root"}
    block = log.append(unrooted)
    assert "merkle_root" not in block.data  # stored as given
    log.close()
    assert verify_log_file(tmp_path / "l").ok  # the chain is intact...
    report = verify_file(tmp_path / "l")  # ...but the fleet's rules refuse the record
    assert not report.ok and report.bad_index == 1 and "merkle_root" in report.reason
