"""No silent fork: a coordinator never resumes behind a history it published (real processes, mosquitto).

A fleet runs two rounds while a monitor keeps a verified replica. Then, as an operator might:
the ledger is truncated at a block boundary (an old backup), a bit is flipped in its last block,
the state directory is wiped, ledger.log is emptied beside its models (and restored). Each start is refused with
exit code 5 and one line saying what happened and how to fix it; `fledger ledger restore` from the
monitor's replica brings the coordinator back where it was; --new-chain starts afresh on purpose.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from pathlib import Path

from conftest import BrokerInfo
from federation_run import Federation
from test_reliability import finish, wait_for

from federation import exit_codes
from federation.fleet_state import FleetLedger
from fledger import keytool
from ledger import Block, storage


def coordinator_once(fed: Federation, *extra: str, timeout: float = 90) -> tuple[int, str]:
    """Start the coordinator on the fleet's state directory and wait for it to exit."""
    cmd = [sys.executable, "-m", "fledger.cli", "--log-level", "INFO", "coordinator", *fed.broker_args(),
           "--fleet", fed.fleet, "--task", fed.task, "--state-dir", str(fed.state),
           "--keys", str(fed.keys / keytool.COORDINATOR_FILE), "--devices", str(fed.keys / keytool.REGISTRY_FILE),
           "--rounds", str(fed.rounds), "--min-clients", "2", "--head-wait", "2", *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    return done.returncode, done.stderr


def refusal(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if "start refused" in line]
    assert len(lines) == 1, stderr
    return lines[0]


def restore(fed: Federation, replica: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fledger.cli", "ledger", "restore", "--replica", str(replica),
                           "--state-dir", str(fed.state), "--keys", str(fed.keys / keytool.COORDINATOR_FILE)],
                          capture_output=True, text=True, timeout=60)


def run_fleet_with_a_replica(fed: Federation, replica: Path) -> int:
    """Run the fleet to its end while a monitor (`ledger follow --replica`) keeps a verified
    replica; return the ledger's height, which the replica has reached."""
    from fledger.ledger_cli import ReplicaFile

    monitor_log = fed.logs / "monitor.log"
    with open(monitor_log, "ab") as out:
        monitor = subprocess.Popen(
            [sys.executable, "-m", "fledger.cli", "ledger", "follow", "--fleet", fed.fleet, *fed.broker_args(),
             "--replica", str(replica), "--coordinator-key", str(fed.keys / keytool.COORDINATOR_FILE)],
            stdout=out, stderr=subprocess.STDOUT)
    try:
        # Subscribed before the fleet starts (it subscribes, then logs the connection): a monitor
        # that came up after the coordinator had finished could not have its gaps replayed.
        wait_for("the monitor connected", lambda: f"as fledger-monitor-{fed.fleet} (" in monitor_log.read_text(
            errors="replace"), 60, fed)
        fed.start_all()
        finish(fed)
        height = FleetLedger.open(fed.state / "ledger.log").height
        wait_for("the monitor's replica at the ledger's height",
                 lambda: len(ReplicaFile(replica).load()) == height, 30, fed)
    finally:
        monitor.send_signal(signal.SIGTERM)
        monitor.wait(10)
        fed.stop()
    return height


def test_rollback_corruption_and_lost_state_are_refused_and_restore_resumes(mosquitto_broker: BrokerInfo,
                                                                            tmp_path: Path) -> None:
    broker = mosquitto_broker
    fed = Federation(tmp_path, broker.host, broker.port, rounds=2, limit=200,
                     extra_coordinator=["--head-wait", "2"])
    replica = tmp_path / "monitor.replica"
    height = run_fleet_with_a_replica(fed, replica)
    log_path = fed.state / "ledger.log"
    good = log_path.read_bytes()
    offsets = storage.scan(good).offsets

    # A consistent state resumes (the fleet is done, so it exits 0 at once).
    code, err = coordinator_once(fed)
    assert code == 0, err

    # A crash just after the next model's file was fsynced, before its ledger records: that file
    # was never published, and the start is not refused (it was: exit 5, the coordinator down
    # for good; seen in test_reliability's SIGKILLs).
    models = fed.state / "models"
    newest = max(int(p.stem.split("-")[1]) for p in models.glob("global-*.safetensors"))
    orphan = models / f"global-{newest + 1:06d}.safetensors"
    shutil.copy(models / f"global-{newest:06d}.safetensors", orphan)
    code, err = coordinator_once(fed)
    assert code == 0 and f"holds the model for round {newest + 1}, which the ledger does not name" in err, err
    orphan.unlink()

    # An older copy of the ledger (cut at a block boundary): the checkpoint and broker show more.
    # Cut after a signed block, as an older copy of a healthy ledger ends (a cut inside a commit
    # group would leave an unsealed tail, which the ledger sets aside at open as never acknowledged).
    blocks = list(FleetLedger.open(log_path))
    kept = max(n for n in range(1, height - 2) if not blocks[n - 1].unsigned)
    log_path.write_bytes(good[:offsets[kept]])
    code, err = coordinator_once(fed)
    line = refusal(err)
    assert code == exit_codes.STATE and f"has {kept} blocks" in line and f"height {height}" in line, err
    assert "ledger restore" in line
    assert log_path.read_bytes() == good[:offsets[kept]]  # nothing appended, nothing overwritten

    # Restore from the monitor's replica, then the coordinator resumes where it was.
    done = restore(fed, replica)
    assert done.returncode == 0, done.stderr
    assert log_path.read_bytes() == good
    code, err = coordinator_once(fed)
    assert code == 0 and "resumed at round 3" in err, err

    # One bit flipped in the last block: corruption named by block, not a torn tail to cut off.
    flipped = bytearray(good)
    flipped[offsets[-1] + 30] ^= 0x10
    log_path.write_bytes(bytes(flipped))
    code, err = coordinator_once(fed)
    line = refusal(err)
    assert code == exit_codes.STATE and f"block {height - 1}" in line and "checksum" in line, err
    assert log_path.read_bytes() == bytes(flipped)

    # An empty ledger.log beside the models of a published chain never silently gets a new genesis.
    log_path.write_bytes(b"")
    code, err = coordinator_once(fed)
    assert code == exit_codes.STATE and "empty" in refusal(err), err
    assert log_path.read_bytes() == b""
    # A lost ledger (here: emptied) is rebuilt from the replica too, and the coordinator resumes.
    done = restore(fed, replica)
    assert done.returncode == 0, done.stderr
    assert log_path.read_bytes() == good
    code, err = coordinator_once(fed)
    assert code == 0 and "resumed at round 3" in err, err

    # The whole state directory lost: the broker's retained head shows the fleet's chain.
    shutil.move(fed.state, tmp_path / "old-state")
    code, err = coordinator_once(fed)
    line = refusal(err)
    assert code == exit_codes.STATE and "broker" in line and "--new-chain" in line, err
    assert not (fed.state / "ledger.log").exists()
    # ... unless the operator asks for a new chain explicitly.
    fed.extra_coordinator = ["--head-wait", "2", "--new-chain"]
    proc = fed.start_coordinator()
    # Count frames without opening the ledger: the coordinator may be writing its genesis right now.
    wait_for("a new chain", lambda: log_path.exists() and len(storage.scan(log_path.read_bytes()).offsets) >= 2,
             60, fed)
    proc.terminate()
    proc.wait(20)
    new = FleetLedger.open(log_path)
    assert new.block(0).hash != Block.from_bytes(storage.scan(good).payloads[0]).hash
