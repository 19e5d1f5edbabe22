"""A gateway (``--upstream``) that is killed mid-round, and one whose devices change data sets.

Real processes on two mosquitto brokers, as in ``test_gateways.py``: a top coordinator on one,
a gateway's fleet on the other, the gateway a device of the top fleet on the top broker. The
gateway's devices are this test (fixed deltas).
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from conftest import Mosquitto, running
from test_coordinator import Harness, weights
from test_gateways import _coordinator, _records
from test_reliability import wait_for

from coordinator.gateway import resume_upstream
from coordinator.storage import ModelStore
from coordinator.upstream import Upstream, gateway_dataset
from federation import deltas, envelope
from federation.codec import decode_tensors
from federation.envelope import ModelHeader
from federation.fleet_state import verify_file
from federation.keys import CoordinatorKeys, DeviceBundle
from federation.mqtt import BrokerConfig, MqttLink
from federation.outbox import Outbox
from federation.topics import Topics
from fledger import keytool

DEVICES = {"a1": 10, "a2": 30}  # the gateway's devices and their sample counts
DATASET = bytes(range(32))


@dataclass
class Tiers:
    tmp: Path
    top_port: int
    low_port: int
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    bundles: dict[str, DeviceBundle] = field(default_factory=dict)
    gateway_extra: tuple[str, ...] = ()  # more options for the gateway

    @property
    def logs(self) -> Path:
        return self.tmp / "logs"

    def spawn(self, name: str, cmd: list[str]) -> subprocess.Popen[bytes]:
        self.procs[name] = subprocess.Popen(cmd, stdout=open(self.logs / f"{name}.log", "ab"),  # noqa: SIM115
                                            stderr=subprocess.STDOUT)
        return self.procs[name]

    def gateway(self) -> subprocess.Popen[bytes]:
        # --heartbeat 2: the gateway restarted after a SIGKILL sees within ~5 s that no other runs.
        return self.spawn("gwa", _coordinator(
            self.tmp / "keys" / "gwa", self.tmp / "gwa", "gwa", self.low_port, "--rounds", "0", "--heartbeat", "2",
            "--upstream", f"127.0.0.1:{self.top_port}",
            "--upstream-bundle", str(keytool.bundle_path(self.tmp / "keys" / "top", "gwa")), *self.gateway_extra))

    def log(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def tail(self) -> str:
        return "\n".join(f"--- {p.name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-30:])
                         for p in sorted(self.logs.glob("*.log")))


@contextmanager
def tiers(tmp_path: Path, *top_extra: str, top_gateways: tuple[str, ...] = ("gwa",),
          gateway_extra: tuple[str, ...] = ()) -> Iterator[Tiers]:
    keytool.init_fleet(tmp_path / "keys" / "top", "top")
    for gateway in top_gateways:
        keytool.add_device(tmp_path / "keys" / "top", gateway)
    keytool.init_fleet(tmp_path / "keys" / "gwa", "gwa")
    for device in DEVICES:
        keytool.add_device(tmp_path / "keys" / "gwa", device)
    (tmp_path / "logs").mkdir()
    with running(Mosquitto(tmp_path / "top-broker")) as top_broker, \
            running(Mosquitto(tmp_path / "gateway-broker")) as low_broker:
        t = Tiers(tmp_path, top_broker.port, low_broker.port, gateway_extra=gateway_extra)
        t.bundles = {device: DeviceBundle.load(keytool.bundle_path(tmp_path / "keys" / "gwa", device))
                     for device in DEVICES}
        try:
            t.spawn("top", _coordinator(tmp_path / "keys" / "top", tmp_path / "top", "top", top_broker.port,
                                        "--rounds", "2", *top_extra))
            t.gateway()
            yield t
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{t.tail()}") from None
        finally:
            for proc in t.procs.values():
                if proc.poll() is None:
                    proc.send_signal(signal.SIGCONT)
                    proc.terminate()
            for proc in t.procs.values():
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()


def _link(port: int, name: str, subscriptions: list[str]) -> MqttLink:
    link = MqttLink(BrokerConfig(broker_port=port), name, persistent=False, subscriptions=subscriptions)
    assert link.start(timeout=30)
    return link


def _next(link: MqttLink, topic: str, timeout: float) -> bytes:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            message = link.inbox.get(timeout=0.5)
        except queue.Empty:
            continue
        if message.topic == topic:
            return message.payload
    raise AssertionError(f"nothing on {topic} within {timeout}s")


def _gateway_model(link: MqttLink, t: Tiers, round_number: int) -> dict[str, np.ndarray]:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        header, body = envelope.open_model(_next(link, Topics("gwa").model, 60), t.bundles["a1"], max_bytes=1 << 26)
        if header.round == round_number:
            return decode_tensors(body)
    raise AssertionError(f"the gateway published no model for its round {round_number}")


def _register(t: Tiers, link: MqttLink, device: str, dataset: bytes, registered: int) -> None:
    link.publish(Topics("gwa").register(device), envelope.seal_dataset(t.bundles[device], dataset, 100,
                                                                       {"task": "california"}))
    wait_for(f"{device}'s registration", lambda: sum(r["type"] == "dataset" for r in _records(t.tmp / "gwa"))
             == registered, 30)


def _train(t: Tiers, link: MqttLink, round_number: int, base: dict[str, np.ndarray], rng: np.random.Generator,
           datasets: dict[str, bytes]) -> dict[str, tuple[dict[str, np.ndarray], int]]:
    sent = {}
    for device, samples in DEVICES.items():
        change = {k: rng.normal(0, 0.1, v.shape).astype(v.dtype) for k, v in base.items()}
        sent[device] = (change, samples)
        link.publish(Topics("gwa").update(device), deltas.seal_trained(
            t.bundles[device], round_number, {k: v + change[k] for k, v in base.items()}, base, samples,
            {"train_loss": 0.5}, dataset_sha256=datasets[device]))
    return sent


def test_a_gateway_killed_after_sending_upstream_resends_the_same_update_and_is_counted_once(tmp_path: Path) -> None:
    with tiers(tmp_path, "--min-clients", "1") as t:
        low = _link(t.low_port, "test-devices", [Topics("gwa").model, Topics("gwa").model_chunks])
        top = _link(t.top_port, "test-upstream-watch", [Topics("top").update("gwa")])
        try:
            base = _gateway_model(low, t, 1)
            for registered, device in enumerate(DEVICES, start=1):
                _register(t, low, device, DATASET, registered)
            # The top is stopped: the gateway's update reaches the top broker but is not answered.
            os.kill(t.procs["top"].pid, signal.SIGSTOP)
            sent = _train(t, low, 1, base, np.random.default_rng(7), dict.fromkeys(DEVICES, DATASET))
            first = _next(top, Topics("top").update("gwa"), 60)  # on the wire: the gateway sent it
            t.procs["gwa"].kill()
            t.procs["gwa"].wait(timeout=10)
            t.gateway()
            again = _next(top, Topics("top").update("gwa"), 60)  # from its outbox, after the restart
            assert again == first  # the same bytes (msg_id): a replay upstream, never a second update
            os.kill(t.procs["top"].pid, signal.SIGCONT)
            wait_for("the top's aggregate", lambda: [r for r in _records(tmp_path / "top") if r["type"] == "aggregate"],
                     60)
            wait_for("the gateway adopts the top's model", lambda: [
                r for r in _records(tmp_path / "gwa") if r["type"] == "model.published" and "upstream" in r], 60)
            wait_for("the gateway's outbox empties", lambda: not any((tmp_path / "gwa" / "upstream-outbox").glob(
                "*.update")), 30)
        finally:
            low.stop()
            top.stop()
        top_records, gw_records = _records(tmp_path / "top"), _records(tmp_path / "gwa")
        assert [(r["device"], r["round"]) for r in top_records if r["type"] == "update"] == [("gwa", 1)]
        assert not [r for r in top_records if r["type"] == "update.rejected"]  # no duplicate, no replay recorded
        aggregate, = [r for r in top_records if r["type"] == "aggregate"]
        assert aggregate["num_samples"] == sum(DEVICES.values())
        # The top's model is FedAvg over the gateway's devices: the gateway's work counted once.
        top_store = ModelStore(tmp_path / "top" / "models")
        top_base, top_model = top_store.load(1), top_store.load(2)
        assert top_base is not None and top_model is not None
        for name, array in top_base.items():
            flat = array.astype(np.float64) + sum(n * change[name].astype(np.float64)
                                                  for change, n in sent.values()) / sum(DEVICES.values())
            np.testing.assert_allclose(top_model[name], flat, rtol=0, atol=1e-5)
        # The gateway waited through its restart: one aggregate, no abandoned round, and its round 2
        # trains from the top's model.
        assert len([r for r in gw_records if r["type"] == "aggregate"]) == 1
        assert not [r for r in gw_records if "abandoned_round" in r]
        adopted, = [r for r in gw_records if r["type"] == "model.published" and "upstream" in r]
        assert adopted["round"] == 2 and adopted["model_sha256"] == deltas.model_sha256(top_model)
        assert "the upstream accepted our update for its round 1" in t.log("gwa")
    for level in ("top", "gwa"):
        report = verify_file(tmp_path / level / "ledger.log")
        assert report.ok, (level, report)


def test_a_gateway_whose_devices_change_data_sets_registers_once_per_upstream_round(tmp_path: Path) -> None:
    # The top waits for two gateways; the second (gwb) is this test, so the top's round 1 stays
    # open after gwa's update while gwa's devices change their data sets four times.
    with tiers(tmp_path, "--min-clients", "2", top_gateways=("gwa", "gwb")) as t:
        gwb = DeviceBundle.load(keytool.bundle_path(tmp_path / "keys" / "top", "gwb"))
        low = _link(t.low_port, "test-devices", [Topics("gwa").model, Topics("gwa").model_chunks])
        top = _link(t.top_port, "test-gwb", [Topics("top").model, Topics("top").model_chunks])
        rng = np.random.default_rng(11)
        try:
            base = _gateway_model(low, t, 1)
            datasets = dict.fromkeys(DEVICES, DATASET)
            for registered, device in enumerate(DEVICES, start=1):
                _register(t, low, device, DATASET, registered)
            # The top is slow to answer (stopped) while gwa's update for its round 1 is pending.
            os.kill(t.procs["top"].pid, signal.SIGSTOP)
            _train(t, low, 1, base, rng, datasets)
            wait_for("gwa's update upstream", lambda: "our aggregate upstream" in t.log("gwa"), 30)
            changes = 0
            for _step in (1, 2):  # each device's cap is 3 registrations per gateway round: 2 more each
                for device in DEVICES:
                    changes += 1
                    datasets[device] = bytes([changes]) * 32
                    _register(t, low, device, datasets[device], 2 + changes)
            assert changes == 4  # more than the upstream's 3 registrations per round
            time.sleep(1)  # (before this fix the gateway re-registered upstream on every change)
            os.kill(t.procs["top"].pid, signal.SIGCONT)
            wait_for("gwa's update at the top",
                     lambda: [r for r in _records(tmp_path / "top") if r["type"] == "update"], 30)
            # gwb's update closes the top's round 1.
            header, body = envelope.open_model(_next(top, Topics("top").model, 30), gwb, max_bytes=1 << 26)
            top_model = decode_tensors(body)
            top.publish(Topics("top").register("gwb"), envelope.seal_dataset(gwb, DATASET, 1, {}))
            wait_for("gwb's registration", lambda: sum(r["type"] == "dataset" and r["device"] == "gwb"
                                                       for r in _records(tmp_path / "top")) == 1, 30)
            top.publish(Topics("top").update("gwb"), deltas.seal_trained(
                gwb, header.round, {k: v + 0.01 for k, v in top_model.items()}, top_model, 5, {"train_loss": 0.5},
                dataset_sha256=DATASET))
            base = _gateway_model(low, t, 2)  # the top's round 2 model, through the gateway
            _train(t, low, 2, base, rng, datasets)
            wait_for("gwa's second update upstream", lambda: len(
                [r for r in _records(tmp_path / "top") if r["type"] == "update" and r["device"] == "gwa"]) == 2, 30)
        finally:
            low.stop()
            top.stop()
        top_records = _records(tmp_path / "top")
        registrations = [r for r in top_records if r["type"] == "dataset" and r["device"] == "gwa"]
        # One per upstream round: the first update's, then the final state's with the second update.
        assert [r["sha256"] for r in registrations] == [
            gateway_dataset(dict.fromkeys(DEVICES, DATASET)), gateway_dataset(datasets)]
        assert "registration_rate" not in t.log("top")
        assert not [r for r in top_records if r["type"] == "update.rejected"]
        gw_updates = [r for r in top_records if r["type"] == "update" and r["device"] == "gwa"]
        assert [r["round"] for r in gw_updates] == [1, 2]
    for level in ("top", "gwa"):
        report = verify_file(tmp_path / level / "ledger.log")
        assert report.ok, (level, report)


def _upstream(tmp_path: Path, sent: list[tuple[str, bytes]]) -> tuple[Upstream, CoordinatorKeys]:
    keys = keytool.init_fleet(tmp_path / "keys", "top")
    keytool.add_device(tmp_path / "keys", "gwa")
    bundle = DeviceBundle.load(keytool.bundle_path(tmp_path / "keys", "gwa"))
    return Upstream(bundle, Topics("top"), lambda topic, payload: sent.append((topic, payload)),
                    Outbox(tmp_path / "upstream-outbox")), keys


def _model_header(round_number: int) -> ModelHeader:
    return ModelHeader("top", round_number, bytes(32), bytes(32), 0, False, "k", "k", bytes(12), 0.0, {})


def test_the_upstream_outbox_resends_after_a_restart_and_drops_on_a_final_answer_or_a_closed_round(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    sent: list[tuple[str, bytes]] = []
    up, keys = _upstream(tmp_path, sent)
    topics, change = Topics("top"), {"w": np.ones(3, np.float32)}
    up.base = _model_header(1)
    up.send(change, 40, {"train_loss": 0.5}, {"a1": DATASET}, now=0.0)
    assert [t for t, _ in sent] == [topics.register("gwa"), topics.update("gwa")]  # registered with the update
    update = sent[-1][1]
    msg_id = envelope.parse_update(update, max_bytes=len(update)).header.msg_id.hex()
    # Killed before any answer: a new process finds the same bytes in the outbox and sends them again.
    sent.clear()
    again = Upstream(up.bundle, topics, lambda topic, payload: sent.append((topic, payload)),
                     Outbox(tmp_path / "upstream-outbox"))
    assert again.restore() == 1
    again.resend(now=100.0)
    assert sent == [(topics.register("gwa"), up.outbox.get(1, kind="register")), (topics.update("gwa"), update)]
    again.resend(now=101.0)
    assert len(sent) == 2  # not before RESEND_S
    # Registered and not yet answered: only the update goes again.
    ack = {"fleet": "top", "device": "gwa", "registered": gateway_dataset({"a1": DATASET}).hex(), "updates": {}}
    again.on_message(topics.ack("gwa"), envelope.seal_ack(keys, ack))
    again.resend(now=110.0)
    assert [t for t, _ in sent[2:]] == [topics.update("gwa")]
    # A final refusal: dropped, with a line saying why.
    ack["updates"] = {msg_id: {"round": 1, "verdict": "wrong_base"}}
    again.on_message(topics.ack("gwa"), envelope.seal_ack(keys, ack))
    with caplog.at_level(logging.WARNING):
        again.resend(now=120.0)
    assert again.pending == [] and "will not count our update for its round 1: wrong_base" in caplog.text
    # A round the upstream closed without answering: dropped too, and a newer model answers it.
    again.base = _model_header(2)
    sent.clear()
    again.send(change, 40, {"train_loss": 0.5}, {"a1": DATASET}, now=130.0)
    assert [t for t, _ in sent] == [topics.update("gwa")]  # the upstream lists the data set already
    assert again.pending == [2] and again.newer_model() is None
    # An upstream that lost the registration (fresh state) gets it again with the next resend.
    again.on_message(topics.ack("gwa"), envelope.seal_ack(keys, {**ack, "registered": None}))
    again.resend(now=136.0)
    assert [t for t, _ in sent[1:]] == [topics.register("gwa"), topics.update("gwa")]
    again.model = (_model_header(3), change)
    assert again.newer_model() is not None
    again.resend(now=137.0)
    assert again.pending == [] and "closed its round 2 without answering" in caplog.text


def test_a_gateway_restarted_after_its_aggregate_waits_for_the_upstream_or_moves_on_if_nothing_was_sent(
        tmp_path: Path) -> None:
    (tmp_path / "gw").mkdir()
    h = Harness(tmp_path / "gw", strategy="fedavg", gateway=True)
    assert h.send("dev-a", h.update("dev-a", 1, weights(1.0), n=10)).accepted
    assert h.send("dev-b", h.update("dev-b", 1, weights(3.0), n=30)).accepted
    sent: list[tuple[str, bytes]] = []
    up, _ = _upstream(tmp_path, sent)
    up.model = (_model_header(1), weights(0.0))
    up.base = up.model[0]
    (change, samples), = h.upstream
    up.send(change, samples, {}, {"dev-a": DATASET}, now=0.0)
    # Restarted with the update in the outbox: still waiting for the upstream's answer.
    h.coordinator = h.build(register=False)
    assert h.coordinator.awaiting_upstream
    resume_upstream(h.coordinator, up)
    assert h.coordinator.awaiting_upstream and up.awaiting_after == 1 and up.newer_model() is None
    # Restarted after the aggregate but before the outbox write (nothing went upstream): the next
    # round trains from the upstream's newest model at once instead of waiting for ever.
    up.outbox.remove(1)
    h.coordinator = h.build(register=False)
    resume_upstream(h.coordinator, up)
    assert not h.coordinator.awaiting_upstream and h.coordinator.round is not None
    assert h.coordinator.round.number == 2
    np.testing.assert_allclose(h.coordinator.global_model["w"], 0.0)
    assert verify_file(h.tmp / "ledger.log").ok
