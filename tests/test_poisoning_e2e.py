"""A hostile member on a running fleet (issue 13), on real processes: a broker, the coordinator
and two honest agents started with the `fledger` command; the attacker holds a genuine device
key (edge-3's bundle from `fledger keys add-device`) and, with the project's own envelope code,
sends every round a signed update whose weights are the global model's times 1e6.

Training goes on to the last round; each round's aggregate record excludes edge-3 and says why;
the honest agents' updates are accepted every round; the model stays bounded. Then the operator
restores an earlier model with `fledger restore-model`, and the coordinator records it."""

from __future__ import annotations

import hashlib
import queue
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from conftest import BrokerInfo
from federation_run import Federation

from coordinator.storage import read_model_file
from federation import deltas, envelope
from federation.codec import decode_tensors, encode_tensors
from federation.fleet_state import FleetLedger, verify_file
from federation.keys import CoordinatorKeys, DeviceBundle
from federation.mqtt import BrokerConfig, MqttLink
from federation.topics import Topics
from fledger import keytool

HONEST = ("edge-1", "edge-2")
ROUNDS = 3


def test_a_device_sending_1e6_scaled_updates_every_round_cannot_stop_or_steer_the_fleet(
        embedded_broker: BrokerInfo, tmp_path: Path) -> None:
    fed = Federation(tmp_path, embedded_broker.host, embedded_broker.port, devices=(*HONEST, "edge-3"),
                     rounds=ROUNDS, limit=300, extra_coordinator=["--round-deadline", "0"])
    topics = Topics(fed.fleet)
    hostile = DeviceBundle.load(keytool.bundle_path(fed.keys, "edge-3"))
    dataset = hashlib.sha256(b"whatever edge-3 claims to hold").digest()
    link = MqttLink(BrokerConfig(broker_host=embedded_broker.host, broker_port=embedded_broker.port),
                    "attacker-edge-3", subscriptions=[topics.model, topics.status])
    coordinator_key = CoordinatorKeys.load(fed.keys / keytool.COORDINATOR_FILE).public.sign_public
    attacked: dict[int, tuple[bytes, float]] = {}  # round -> (the poisoned update, when last sent)
    status: dict = {}  # type: ignore[type-arg]
    latest: tuple[int, bytes] | None = None
    last_registration = 0.0
    try:
        fed.start_coordinator()
        for i in range(len(HONEST)):
            fed.start_agent(i)
        link.start(timeout=30)
        deadline = time.monotonic() + 400
        while fed.procs["coordinator"].poll() is None and time.monotonic() < deadline:
            registered = status.get("datasets", {}).get("edge-3") == dataset.hex()
            if not registered and time.monotonic() - last_registration > 2:  # until the status lists it
                link.publish(topics.register("edge-3"), envelope.seal_dataset(hostile, dataset, 1, {"task": fed.task}))
                last_registration = time.monotonic()
            if registered and latest is not None:
                round_number, body = latest
                if round_number not in attacked:
                    poisoned = {k: (v * 1e6).astype(v.dtype) for k, v in decode_tensors(body).items()}
                    attacked[round_number] = (deltas.seal_trained(
                        hostile, round_number, poisoned, decode_tensors(body), 300, {"train_loss": 0.5},
                        dataset_sha256=dataset), 0.0)
                payload, sent = attacked[round_number]
                if "edge-3" not in status.get("accepted", []) and time.monotonic() - sent > 5:
                    link.publish(topics.update("edge-3"), payload)
                    attacked[round_number] = (payload, time.monotonic())
            try:
                message = link.inbox.get(timeout=0.5)
            except queue.Empty:
                continue
            if message.topic == topics.status:
                status = envelope.open_status(message.payload, coordinator_key)
            elif message.topic == topics.model:
                header, body = envelope.open_model(message.payload, hostile, max_bytes=1 << 26)
                if not header.done and (latest is None or header.round > latest[0]):
                    latest = (header.round, body)
        assert fed.wait("coordinator", 30) == 0, fed.log_tail()
        for device in HONEST:
            assert fed.wait(device, 60) == 0, fed.log_tail()
    finally:
        link.stop()
        fed.stop()

    assert verify_file(fed.state / "ledger.log", trusted_coordinator_key=coordinator_key).ok
    with FleetLedger.open(fed.state / "ledger.log") as ledger:
        data = [b.data for b in ledger]
    updates = sorted((d["device"], d["round"]) for d in data if d["type"] == "update")
    # The attacker's update was accepted (genuine key, registered data set) in every round, and so
    # were both honest agents' updates: none of theirs was ever rejected.
    assert updates == sorted((d, r) for d in (*HONEST, "edge-3") for r in range(1, ROUNDS + 1)), updates
    assert not [d for d in data if d["type"] == "update.rejected" and d["device"] in HONEST]
    aggregates = [d for d in data if d["type"] == "aggregate"]
    assert [d["round"] for d in aggregates] == list(range(1, ROUNDS + 1))
    for record in aggregates:
        assert record["participants"] == list(HONEST), record
        why = record["excluded"]["edge-3"]
        assert why["reason"] == "distance" and why["factor"] > 1000, why
        assert record["strategy"] == "clipped-fedavg"
    final = read_model_file(fed.state / "models" / f"global-{ROUNDS + 1:06d}.safetensors")
    assert max(float(np.abs(v).max()) for v in final.values()) < 100  # not 1e6: nothing raw got in

    # The operator undoes rounds 2 and 3 (say): the request is checked now, applied at the next start.
    restore = subprocess.run(
        [sys.executable, "-m", "fledger.cli", "restore-model", "--state-dir", str(fed.state), "--round", "2",
         "--reason", "edge-3 revoked"], capture_output=True, text=True, timeout=120)
    assert restore.returncode == 0, restore.stdout + restore.stderr
    fed.rounds = ROUNDS + 1  # one more round, which the restored model opens (and then it is done)
    fed.start_coordinator()
    try:
        assert fed.wait("coordinator", 120) == 0, fed.log_tail()
    finally:
        fed.stop()
    assert verify_file(fed.state / "ledger.log", trusted_coordinator_key=coordinator_key).ok
    with FleetLedger.open(fed.state / "ledger.log") as ledger:
        restores = [b.data for b in ledger if "restores" in b.data]
    assert len(restores) == 1 and restores[0]["restores"] == 2 and restores[0]["reason"] == "edge-3 revoked", restores
    assert restores[0]["round"] == ROUNDS + 2  # a new, higher round: agents follow it
    models = fed.state / "models"
    assert encode_tensors(read_model_file(models / f"global-{ROUNDS + 2:06d}.safetensors")) == \
        encode_tensors(read_model_file(models / "global-000002.safetensors"))
    assert not (fed.state / "restore-request.json").exists()  # applied once, then removed
