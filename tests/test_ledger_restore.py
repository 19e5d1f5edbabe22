"""`fledger ledger restore` refuses what it must (real `fledger` processes on real files): a replica
not signed by this coordinator's key, a replica of a different history, one behind the ledger, a
state directory in use, a missing model file; and rebuilds a rolled-back ledger from a good one."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from test_coordinator import FLEET, Harness, weights

from coordinator import state_guard
from coordinator.restore import apply_request
from coordinator.restore import request_path as restore_request_path
from federation import exit_codes, records
from federation.fleet_state import FleetLedger, verify_file
from fledger.ledger_cli import ReplicaFile
from ledger import Ed25519Signer, storage


def run_fleet(tmp: Path) -> Harness:
    tmp.mkdir()
    h = Harness(tmp)
    for round_number in (1, 2):
        for device in ("dev-a", "dev-b"):
            assert h.send(device, h.update(device, round_number, weights(float(round_number)))).accepted
    h.ledger.close()
    return h


def replica_of(log: Path, path: Path, blocks: int | None = None) -> Path:
    replica = ReplicaFile(path)
    for block in list(FleetLedger.open(log))[:blocks]:
        replica.append(block.to_bytes())
    return path


def restore(state: Path, replica: Path, keys: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fledger.cli", "ledger", "restore", "--replica", str(replica),
                           "--state-dir", str(state), "--keys", str(keys)], capture_output=True, text=True, timeout=60)


def test_restore_checks_the_replica_against_the_coordinators_key_and_the_ledger(tmp_path: Path) -> None:
    state = tmp_path / "state"
    h = run_fleet(state)
    keys = tmp_path / "coordinator.json"
    h.keys.save(keys)
    log = state / "ledger.log"
    good = log.read_bytes()
    offsets = storage.scan(good).offsets
    replica = replica_of(log, tmp_path / "good.replica")

    # Another coordinator's chain (same fleet name, another key) is refused: nothing changes.
    other = run_fleet(tmp_path / "other")
    forged = replica_of(other.tmp / "ledger.log", tmp_path / "forged.replica")
    done = restore(state, forged, keys)
    assert done.returncode == exit_codes.TAMPERED and "does not verify against" in done.stderr, done.stderr
    assert log.read_bytes() == good

    # A replica behind the ledger has nothing to restore.
    short = replica_of(log, tmp_path / "short.replica", 4)
    done = restore(state, short, keys)
    assert done.returncode == exit_codes.STATE and "nothing to restore" in done.stderr, done.stderr

    # The state directory in use by a coordinator: refused.
    lock = state_guard.lock_state_dir(state)
    try:
        done = restore(state, replica, keys)
        assert done.returncode == exit_codes.STATE and "another coordinator" in done.stderr, done.stderr
    finally:
        os.close(lock)

    # A ledger that forked from the replica's history: refused, never replaced.
    forked = bytearray(good[:offsets[-2]])
    log.write_bytes(bytes(forked))
    ledger = FleetLedger.open(log, signer=Ed25519Signer(h.keys.sign_seed), fleet=FLEET)
    ledger.append(records.update_rejected("dev-c", 3, "stale_round", bytes(32)))
    ledger.close()
    fork = log.read_bytes()
    done = restore(state, replica, keys)
    assert done.returncode == exit_codes.TAMPERED and "different history" in done.stderr, done.stderr
    assert log.read_bytes() == fork

    # Rolled back (an older backup) with the latest model file gone: the model is named, exit 5.
    log.write_bytes(good[:offsets[-4]])
    model = h.coordinator.models.path(3)
    shutil.move(model, tmp_path / "model-3")
    done = restore(state, replica, keys)
    assert done.returncode == exit_codes.STATE and str(model) in done.stderr and "missing" in done.stderr, \
        done.stderr
    assert "--from-broker" in done.stderr, done.stderr  # the way out is named
    assert log.read_bytes() == good[:offsets[-4]] and not list(state.glob("ledger.log.before-restore-*"))
    # With the file back, the ledger is rebuilt exactly and the old one kept aside.
    shutil.move(tmp_path / "model-3", model)
    done = restore(state, replica, keys)
    assert done.returncode == 0, done.stderr
    assert log.read_bytes() == good
    assert "model of round 3" in done.stdout and list(state.glob("ledger.log.before-restore-*"))


def test_restore_says_when_the_open_rounds_accepted_updates_went_with_the_spool(tmp_path: Path) -> None:
    """The spool holds the open round's accepted envelopes (the devices have dropped them from their
    outboxes): a restore after losing it says the coordinator cannot resume that round, by device."""
    state = tmp_path / "state"
    state.mkdir()
    h = Harness(state)
    for device in ("dev-a", "dev-b"):
        assert h.send(device, h.update(device, 1, weights(1.0))).accepted
    assert h.send("dev-a", h.update("dev-a", 2, weights(2.0))).accepted  # round 2 stays open
    h.ledger.close()
    keys = tmp_path / "coordinator.json"
    h.keys.save(keys)
    replica = replica_of(state / "ledger.log", tmp_path / "good.replica")
    (state / "ledger.log").unlink()
    shutil.rmtree(state / "spool")
    done = restore(state, replica, keys)
    assert done.returncode == 0, done.stderr
    assert "round 2 is open with accepted updates of dev-a" in done.stderr and "lost spool" in done.stderr, \
        done.stderr
    assert "run that round again as round 3" in done.stderr, done.stderr
    assert "start the coordinator to resume" not in done.stdout
    # The coordinator starts (it used to refuse: "missing from the spool"), runs round 2 again as
    # round 3 from the same model, and the devices' new updates are aggregated.
    h.coordinator = h.build()
    apply_request(h.coordinator, state)  # what the daemon does right after a start like this
    assert h.coordinator.round is not None and h.coordinator.round.number == 3
    chain = list(h.ledger)
    rerun = [b.data for b in chain if b.data.get("type") == records.MODEL_PUBLISHED and b.data.get("round") == 3]
    assert len(rerun) == 1 and rerun[0]["restores"] == 2 and rerun[0]["abandoned_round"] == 2, rerun
    assert "dev-a" in rerun[0]["reason"]
    assert not restore_request_path(state).exists()  # applied once
    for device in ("dev-a", "dev-b"):
        assert h.send(device, h.update(device, 3, weights(3.0))).accepted
    aggregates = [b.data for b in h.ledger if b.data.get("type") == records.AGGREGATE]
    assert aggregates[-1]["round"] == 3 and sorted(aggregates[-1]["participants"]) == ["dev-a", "dev-b"]
    h.ledger.close()
    assert verify_file(state / "ledger.log", h.keys.public.sign_public).ok
