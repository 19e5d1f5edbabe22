"""The edge agent: wait for the signed global model, train on local data, send a sealed update.

Local data never leaves the device: only encrypted, signed weight updates do. The MQTT link
is passed in (see :mod:`federation.mqtt`); training runs on the main thread while paho's
network thread keeps the connection alive and queues what arrives.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from edge_agent.metrics import NO_EVENTS, AgentEvents
from edge_agent.outbox import Outbox
from edge_agent.presence import PresenceSession
from edge_agent.registration import Fingerprint, mark_acknowledged
from edge_agent.training import evaluate, train_local
from federation import envelope
from federation.codec import CodecError, TensorDict, check_against_spec, decode_tensors, encode_tensors, spec_of
from federation.durable import atomic_write
from federation.envelope import EnvelopeError, ModelHeader
from federation.keys import DeviceBundle
from federation.mqtt import Message
from federation.tasks import LocalData, Task
from federation.topics import Topics
from federation.verdicts import ACCEPTED, EXPLANATIONS, FINAL_REASONS

log = logging.getLogger(__name__)


class Link(Protocol):
    inbox: queue.Queue[Message]

    def publish(self, topic: str, payload: bytes, *, retain: bool = False, qos: int = 1,
                wait: float | None = None, chunked: bool = False) -> bool: ...


@dataclass
class AgentSettings:
    resend_interval_s: float = 20.0
    heartbeat_s: float = 15.0
    max_model_bytes: int = 256 * 1024 * 1024
    exit_when_done: bool = True
    seed: int = 0


class EdgeAgent:
    def __init__(
        self, bundle: DeviceBundle, task: Task, data: LocalData, link: Link, topics: Topics,
        state_dir: Path, settings: AgentSettings | None = None, now: Callable[[], float] = time.time,
        *, dataset: Fingerprint, register: bool = True, presence: PresenceSession | None = None,
    ) -> None:
        self.bundle = bundle
        self.task = task
        self.data = data
        self.link = link
        self.topics = topics
        self.settings = settings or AgentSettings()
        self.outbox = Outbox(Path(state_dir) / "outbox")
        self.state_dir = Path(state_dir)
        self._now = now
        self.model = task.build_model()
        self.spec = spec_of(self.model.state_dict())
        self.latest: tuple[ModelHeader, TensorDict] | None = None  # checked and decoded once
        self.trained_rounds: list[int] = []
        # The last round trained survives a restart, so a restarted agent never trains a round twice.
        self._last_round_file = self.state_dir / "last_trained_round"
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.last_trained_round = _read_round(self._last_round_file)
        # The coordinator's signed acknowledgement for this device: registration and verdicts.
        self.ack: dict[str, Any] = {}
        self._outbox_msg_ids: dict[int, str] = {}  # round -> hex msg_id of the update in the outbox
        self._told: set[tuple[str, str]] = set()  # (msg_id, verdict) already logged
        self.refused_models = 0
        self._last_send: dict[int, float] = {}
        self._last_heartbeat = 0.0
        self.presence = presence or PresenceSession(bundle)
        self._heartbeat_lock = threading.Lock()
        self.done = False
        self.dataset = dataset
        self.registration_pending = register
        self._last_registration = 0.0
        self.events: AgentEvents = NO_EVENTS  # metrics (edge_agent.metrics), when switched on

    # -- inbound ---------------------------------------------------------------------------------
    def _on_message(self, message: Message) -> None:
        if message.topic == self.topics.model:
            self._on_model(message.payload)
        elif message.topic == self.topics.ack(self.bundle.device_id):
            try:
                ack = envelope.open_ack(message.payload, self.bundle.coordinator.sign_public,
                                        fleet=self.bundle.fleet, device=self.bundle.device_id)
            except EnvelopeError as exc:
                log.warning("ignored an acknowledgement message: %s", exc)
                return
            if not self.ack or _number(ack.get("time")) >= _number(self.ack.get("time")):
                self.ack = ack  # an older one (replayed, or retained from before) tells nothing new
        # Anything else (amqtt may deliver retained messages of other topics) is ignored.

    def _on_model(self, payload: bytes) -> None:
        try:
            header, weights_bytes = envelope.open_model(payload, self.bundle, max_bytes=self.settings.max_model_bytes)
            weights = decode_tensors(weights_bytes)
            check_against_spec(weights, self.spec)
        except (EnvelopeError, CodecError) as exc:
            self.refused_models += 1
            log.error("refused a global model: %s", exc)
            return
        if self.latest is None or header.round >= self.latest[0].round:
            self.latest = (header, weights)

    def drain(self, timeout: float) -> None:
        """Handle everything queued, waiting up to ``timeout`` for the first message."""
        try:
            message = self.link.inbox.get(timeout=timeout)
        except queue.Empty:
            return
        self._on_message(message)
        while True:
            try:
                self._on_message(self.link.inbox.get_nowait())
            except queue.Empty:
                return

    # -- one step of the loop --------------------------------------------------------------------
    def step(self, timeout: float = 1.0) -> None:
        self.drain(timeout)
        self._heartbeat()
        listed = self.ack.get("registered") if self.ack else None
        if not self.registration_pending and self.ack and listed != self.dataset.sha256.hex():
            # A coordinator with fresh state, or one that lost our registration: register again.
            log.warning("the coordinator does not list our data set %s; registering again",
                        self.dataset.sha256.hex()[:16])
            self.registration_pending = True
        if self.latest is None:
            return
        if self.registration_pending and not self._registered():
            return  # train only on data the ledger knows about
        header, weights = self.latest
        dropped = self.outbox.drop_before(header.round)
        if dropped:
            log.info("rounds %s closed; removed their updates from the outbox", dropped)
        if header.done:
            if not self.done:
                log.info("the coordinator finished training at round %d", header.round)
            self.done = True
            return
        if header.round < self.last_trained_round and not self.outbox.rounds():
            # The coordinator is behind what we trained: its state was reset (a new ledger).
            # Follow it rather than wait for a round number it may never reach.
            log.warning("the coordinator is at round %d but we trained up to %d: following it",
                        header.round, self.last_trained_round)
            self.last_trained_round = header.round - 1
        if self.outbox.get(header.round) is None and header.round > self.last_trained_round:
            self._train_round(header, weights)
        self._resend_if_needed(header.round)

    def _registered(self) -> bool:
        """Send the dataset registration until the coordinator's acknowledgement lists it."""
        if self.ack.get("registered") == self.dataset.sha256.hex():
            self.registration_pending = False
            mark_acknowledged(self.state_dir)
            log.info("data set %s registered in the ledger", self.dataset.sha256.hex()[:16])
            return True
        if self._now() - self._last_registration >= min(self.settings.resend_interval_s, 5.0):
            self._last_registration = self._now()
            payload = envelope.seal_dataset(self.bundle, self.dataset.sha256, self.dataset.size, self.dataset.schema)
            self.link.publish(self.topics.register(self.bundle.device_id), payload, qos=1)
            log.info("registering data set %s (%d bytes)", self.dataset.sha256.hex()[:16], self.dataset.size)
        return False

    def _train_round(self, header: ModelHeader, weights: TensorDict) -> None:
        round_number = header.round
        state = {name: torch.from_numpy(array.copy()) for name, array in weights.items()}
        self.model.load_state_dict(state)
        hp = self.task.hyperparameters
        global_metrics = evaluate(self.model, self.data.test_x, self.data.test_y, self.task.kind)
        result = train_local(self.model, self.data.train_x, self.data.train_y, kind=self.task.kind,
                             epochs=hp.local_epochs, optimizer=hp.optimizer, lr=hp.lr,
                             batch_size=hp.batch_size, seed=self.settings.seed * 100_003 + round_number)
        local_metrics = evaluate(self.model, self.data.test_x, self.data.test_y, self.task.kind)
        metrics = {"train_loss": result.train_loss, "train_seconds": result.seconds,
                   **{f"test_{k}": v for k, v in local_metrics.items()},
                   **{f"global_test_{k}": v for k, v in global_metrics.items()}}
        payload = envelope.seal_update(self.bundle, round_number, encode_tensors(self.model.state_dict()),
                                       result.num_samples, metrics, dataset_sha256=self.dataset.sha256)
        self.outbox.put(round_number, payload)  # durable before it is sent
        self.trained_rounds.append(round_number)
        self.events.trained(round_number, result.seconds, result.num_samples, result.train_loss)
        self.last_trained_round = round_number
        atomic_write(self._last_round_file, str(round_number).encode())  # fsynced: survives a power cut
        log.info("round %d: trained on %d samples in %.1fs, loss %.4f, %s", round_number, result.num_samples,
                 result.seconds, result.train_loss,
                 ", ".join(f"{k} {v:.4f}" for k, v in local_metrics.items()))
        self._send(round_number, payload)

    def _send(self, round_number: int, payload: bytes, *, resend: bool = False) -> None:
        self.link.publish(self.topics.update(self.bundle.device_id), payload, qos=1, chunked=True)
        self._last_send[round_number] = self._now()
        self.events.sent(round_number, resend=resend)

    def _resend_if_needed(self, round_number: int) -> None:
        payload = self.outbox.get(round_number)
        if payload is None:
            return
        verdict = self._verdict(round_number, payload)
        if verdict == ACCEPTED:
            self.outbox.remove(round_number)
            self.events.acknowledged(round_number)
            log.info("round %d: the coordinator accepted our update", round_number)
            return
        if verdict is not None and verdict in FINAL_REASONS:
            self.outbox.remove(round_number)
            self.events.rejected(round_number, verdict)
            log.warning("round %d: the coordinator did not count our update: %s (%s); dropped it", round_number,
                        verdict, EXPLANATIONS.get(verdict, "sending it again cannot help"))
            return
        if verdict == "dataset_not_registered" and not self.registration_pending:
            self.registration_pending = True
        if verdict is not None and (self._outbox_msg_ids[round_number], verdict) not in self._told:
            self._told.add((self._outbox_msg_ids[round_number], verdict))
            self.events.rejected(round_number, verdict)
            log.warning("round %d: the coordinator did not count our update yet: %s (%s); will send it again",
                        round_number, verdict, EXPLANATIONS.get(verdict, "it may be temporary"))
        last = self._last_send.get(round_number)
        if last is None or self._now() - last >= self.settings.resend_interval_s:
            if last is not None:
                log.info("round %d: no acknowledgement yet; resending our update", round_number)
            self._send(round_number, payload, resend=True)

    def _verdict(self, round_number: int, payload: bytes) -> str | None:
        """The coordinator's verdict on the update in the outbox for this round; None if none yet."""
        msg_id = self._outbox_msg_ids.get(round_number)
        if msg_id is None:
            try:
                msg_id = envelope.parse_update(payload, max_bytes=len(payload)).header.msg_id.hex()
            except EnvelopeError:
                return None  # our own sealed update: cannot happen short of a corrupt outbox file
            self._outbox_msg_ids[round_number] = msg_id
        entry = self.ack.get("updates", {}).get(msg_id) if self.ack else None
        verdict = entry.get("verdict") if isinstance(entry, dict) else None
        return verdict if isinstance(verdict, str) else None

    def _heartbeat(self) -> None:
        with self._heartbeat_lock:  # called by the loop and by the heartbeat thread
            now = self._now()
            if now - self._last_heartbeat < self.settings.heartbeat_s:
                return
            self._last_heartbeat = now
        heartbeat = self.presence.statement("online", self.latest[0].round if self.latest else None)
        self.link.publish(self.topics.presence(self.bundle.device_id), heartbeat, retain=True)

    def run(self, stop: Callable[[], bool] = lambda: False) -> None:
        finished = threading.Event()

        def beat() -> None:
            # Heartbeats go on while a long local training round holds the main loop.
            while not finished.wait(min(1.0, self.settings.heartbeat_s)):
                try:
                    self._heartbeat()
                except Exception:
                    log.exception("heartbeat failed")

        beater = threading.Thread(target=beat, name="heartbeat", daemon=True)
        beater.start()
        try:
            while not stop():
                self.step()
                if self.done and self.settings.exit_when_done:
                    return
        finally:
            # Stop and join it before the caller disconnects: a thread still publishing while
            # the link closes or the interpreter exits is how processes hang or abort at exit.
            finished.set()
            beater.join(timeout=10)


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) else float("-inf")


def _read_round(path: Path) -> int:
    """The last round trained, 0 if none. Unreadable content (a file left empty by a power cut
    on an older version, a hand edit) is logged and read as 0: at worst a round is trained
    twice and the coordinator refuses the second update as duplicate_in_round."""
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return 0
    try:
        return max(0, int(text))
    except ValueError:
        log.warning("%s holds %r, not a round number; starting as if no round was trained", path, text[:40])
        return 0
