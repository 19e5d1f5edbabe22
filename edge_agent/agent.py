"""The edge agent: wait for the signed global model, train on local data, send a sealed update.

Local data never leaves the device: only encrypted, signed weight updates do. The MQTT link
is passed in (see :mod:`federation.mqtt`); training runs on the main thread while paho's
network thread keeps the connection alive and queues what arrives.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from edge_agent import chain_pin
from edge_agent.chain_pin import ChainPin
from edge_agent.metrics import NO_EVENTS, AgentEvents
from edge_agent.presence import PresenceSession
from edge_agent.registration import Fingerprint, mark_acknowledged
from edge_agent.training import TrainingDivergedError, evaluate, train_local
from federation import deltas, envelope
from federation.catch_up import CatchUpSchedule, request_body
from federation.codec import CodecError, TensorDict, check_against_spec, decode_tensors, encode_tensors, spec_of
from federation.durable import atomic_write
from federation.envelope import EnvelopeError, ModelHeader
from federation.keys import DeviceBundle
from federation.mqtt import Message
from federation.outbox import Outbox
from federation.tasks import LocalData, Task
from federation.topics import Topics
from federation.verdicts import ACCEPTED, EXPLANATIONS, FINAL_REASONS, left_out

log = logging.getLogger(__name__)


MAX_AWAITED_VERDICTS = 16  # closed rounds whose verdict is still to be reported
CHAIN_ERROR_EVERY_S = 60.0  # how often a refused chain is logged again (never silent, never a flood)


class TrainingStopped(Exception):
    """Training or evaluation was aborted because the agent was told to stop (its round is trained
    again later)."""


class Link(Protocol):
    inbox: queue.Queue[Message]
    connect_count: int  # grows with every (re)connect

    def publish(self, topic: str, payload: bytes, *, retain: bool = False, qos: int = 1,
                wait: float | None = None, chunked: bool = True) -> bool: ...


@dataclass
class AgentSettings:
    resend_interval_s: float = 20.0
    heartbeat_s: float = 15.0
    max_model_bytes: int = 256 * 1024 * 1024
    exit_when_done: bool = True
    seed: int = 0
    accept_reset: bool = False  # follow a coordinator that started a new chain or went backwards
    catch_up_wait_s: float = 3.0  # after a (re)connect without a model: ask the coordinator for it


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
        self._latest_message: bytes | None = None  # the model message ``latest`` came from
        self.catch_up = CatchUpSchedule(self.settings.catch_up_wait_s)
        self.catch_up_requests = 0
        self.trained_rounds: list[int] = []
        self.skipped_rounds: list[int] = []  # rounds whose training diverged: nothing was sent
        # The last round trained survives a restart, so a restarted agent never trains a round twice.
        self._last_round_file = self.state_dir / "last_trained_round"
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.last_trained_round = _read_round(self._last_round_file)
        # The coordinator's signed acknowledgement for this device: registration and verdicts.
        self.ack: dict[str, Any] = {}
        self._outbox_msg_ids: dict[int, str] = {}  # round -> hex msg_id of the update in the outbox
        self._told: set[tuple[str, str]] = set()  # (msg_id, verdict) already logged
        self._awaiting_verdict: dict[str, int] = {}  # hex msg_id -> round: closed without a verdict yet
        self.refused_models = 0
        self._last_send: dict[int, float] = {}
        self._last_heartbeat = 0.0
        self.presence = presence or PresenceSession(bundle)
        self._heartbeat_lock = threading.Lock()
        self.done = False
        self.dataset = dataset
        self.registration_pending = register
        self._last_registration = 0.0
        self.chain = chain_pin.load(self.state_dir)
        self.chain_problem: str | None = None  # why the coordinator's model is refused, while it is
        self._last_chain_error = float("-inf")
        self._left_out_told = 0  # the last round whose exclusion from the aggregate was logged
        self._stop: Callable[[], bool] = lambda: False
        self._alive: Callable[[], None] = lambda: None
        self.events: AgentEvents = NO_EVENTS  # metrics (edge_agent.metrics), when switched on

    # -- inbound ---------------------------------------------------------------------------------
    def _on_message(self, message: Message) -> None:
        if message.topic in (self.topics.model, self.topics.catch_up_reply(self.bundle.device_id, "model")):
            self._on_model(message.payload)  # retained, or the answer to our catch-up request
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
        seen = ChainPin(self.bundle.coordinator.sign_public.hex(), str(header.info.get("genesis", "")),
                        header.round, header.block_index + 1)
        problem = chain_pin.judge(self.chain, seen)
        if problem is not None and not self.settings.accept_reset:
            self.chain_problem = problem
            if self._now() - self._last_chain_error >= CHAIN_ERROR_EVERY_S:
                self._last_chain_error = self._now()
                log.error("the coordinator of fleet %s %s; not following it. Fix: restore the coordinator's ledger "
                          "(`fledger ledger restore`, see docs/reliability.md); if the reset is intended, restart "
                          "this agent with --accept-reset (or delete %s)", header.fleet, problem,
                          self.state_dir / chain_pin.FILE)
            return
        if problem is not None:
            log.warning("the coordinator %s; following it (--accept-reset)", problem)
            self.latest = None
            for old in self.outbox.rounds():  # trained on the old chain's models: never accepted now
                self.outbox.remove(old)
                log.warning("dropped our update for round %d from the outbox: it belongs to the chain the "
                            "coordinator left", old)
            self.last_trained_round = header.round - 1
            atomic_write(self._last_round_file, str(self.last_trained_round).encode())
        self.chain_problem = None
        self._tell_if_left_out(header.block_data)
        pin = chain_pin.advance(self.chain, seen)
        if pin != self.chain:
            chain_pin.save(self.state_dir, pin)
            self.chain = pin
        if self.latest is None or header.round >= self.latest[0].round or (
                self.latest[0].done and not header.done and header.created > self.latest[0].created):
            # The last case: after a finished run, a newer run from round 1 (a coordinator with
            # fresh state), which a long-running agent (--no-exit-when-done) joins.
            self.latest = (header, weights)
            self._latest_message = payload

    def _tell_if_left_out(self, block: dict[str, Any]) -> None:
        """An accepted update can still be left out of the round's aggregate (a robust strategy
        excluded it): the aggregate block the model travels with says so, and why. Logged once."""
        why = left_out(block, self.bundle.device_id)
        if why is None or why.round <= self._left_out_told:
            return
        self._left_out_told = why.round
        self.events.rejected(why.round, "excluded")
        log.warning("round %d: the coordinator accepted our update but left it out of the aggregate: %s; see "
                    "docs/robustness.md (a device whose data differs much from the others' is left out too)",
                    why.round, why)

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
        self._catch_up_if_needed()
        listed = self.ack.get("registered") if self.ack else None
        if not self.registration_pending and self.ack and listed != self.dataset.sha256.hex():
            # A coordinator with fresh state, or one that lost our registration: register again.
            log.warning("the coordinator does not list our data set %s; registering again",
                        self.dataset.sha256.hex()[:16])
            self.registration_pending = True
        if self.latest is None or self.chain_problem:
            return  # (a refused chain: nothing it says is acted on, our outbox is not sent to it)
        if self.registration_pending and not self._registered():
            return  # train only on data the ledger knows about
        header, weights = self.latest
        self._drop_closed_rounds(header.round)
        self._explain_late_verdicts()
        if header.done:
            if not self.done:
                log.info("the coordinator finished training at round %d", header.round)
            self.done = True
            return
        if self.done:
            log.info("the coordinator started a new run at round %d", header.round)
            self.done = False
        if header.round < self.last_trained_round:
            # The coordinator is behind what we trained and we follow it (a reset we accepted, or
            # no pin yet): our updates for later rounds will never be accepted.
            for later in [r for r in self.outbox.rounds() if r > header.round]:
                self.outbox.remove(later)
                log.warning("dropped our update for round %d from the outbox: the coordinator is at round %d "
                            "and will not accept it", later, header.round)
            log.warning("the coordinator is at round %d but we trained up to %d: following it",
                        header.round, self.last_trained_round)
            self.last_trained_round = header.round - 1
            atomic_write(self._last_round_file, str(self.last_trained_round).encode())
        if self.outbox.get(header.round) is None and header.round > self.last_trained_round:
            self._train_round(header, weights)
        self._resend_if_needed(header.round)

    def _catch_up_if_needed(self) -> None:
        """Ask the coordinator for the model (and our acknowledgement) when none came a short
        while after connecting, and after every reconnect: on a broker cluster the retained model
        may live on another node (docs/deploy.md)."""
        if self.catch_up.due(self._now(), self.link.connect_count, lacking=self.latest is None):
            self.catch_up_requests += 1
            self.link.publish(self.topics.catch_up(self.bundle.device_id), request_body(self._latest_message), qos=1)
            log.info("asked the coordinator to catch us up (%s)",
                     "no model yet" if self.latest is None else f"holding round {self.latest[0].round}")

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
        global_metrics = evaluate(self.model, self.data.test_x, self.data.test_y, self.task.kind,
                                  on_batch=self._on_batch)
        try:
            result = train_local(self.model, self.data.train_x, self.data.train_y, kind=self.task.kind,
                                 epochs=hp.local_epochs, optimizer=hp.optimizer, lr=hp.lr,
                                 batch_size=hp.batch_size, seed=self.settings.seed * 100_003 + round_number,
                                 on_batch=self._on_batch)
        except TrainingDivergedError as exc:
            self._skip_round(round_number, str(exc))
            return
        local_metrics = evaluate(self.model, self.data.test_x, self.data.test_y, self.task.kind,
                                 on_batch=self._on_batch)
        metrics = {"train_loss": result.train_loss, "train_seconds": result.seconds,
                   **{f"test_{k}": v for k, v in local_metrics.items()},
                   **{f"global_test_{k}": v for k, v in global_metrics.items()}}
        unusable = sorted(k for k, v in metrics.items() if not (math.isfinite(v) and abs(v) <= envelope.METRIC_LIMIT))
        if unusable or not all(torch.isfinite(t).all() for t in self.model.state_dict().values()
                               if t.is_floating_point()):
            # A global model broken before it reached us (or our own blow-up): the coordinator
            # would refuse such an update for ever; skip and wait for the next or a restored model.
            self._skip_round(round_number, "non-finite weights or metrics beyond "
                             f"{envelope.METRIC_LIMIT:g}: {', '.join(f'{k}={metrics[k]:g}' for k in unusable)}")
            return
        # What we changed, against the model we trained from (named by its hash): update envelope v2.
        change = deltas.delta(self.model.state_dict(), weights)
        payload = envelope.seal_update(self.bundle, round_number, encode_tensors(change), result.num_samples,
                                       metrics, dataset_sha256=self.dataset.sha256, base_sha256=header.model_sha256)
        self.outbox.put(round_number, payload)  # durable before it is sent
        self.trained_rounds.append(round_number)
        self.events.trained(round_number, result.seconds, result.num_samples, result.train_loss)
        self.last_trained_round = round_number
        atomic_write(self._last_round_file, str(round_number).encode())  # fsynced: survives a power cut
        log.info("round %d: trained on %d samples in %.1fs, loss %.4f, %s", round_number, result.num_samples,
                 result.seconds, result.train_loss,
                 ", ".join(f"{k} {v:.4f}" for k, v in local_metrics.items()))
        self._send(round_number, payload)

    def _skip_round(self, round_number: int, why: str) -> None:
        """Training diverged: send nothing for this round, never retry it (no crash loop), and
        wait for the next global model (a later round, or one an operator restored)."""
        self.skipped_rounds.append(round_number)
        self.last_trained_round = round_number
        atomic_write(self._last_round_file, str(round_number).encode())
        log.error("round %d: training diverged (%s); skipping this round and waiting for the next global model",
                  round_number, why)

    def _on_batch(self) -> None:
        self._alive()
        if self._stop():
            raise TrainingStopped()

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

    def _drop_closed_rounds(self, open_round: int) -> None:
        """Remove updates for rounds that have closed. One the coordinator did not count is
        reported with its reason; if that verdict has not arrived yet, it is awaited."""
        for closed in [r for r in self.outbox.rounds() if r < open_round]:
            payload = self.outbox.get(closed)
            verdict = self._verdict(closed, payload) if payload is not None else None
            self.outbox.remove(closed)
            if verdict == ACCEPTED:
                log.info("round %d closed; the coordinator counted our update", closed)
            elif verdict is not None:
                self._tell_not_counted(closed, verdict)
            elif closed in self._outbox_msg_ids:
                self._awaiting_verdict[self._outbox_msg_ids[closed]] = closed
                while len(self._awaiting_verdict) > MAX_AWAITED_VERDICTS:  # a coordinator that never answers
                    del self._awaiting_verdict[next(iter(self._awaiting_verdict))]
                log.info("round %d closed before the coordinator acknowledged our update; waiting for its verdict",
                         closed)
            else:  # gone or unreadable (a damaged outbox file): nothing to wait for
                log.warning("dropped our update for round %d from the outbox: its round has closed and the entry "
                            "is unreadable", closed)
            self._outbox_msg_ids.pop(closed, None)

    def _explain_late_verdicts(self) -> None:
        for msg_id, closed in list(self._awaiting_verdict.items()):
            entry = self.ack.get("updates", {}).get(msg_id) if self.ack else None
            verdict = entry.get("verdict") if isinstance(entry, dict) else None
            if isinstance(verdict, str):
                del self._awaiting_verdict[msg_id]
                if verdict == ACCEPTED:
                    log.info("round %d: the coordinator counted our update", closed)
                else:
                    self._tell_not_counted(closed, verdict)

    def _tell_not_counted(self, round_number: int, verdict: str) -> None:
        log.warning("round %d: the coordinator did not count our update: %s (%s)", round_number, verdict,
                    EXPLANATIONS.get(verdict, "see the coordinator's log"))

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

    def run(self, stop: Callable[[], bool] = lambda: False, alive: Callable[[], None] = lambda: None) -> None:
        """Step until ``stop()`` (checked between mini-batches too) or, with exit_when_done, the end of
        training. ``alive`` is called from this loop, also during training (systemd's watchdog)."""
        self._stop, self._alive = stop, alive
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
                alive()
                self.step()
                if self.done and self.settings.exit_when_done:
                    return
        except TrainingStopped:
            log.info("stopped during local training; the round is trained again after a restart")
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
