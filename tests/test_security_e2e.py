"""Attacks against a running fleet: real processes (coordinator and agents via the `fledger`
command), real brokers (mosquitto with deploy/'s TLS, password and ACL config; the embedded
amqtt broker), real keys made by `fledger keys`.

- a full federation over TLS, with per-user passwords and the deploy/ ACL;
- a forged retained global model (signed by another key; garbage) is refused by an agent,
  which trains nothing until the genuine coordinator publishes;
- a stolen, then rotated, device key: its updates are rejected as revoked_key and the
  ledger records the revocation;
- a byte-identical replay of a captured update is counted as `replay` and not recorded twice.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import BrokerInfo, Mosquitto
from federation_run import Federation
from test_broker_security import Client, SecureBroker, make_pki, test_config_from_deploy, token

from coordinator.registry_file import RegistryFile
from coordinator.rounds import RoundPolicy
from coordinator.service import Coordinator, CoordinatorSettings
from coordinator.storage import ModelStore, Spool
from federation import envelope, records
from federation.chunking import parse_frame
from federation.codec import encode_tensors
from federation.fleet_state import FleetLedger, verify_file
from federation.keys import CoordinatorKeys, DeviceBundle, DeviceRegistry
from federation.topics import Topics
from fledger import keytool
from ledger import Block, Ed25519Signer

DEVICES = ("edge-1", "edge-2")
WRONG_SIGNER = "not signed by the fleet's coordinator"  # the agent's log for a model signed by another key


def blocks_of(fed: Federation) -> list[dict[str, Any]]:
    return [b.data for b in FleetLedger.open(fed.state / "ledger.log")]


def coordinator_public(fed: Federation) -> bytes:
    return CoordinatorKeys.load(fed.keys / keytool.COORDINATOR_FILE).public.sign_public


def wait_for(predicate: Any, timeout: float, what: str, fed: Federation | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}\n{fed.log_tail() if fed else ''}")


# -- a. a full federation over TLS + passwords + the deploy/ ACL on mosquitto --------------------


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[SecureBroker, Mosquitto]]:
    base = tmp_path_factory.mktemp("security-e2e")
    pki = make_pki(base / "pki", "coordinator", "monitor", *DEVICES)
    state = base / "state"
    state.mkdir()
    broker = Mosquitto(base / "mosquitto", extra_config=test_config_from_deploy(pki, state)).start()
    try:
        yield SecureBroker(broker.host, broker.port, pki, pki / "ca.crt"), broker
    finally:
        broker.stop()


@dataclass
class TlsFederation(Federation):
    """Each process logs in as its own broker user (device id, or `coordinator`) over TLS."""

    pki: Path = Path()

    def broker_args(self) -> list[str]:
        return [*super().broker_args(), "--tls-ca", str(self.pki / "ca.crt")]

    def login(self, user: str) -> list[str]:
        return ["--username", user, "--password-file", str(self.pki / f"{user}.password")]

    def start_coordinator(self) -> Any:
        self.extra_coordinator = self.login("coordinator")
        return super().start_coordinator()

    def start_agent(self, index: int) -> Any:
        self.extra_agent = self.login(self.devices[index])
        return super().start_agent(index)


def test_full_federation_over_tls_with_passwords_and_the_deploy_acl(
        tls_broker: tuple[SecureBroker, Mosquitto], tmp_path: Path) -> None:
    """The roles work under the shipped ACL: each device registers its data set (register/<self>),
    sends updates (update/<self>) and presence, reads the model and its own ack; the coordinator
    reads those and alone writes model, status, acks and ledger. Agents refuse to train before
    their registration is acknowledged, so completed rounds also prove the register ACL. The
    ledger holds each device's salted data set commitment, never the bare SHA-256, and the
    device's dataset.json opens it (`fledger ledger dataset`)."""
    secure, mosquitto = tls_broker
    fed = TlsFederation(tmp_path, secure.host, secure.port, devices=DEVICES, rounds=2, limit=300, pki=secure.pki)
    try:
        fed.start_all()
        # Passwords are read from files: none appears on any process's command line.
        for proc in fed.procs.values():
            cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
            for user in ("coordinator", *DEVICES):
                assert secure.password(user).encode() not in cmdline
        assert fed.wait("coordinator", 120) == 0, fed.log_tail()
        for device in DEVICES:
            assert fed.wait(device, 60) == 0, fed.log_tail()
    finally:
        fed.stop()
    report = verify_file(fed.state / "ledger.log", trusted_coordinator_key=coordinator_public(fed))
    assert report.ok, report
    data = blocks_of(fed)
    assert [d["round"] for d in data if d["type"] == "aggregate"] == [1, 2]
    assert all(d["participants"] == list(DEVICES) for d in data if d["type"] == "aggregate")
    assert sorted(d["device"] for d in data if d["type"] == records.DATASET) == list(DEVICES)
    for device in DEVICES:
        opening = fed.workdir / device / "dataset.json"
        bare = bytes.fromhex(json.loads(opening.read_text())["sha256"])
        assert all(d.get("sha256") != bare and bare not in d.get("statement", b"") for d in data), "bare hash published"
        opened = subprocess.run([sys.executable, "-m", "fledger.cli", "ledger", "dataset",
                                 str(fed.state / "ledger.log"), "--device", device, "--opening", str(opening)],
                                capture_output=True, text=True)
        assert opened.returncode == 0 and bare.hex() in opened.stdout, opened.stderr
    assert len([d for d in data if d["type"] == "update"]) == 4
    assert not [d for d in data if d["type"] == "update.rejected"]
    # Each process was logged in as its own broker user, over the TLS listener.
    log = (mosquitto.directory / "mosquitto.log").read_text(errors="replace")
    for user in ("coordinator", *DEVICES):
        assert f"u'{user}'" in log, f"no connection as {user} in the broker log"


def test_a_device_registers_only_its_own_data_set(tls_broker: tuple[SecureBroker, Mosquitto]) -> None:
    """deploy/mosquitto/fledger.acl: register/<device> is writable by that device only and
    readable by the coordinator only (another device subscribed to everything sees nothing)."""
    secure, _ = tls_broker
    topics = Topics("plant7")
    forged, genuine = token("forged-registration"), token("registration")
    with Client(secure, "coordinator") as coordinator, Client(secure, DEVICES[0]) as device, \
            Client(secure, DEVICES[1]) as spy:
        coordinator.subscribe("fledger/plant7/register/#")
        spy.subscribe("fledger/#")
        device.publish(topics.register(DEVICES[1]), forged)  # PUBACKed (3.1.1) but dropped
        device.publish(topics.register(DEVICES[0]), genuine)  # the sentinel
        got = coordinator.collect_until(genuine)
        time.sleep(0.3)
        spied = [m for m in _drain(spy) if "/register/" in m[0]]
    assert [(t, p) for t, p, _ in got] == [(topics.register(DEVICES[0]), genuine)]
    assert spied == []


def _drain(client: Client) -> list[tuple[str, bytes, bool]]:
    got = []
    while True:
        try:
            got.append(client.messages.get_nowait())
        except queue.Empty:
            return got


def _first_on(client: Client, topic: str, timeout: float = 10.0) -> bytes:
    """The first message on ``topic`` (amqtt may deliver retained messages of other topics first),
    out of fledger's frame (every message it publishes is framed; these fit in one)."""
    deadline = time.monotonic() + timeout
    while True:
        got_topic, payload, _ = client.messages.get(timeout=max(0.01, deadline - time.monotonic()))
        if got_topic == topic:
            return parse_frame(payload).data


def _update(frame: bytes) -> envelope.SealedUpdate:
    return envelope.parse_update(parse_frame(frame).data, max_bytes=1 << 26)


# -- b. a forged retained global model --------------------------------------------------------


def test_agent_refuses_a_forged_retained_model_and_trains_nothing(embedded_broker: BrokerInfo,
                                                                   tmp_path: Path) -> None:
    """Someone with publish rights (amqtt has no ACL) retains two fake models before the
    coordinator ever ran: (i) a well-formed model encrypted with the real fleet model key (taken
    from a stolen device bundle) but signed by the attacker's own key, on model/global;
    (ii) garbage, on model/global/chunk/0 (agents subscribe there for chunked models). The
    agent refuses and logs both and trains nothing; when the genuine coordinator starts, its
    signed model replaces the forgery and the round completes."""
    fed = Federation(tmp_path, embedded_broker.host, embedded_broker.port, devices=("edge-1",), rounds=1,
                     limit=300)
    topics = Topics(fed.fleet)
    stolen = DeviceBundle.load(keytool.bundle_path(fed.keys, "edge-1"))
    attacker = CoordinatorKeys.generate(fed.fleet)
    attacker = CoordinatorKeys(fed.fleet, attacker.sign_seed, attacker.enc_seed, stolen.model_key_id,
                               stolen.model_key)
    weights = encode_tensors({"linear.weight": np.full((1, 8), 1e6, np.float32),
                              "linear.bias": np.zeros(1, np.float32)})
    # Complete but for the signer: the ledger block it carries is the attacker's own, too.
    with FleetLedger.open(tmp_path / "attacker.log", signer=Ed25519Signer(attacker.sign_seed), fleet=fed.fleet) as fake:
        fake_block = fake.append(records.model_published(1, hashlib.sha256(weights).digest())).to_bytes()
    forged = envelope.seal_model(attacker, 1, weights, block=fake_block)
    garbage = b"\x00" + os.urandom(2048)
    address = (embedded_broker.host, embedded_broker.port)
    agent_log = fed.logs / "edge-1.log"
    try:
        with Client(address, None) as evil, Client(address, None) as watcher:
            evil.publish(topics.model, forged, retain=True)
            evil.publish(f"{topics.model}/chunk/0", garbage, retain=True)
            watcher.subscribe(topics.updates)
            watcher.subscribe(topics.registrations)

            fed.start_agent(0)

            def refusals() -> list[str]:
                text = agent_log.read_text(errors="replace") if agent_log.exists() else ""
                return [line for line in text.splitlines() if "refused a global model" in line]

            def refused_both() -> bool:
                found = refusals()
                return any(WRONG_SIGNER in r for r in found) and any(WRONG_SIGNER not in r for r in found)

            wait_for(refused_both, 90, "the agent to refuse both forged models", fed)
            time.sleep(1.5)  # it would have registered and trained by now had it accepted one
            assert fed.procs["edge-1"].poll() is None, fed.log_tail()  # refused, did not crash
            # (amqtt may also hand the watcher retained messages of other topics: only ours count.)
            sent = [m for m in _drain(watcher) if "/update/" in m[0] or "/register/" in m[0]]
            assert sent == [], f"the agent published an update or registration: {sent}\n{fed.log_tail()}"
            outbox = fed.workdir / "edge-1" / "outbox"
            assert not outbox.exists() or not any(outbox.iterdir()), fed.log_tail()
            assert not (fed.workdir / "edge-1" / "last_trained_round").exists(), fed.log_tail()

            fed.start_coordinator()
            assert fed.wait("coordinator", 120) == 0, fed.log_tail()
            assert fed.wait("edge-1", 60) == 0, fed.log_tail()
    finally:
        fed.stop()
    assert verify_file(fed.state / "ledger.log", trusted_coordinator_key=coordinator_public(fed)).ok
    data = blocks_of(fed)
    assert [(d["device"], d["round"]) for d in data if d["type"] == "update"] == [("edge-1", 1)]
    assert [d["round"] for d in data if d["type"] == "aggregate"] == [1]


# -- c. a stolen device key, rotated ------------------------------------------------------------


FLEET = "plant7"
TOPICS = Topics(FLEET)
DATASET = bytes(range(32))


class Fleet:
    """A coordinator core over keys made by `fledger keys` (no network), restartable."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.keys_dir = tmp / "keys"
        keytool.init_fleet(self.keys_dir, FLEET)
        for device in DEVICES:
            keytool.add_device(self.keys_dir, device)
        self.keys = CoordinatorKeys.load(self.keys_dir / keytool.COORDINATOR_FILE)
        self.ledger: FleetLedger | None = None
        self.coordinator = self.start()
        for device in DEVICES:
            bundle = self.bundle(device)
            outcome = self.coordinator.handle_registration(
                TOPICS.register(device), envelope.seal_dataset(bundle, DATASET, 1234, {"task": "unit"}))
            assert outcome.accepted

    def bundle(self, device: str) -> DeviceBundle:
        return DeviceBundle.load(keytool.bundle_path(self.keys_dir, device))

    def start(self) -> Coordinator:
        """(Re)start: the registry is read from devices.json, as the daemon does."""
        if self.ledger is not None:
            self.ledger.close()
        self.ledger = FleetLedger.open(self.tmp / "ledger.log", signer=Ed25519Signer(self.keys.sign_seed), fleet=FLEET)
        coordinator = Coordinator(
            CoordinatorSettings(FLEET, RoundPolicy(min_clients=2, quorum=1, deadline_s=0), max_update_bytes=1 << 20),
            self.keys, DeviceRegistry.load(self.keys_dir / keytool.REGISTRY_FILE), self.ledger,
            ModelStore(self.tmp / "models"), Spool(self.tmp / "spool"),
            initial_model=lambda: {"w": np.zeros((4, 3), np.float32), "b": np.zeros(3, np.float32)},
            publish=lambda topic, payload, retain: None, topics=TOPICS,
        )
        coordinator.start()
        return coordinator

    def update(self, bundle: DeviceBundle, round_number: int) -> bytes:
        weights = {"w": np.ones((4, 3), np.float32), "b": np.ones(3, np.float32)}
        return envelope.seal_update(bundle, round_number, encode_tensors(weights), 10, {"train_loss": 0.5},
                                    dataset_sha256=DATASET,
                                    base_sha256=self.ledger.state.published_models.get(round_number, bytes(32)))


@pytest.mark.parametrize("apply", ["restart", "live"])
def test_a_stolen_key_is_rejected_after_rotation_and_the_ledger_records_the_revocation(tmp_path: Path,
                                                                                       apply: str) -> None:
    fleet = Fleet(tmp_path)
    stolen = fleet.bundle("edge-1")  # the thief copies edge-1's bundle
    assert fleet.coordinator.handle_update(TOPICS.update("edge-2"), fleet.update(fleet.bundle("edge-2"), 1)).accepted

    # The operator notices: `fledger keys rotate edge-1`; the coordinator is restarted, or the
    # running one picks up the changed devices.json (as the daemon's RegistryFile poll does).
    registry_file = RegistryFile(fleet.keys_dir / keytool.REGISTRY_FILE)
    assert registry_file.changed() is None
    _path, new_id, revoked = keytool.rotate_device_key(fleet.keys_dir, "edge-1")
    assert revoked == [stolen.key_id] and new_id != stolen.key_id
    if apply == "restart":
        fleet.coordinator = fleet.start()
    else:
        registry = registry_file.changed()
        assert registry is not None
        fleet.coordinator.reload_registry(registry)
        registry_file.adopted()
        assert registry_file.changed() is None
    assert fleet.ledger is not None
    height = fleet.ledger.head.index

    # The thief's update, freshly signed with the old key for the open round: rejected as
    # revoked_key, counted, and (unauthenticated now) not written to the ledger.
    outcome = fleet.coordinator.handle_update(TOPICS.update("edge-1"), fleet.update(stolen, 1))
    assert (outcome.accepted, outcome.reason) == (False, "revoked_key")
    assert fleet.coordinator.rejections["revoked_key"] == 1
    assert fleet.ledger.head.index == height

    # The device with its new bundle is accepted; the round closes with it.
    new = fleet.bundle("edge-1")
    assert new.key_id == new_id
    outcome = fleet.coordinator.handle_update(TOPICS.update("edge-1"), fleet.update(new, 1))
    assert outcome.accepted, outcome
    # ... and the thief cannot use the old key for the next round either.
    outcome = fleet.coordinator.handle_update(TOPICS.update("edge-1"), fleet.update(stolen, 2))
    assert outcome.reason == "revoked_key"

    data = [b.data for b in fleet.ledger]
    fleet.ledger.close()
    kinds = [(d["type"], d.get("device"), d.get("key_id")) for d in data]
    key_added = kinds.index((records.DEVICE_KEY, "edge-1", stolen.key_id))
    revocation = kinds.index((records.DEVICE_KEY_REVOKED, "edge-1", stolen.key_id))
    new_key = kinds.index((records.DEVICE_KEY, "edge-1", new_id))
    accepted = [i for i, d in enumerate(data) if d["type"] == "update" and d["device"] == "edge-1"]
    assert key_added < revocation and key_added < new_key
    assert len(accepted) == 1 and accepted[0] > max(revocation, new_key)
    assert data[accepted[0]]["key_id"] == new_id
    assert not [d for d in data if d["type"] == "update.rejected"]
    aggregates = [d for d in data if d["type"] == "aggregate"]
    assert [a["participants"] for a in aggregates] == [sorted(DEVICES)]
    # A monitor re-checks every signature, the device keys and the revocation from the chain.
    assert verify_file(tmp_path / "ledger.log", trusted_coordinator_key=fleet.keys.public.sign_public).ok


def test_a_running_coordinator_takes_a_device_added_to_devices_json(embedded_broker: BrokerInfo,
                                                                    tmp_path: Path) -> None:
    """Real processes: edge-2 is provisioned while the coordinator runs (its key written to
    devices.json after the coordinator loaded it). The coordinator notices the file, records
    the key in the ledger, and edge-2's registration and updates are accepted: no restart."""
    fed = Federation(tmp_path, embedded_broker.host, embedded_broker.port, rounds=2, limit=300)
    registry_path = fed.keys / keytool.REGISTRY_FILE
    full = registry_path.read_bytes()
    registry = DeviceRegistry.load(registry_path)
    del registry.devices["edge-2"]
    registry.save(registry_path)  # as if edge-2 were not provisioned yet
    try:
        fed.start_coordinator()
        fed.start_agent(0)
        coordinator_log = fed.logs / "coordinator.log"
        wait_for(lambda: "device edge-1 registered data set" in coordinator_log.read_text(), 60,
                 "edge-1's registration", fed)
        assert "edge-2" not in coordinator_log.read_text()
        registry_path.write_bytes(full)  # `fledger keys add-device edge-2` on the operator's side
        wait_for(lambda: "device registry reloaded" in coordinator_log.read_text(), 30, "the reload", fed)
        fed.start_agent(1)
        for name in ("coordinator", *fed.devices):
            assert fed.wait(name, 90) == 0, fed.log_tail()
    finally:
        fed.stop()
    data = blocks_of(fed)
    kinds = [(d["type"], d.get("device")) for d in data]
    assert kinds.index(("device.key", "edge-2")) < kinds.index(("dataset", "edge-2"))
    assert [d["participants"] for d in data if d["type"] == "aggregate"] == [["edge-1", "edge-2"]] * 2
    assert not [d for d in data if d["type"] == "update.rejected"]
    assert verify_file(fed.state / "ledger.log").ok


# -- d. a replay on the wire ---------------------------------------------------------------------


def test_a_captured_update_replayed_byte_identical_is_counted_and_not_recorded(
        embedded_broker: BrokerInfo, tmp_path: Path) -> None:
    """An eavesdropper on the broker (amqtt: anyone may subscribe to anything) captures
    edge-1's round-1 update, waits until the coordinator has accepted it (its block is on the
    ledger topic), and publishes the same bytes again. The coordinator counts a `replay`,
    writes nothing for it, and the federation finishes normally.

    Agents resend unacknowledged updates byte-identically too; a long --resend-interval keeps
    them from doing so here, so the one replay counted is ours."""
    fed = Federation(tmp_path, embedded_broker.host, embedded_broker.port, devices=DEVICES, rounds=2, limit=300,
                     extra_agent=["--resend-interval", "600"])
    topics = Topics(fed.fleet)
    address = (embedded_broker.host, embedded_broker.port)
    try:
        with Client(address, None) as tap:
            tap.subscribe(topics.update("edge-1"))
            tap.subscribe(topics.ledger_blocks)
            fed.start_all()
            captured: bytes | None = None
            recorded: set[bytes] = set()  # statements of update blocks seen on the ledger topic
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline:
                try:
                    topic, payload, _ = tap.messages.get(timeout=1)
                except queue.Empty:
                    continue
                if topic == topics.update("edge-1") and captured is None:
                    captured = payload  # the frame as sent, replayed byte for byte below
                elif topic == topics.ledger_blocks:
                    data = Block.from_bytes(parse_frame(payload).data).data
                    if data["type"] == "update":
                        recorded.add(data["statement"])
                if captured is not None and _update(captured).header_bytes in recorded:
                    break  # accepted and recorded
            else:
                raise AssertionError(f"never saw edge-1's update accepted\n{fed.log_tail()}")
            assert _update(captured).header.round == 1
            # Rounds take ~100 ms here: the coordinator could finish round 2 and exit before the
            # replay reaches it. Pause the agents until it has been handled.
            for device in DEVICES:
                fed.procs[device].send_signal(signal.SIGSTOP)
            try:
                tap.publish(topics.update("edge-1"), captured)  # the replay, byte for byte
                wait_for(lambda: re.search(r"rejected update from edge-1 \(round 1\): replay",
                                           (fed.logs / "coordinator.log").read_text(errors="replace")),
                         60, "the coordinator to reject the replay", fed)
            finally:
                for device in DEVICES:
                    fed.procs[device].send_signal(signal.SIGCONT)

            assert fed.wait("coordinator", 120) == 0, fed.log_tail()
            for device in DEVICES:
                assert fed.wait(device, 60) == 0, fed.log_tail()
        with Client(address, None) as reader:
            reader.subscribe(topics.status)
            status = envelope.open_status(_first_on(reader, topics.status), coordinator_public(fed))
    finally:
        fed.stop()
    assert status["rejections"] == {"replay": 1}, status
    coordinator_log = (fed.logs / "coordinator.log").read_text(errors="replace")
    assert re.search(r"rejected update from edge-1 \(round 1\): replay", coordinator_log), coordinator_log[-3000:]
    assert verify_file(fed.state / "ledger.log", trusted_coordinator_key=coordinator_public(fed)).ok
    data = blocks_of(fed)
    updates = [(d["device"], d["round"]) for d in data if d["type"] == "update"]
    assert sorted(updates) == [("edge-1", 1), ("edge-1", 2), ("edge-2", 1), ("edge-2", 2)]
    assert not [d for d in data if d["type"] == "update.rejected"]
