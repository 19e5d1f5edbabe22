"""The whole coordinator state directory lost: `fledger ledger restore --from-broker` rebuilds it
from a monitor's replica and the broker's retained global model, and the coordinator resumes
(real processes, mosquitto started by the test).

A fleet runs two rounds while a monitor keeps a verified replica; the coordinator's state
directory is then moved away whole. Without --from-broker the restore names the missing model
and writes nothing. With it, a retained model that is junk, signed by another key, or a genuine
older model of the coordinator (re-published by the test with its key), and no retained model
at all, are each refused with one line and an exit code, and nothing is written. With the
coordinator's own retained model back, the ledger is restored byte for byte and the model file
to the ledger's hash (a damaged file in its place is kept aside); the coordinator resumes at
round 3 and runs a third round with both agents (their updates are deltas against the restored
model), and the ledger verifies.
"""

from __future__ import annotations

import dataclasses
import hashlib
import queue
import shutil
import subprocess
import sys
import time
from pathlib import Path

from conftest import BrokerInfo
from federation_run import Federation
from test_reliability import finish
from test_state_safety import run_fleet_with_a_replica

from coordinator.storage import read_model_file
from federation import crypto, envelope, exit_codes, records
from federation.codec import encode_tensors
from federation.fleet_state import FleetLedger
from federation.keys import CoordinatorKeys
from federation.mqtt import BrokerConfig, MqttLink
from federation.topics import Topics
from fledger import keytool


def restore(fed: Federation, replica: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fledger.cli", "ledger", "restore", "--replica", str(replica),
                           "--state-dir", str(fed.state), "--keys", str(fed.keys / keytool.COORDINATOR_FILE),
                           *extra], capture_output=True, text=True, timeout=60)


class Retained:
    """Reads and replaces the fleet's retained global model, as anyone with publish rights could."""

    def __init__(self, fed: Federation) -> None:
        self.config = BrokerConfig(broker_host=fed.host, broker_port=fed.port)
        self.topics = Topics(fed.fleet)

    def read(self) -> bytes:
        link = MqttLink(self.config, f"test-read-{time.monotonic_ns()}",
                        subscriptions=[self.topics.model, self.topics.model_chunks], persistent=False)
        link.start(timeout=10)
        try:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    message = link.inbox.get(timeout=0.5)
                except queue.Empty:
                    continue
                if message.topic == self.topics.model:
                    return message.payload
            raise AssertionError("no retained global model on the broker")
        finally:
            link.stop()

    def replace(self, payload: bytes) -> None:
        link = MqttLink(self.config, f"test-publish-{time.monotonic_ns()}", persistent=False)
        link.start(timeout=10)
        try:
            assert link.publish(self.topics.model, payload, retain=True, wait=10)
        finally:
            link.stop()


def test_lost_state_directory_is_restored_from_replica_and_retained_model(mosquitto_broker: BrokerInfo,
                                                                          tmp_path: Path) -> None:
    broker = mosquitto_broker
    fed = Federation(tmp_path, broker.host, broker.port, rounds=2, limit=200,
                     extra_coordinator=["--head-wait", "2"])
    keys_file = fed.keys / keytool.COORDINATOR_FILE
    replica = tmp_path / "monitor.replica"
    run_fleet_with_a_replica(fed, replica)
    retained = Retained(fed)
    genuine = retained.read()
    good = (fed.state / "ledger.log").read_bytes()
    model_file = fed.state / "models" / "global-000003.safetensors"
    model_bytes = model_file.read_bytes()

    # The whole state directory is lost (moved away: the test re-publishes an older model from it).
    old = tmp_path / "old-state"
    shutil.move(fed.state, old)

    def nothing_written() -> bool:
        return not (fed.state / "ledger.log").exists() and not list(fed.state.glob("models/*"))

    # Without --from-broker: the missing model is named, with the way out; nothing is written.
    done = restore(fed, replica)
    assert done.returncode == exit_codes.STATE and "missing" in done.stderr and "--from-broker" in done.stderr, \
        done.stderr
    assert hashlib.sha256(encode_tensors(read_model_file(old / "models" / model_file.name))).hexdigest() \
        in done.stderr
    assert nothing_written()

    keys = CoordinatorKeys.load(keys_file)
    with FleetLedger.open(old / "ledger.log") as ledger:
        aggregate_1 = next(b for b in ledger if b.data.get("type") == records.AGGREGATE and b.data["round"] == 1)
    older = encode_tensors(read_model_file(old / "models" / "global-000002.safetensors"))
    forger = dataclasses.replace(keys, sign_seed=crypto.ed25519_generate()[0])  # holds the fleet model key
    refusals = [
        # junk on the retained topic
        (b"not a model", exit_codes.TAMPERED, "does not verify against the coordinator's keys"),
        # a complete model encrypted with the real fleet model key, signed by another key
        (envelope.seal_model(forger, 3, older, block=aggregate_1.to_bytes()), exit_codes.TAMPERED,
         "not signed by the fleet's coordinator"),
        # the coordinator's own, genuinely signed model of round 2: not the one the ledger names last
        (envelope.seal_model(keys, 2, older, block=aggregate_1.to_bytes()), exit_codes.STATE,
         "model of round 2"),
    ]
    for payload, code, why in refusals:
        retained.replace(payload)
        done = restore(fed, replica, "--from-broker", *fed.broker_args(), "--broker-wait", "5")
        lines = [line for line in done.stderr.splitlines() if line.startswith("fledger ledger restore:")]
        assert done.returncode == code and len(lines) == 1 and why in lines[0], done.stderr
        assert "nothing written" in lines[0] and nothing_written(), done.stderr

    # The coordinator's retained model back: ledger and model file restored exactly.
    # (A damaged model file in its place is kept aside, not trusted and not deleted.) The broker
    # settings come from the coordinator's TOML file, as an operator would pass them.
    retained.replace(genuine)
    model_file.parent.mkdir(parents=True)
    model_file.write_bytes(b"damaged")
    toml = tmp_path / "coordinator.toml"
    toml.write_text(f'[broker]\nbroker_host = "{fed.host}"\nbroker_port = {fed.port}\n\n'
                    f'[coordinator]\nfleet = "{fed.fleet}"\n')
    done = restore(fed, replica, "--from-broker", "--config", str(toml), "--broker-wait", "5")
    assert done.returncode == exit_codes.OK, done.stderr
    assert [p.read_bytes() for p in model_file.parent.glob(f"{model_file.name}.mismatch-*")] == [b"damaged"]
    assert "wrote the broker's model of round 3" in done.stdout, done.stdout
    assert (fed.state / "ledger.log").read_bytes() == good
    assert read_model_file(model_file).keys() == read_model_file(old / "models" / model_file.name).keys()
    assert hashlib.sha256(encode_tensors(read_model_file(model_file))).digest() == \
        hashlib.sha256(encode_tensors(read_model_file(old / "models" / model_file.name))).digest()
    assert model_file.stat().st_size == len(model_bytes)

    # The coordinator resumes at round 3 and the agents train a third round from the restored model.
    fed.rounds = 3
    fed.procs.clear()
    fed.start_all()
    finish(fed)
    log = (fed.logs / "coordinator.log").read_text()
    assert "resumed at round 3" in log, fed.log_tail()
    with FleetLedger.open(fed.state / "ledger.log") as ledger:
        third = [b.data for b in ledger if b.data.get("type") == records.AGGREGATE and b.data["round"] == 3]
    assert len(third) == 1 and sorted(third[0]["participants"]) == list(fed.devices), third
    verify = subprocess.run([sys.executable, "-m", "fledger.cli", "ledger", "verify", str(fed.state / "ledger.log"),
                             "--coordinator-key", str(keys_file)], capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0, verify.stdout + verify.stderr
