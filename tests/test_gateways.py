"""Three levels on loopback: a top coordinator, two gateways (``--upstream``), their devices.

Real processes on two mosquitto brokers: the top coordinator on one, both gateways' fleets on
the other; each gateway is also a device of the top fleet, on the top broker. The devices
(this test, with fixed deltas) train from their gateway's model, which is the top's; each
gateway aggregates its two devices and sends one signed update upstream with their summed
sample count. The top model must be flat FedAvg over all four devices, and each level's
ledger must verify.
"""

from __future__ import annotations

import queue
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from conftest import Mosquitto, running
from test_reliability import wait_for

from coordinator.storage import ModelStore
from federation import deltas, envelope
from federation.codec import decode_tensors
from federation.fleet_state import FleetLedger, verify_file
from federation.keys import DeviceBundle
from federation.mqtt import BrokerConfig, MqttLink
from federation.topics import Topics
from fledger import keytool
from ledger import LedgerError

DEVICES = {"gwa": {"a1": 10, "a2": 30}, "gwb": {"b1": 20, "b2": 40}}  # gateway -> device -> samples
DATASET = bytes(range(32))


def _records(state: Path) -> list[dict[str, Any]]:
    try:
        return [b.data for b in FleetLedger.open(state / "ledger.log")]
    except (FileNotFoundError, LedgerError):
        return []


def _coordinator(keys: Path, state: Path, fleet: str, port: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "fledger.cli", "--log-level", "INFO", "coordinator", "--broker-port", str(port),
            "--fleet", fleet, "--task", "california", "--state-dir", str(state),
            "--keys", str(keys / keytool.COORDINATOR_FILE), "--devices", str(keys / keytool.REGISTRY_FILE),
            "--min-clients", "2", "--strategy", "fedavg", "--round-deadline", "0", "--presence-timeout", "0",
            "--head-wait", "0", *extra]


def test_top_model_is_flat_fedavg_over_every_device_of_two_gateways(tmp_path: Path) -> None:
    keytool.init_fleet(tmp_path / "keys" / "top", "top")
    for gateway, devices in DEVICES.items():
        keytool.add_device(tmp_path / "keys" / "top", gateway)
        keytool.init_fleet(tmp_path / "keys" / gateway, gateway)
        for device in devices:
            keytool.add_device(tmp_path / "keys" / gateway, device)
    procs: dict[str, subprocess.Popen[bytes]] = {}
    logs = tmp_path / "logs"
    logs.mkdir()

    def spawn(name: str, cmd: list[str]) -> None:
        procs[name] = subprocess.Popen(cmd, stdout=open(logs / f"{name}.log", "ab"),  # noqa: SIM115
                                       stderr=subprocess.STDOUT)

    def tail() -> str:
        return "\n".join(f"--- {p.name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-25:])
                         for p in sorted(logs.glob("*.log")))

    with running(Mosquitto(tmp_path / "top-broker")) as top_broker, \
            running(Mosquitto(tmp_path / "gateway-broker")) as low_broker:
        spawn("top", _coordinator(tmp_path / "keys" / "top", tmp_path / "top", "top", top_broker.port,
                                  "--rounds", "1"))
        for gateway in DEVICES:
            spawn(gateway, _coordinator(
                tmp_path / "keys" / gateway, tmp_path / gateway, gateway, low_broker.port, "--rounds", "0",
                "--upstream", f"127.0.0.1:{top_broker.port}",
                "--upstream-bundle", str(keytool.bundle_path(tmp_path / "keys" / "top", gateway))))
        bundles = {device: DeviceBundle.load(keytool.bundle_path(tmp_path / "keys" / gateway, device))
                   for gateway, devices in DEVICES.items() for device in devices}
        topics = {gateway: Topics(gateway) for gateway in DEVICES}
        link = MqttLink(BrokerConfig(broker_port=low_broker.port), "test-devices", persistent=False,
                        subscriptions=[t for g in DEVICES for t in (topics[g].model, topics[g].model_chunks)])
        rng = np.random.default_rng(5)
        sent: dict[str, tuple[dict[str, np.ndarray], int]] = {}  # device -> (its delta, samples)
        try:
            assert link.start(timeout=30)
            models: dict[str, dict[str, np.ndarray]] = {}
            deadline = time.monotonic() + 120
            while len(models) < len(DEVICES) and time.monotonic() < deadline:
                try:
                    message = link.inbox.get(timeout=1)
                except queue.Empty:
                    continue
                for gateway, devices in DEVICES.items():
                    if message.topic == topics[gateway].model:
                        header, body = envelope.open_model(message.payload, bundles[next(iter(devices))],
                                                           max_bytes=1 << 26)
                        assert header.round == 1
                        models[gateway] = decode_tensors(body)
            assert len(models) == len(DEVICES), tail()
            for gateway, devices in DEVICES.items():
                for device in devices:
                    link.publish(topics[gateway].register(device),
                                 envelope.seal_dataset(bundles[device], DATASET, 100, {"task": "california"}))
                wait_for(f"{gateway}'s registrations", lambda g=gateway: sum(
                    r["type"] == "dataset" for r in _records(tmp_path / g)) == 2, 60)
            for gateway, devices in DEVICES.items():
                base = models[gateway]
                for device, samples in devices.items():
                    change = {k: rng.normal(0, 0.1, v.shape).astype(v.dtype) for k, v in base.items()}
                    sent[device] = (change, samples)
                    local = {k: v + change[k] for k, v in base.items()}
                    link.publish(topics[gateway].update(device), deltas.seal_trained(
                        bundles[device], 1, local, base, samples, {"train_loss": 0.5}, dataset_sha256=DATASET))
            wait_for("the top aggregate", lambda: [r for r in _records(tmp_path / "top") if r["type"] == "aggregate"],
                     120)
            for gateway in DEVICES:
                wait_for(f"{gateway} adopts the top model", lambda g=gateway: [
                    r for r in _records(tmp_path / g) if r["type"] == "model.published" and "upstream" in r], 60)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{tail()}") from None
        finally:
            link.stop()
            for proc in procs.values():
                if proc.poll() is None:
                    proc.terminate()
            for proc in procs.values():
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
    for level in ("top", *DEVICES):
        report = verify_file(tmp_path / level / "ledger.log")
        assert report.ok, (level, report)
    top_store = ModelStore(tmp_path / "top" / "models")
    base, top_model = top_store.load(1), top_store.load(2)
    assert base is not None and top_model is not None
    total = sum(samples for _, samples in sent.values())
    for name, array in base.items():
        flat = array.astype(np.float64) + sum(samples * change[name].astype(np.float64)
                                              for change, samples in sent.values()) / total
        np.testing.assert_allclose(top_model[name], flat, rtol=0, atol=1e-5)
    top = _records(tmp_path / "top")
    updates = {r["device"]: r["num_samples"] for r in top if r["type"] == "update"}
    assert updates == {g: sum(d.values()) for g, d in DEVICES.items()}  # one update per gateway, samples summed
    for gateway in DEVICES:
        adopted = [r for r in _records(tmp_path / gateway) if r["type"] == "model.published" and "upstream" in r]
        assert adopted[0]["model_sha256"] == deltas.model_sha256(top_model)  # the gateway republishes the top's
