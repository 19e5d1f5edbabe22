"""The coordinator's core: checks updates, runs rounds, writes the ledger, publishes models.

No network here: messages come in through :meth:`Coordinator.handle_updates`, and everything
the coordinator sends goes out through its :class:`coordinator.publisher.Publisher`, built on
the ``publish(topic, payload, retain)`` callable it is given; the clock is passed in too. The
MQTT daemon (``coordinator.daemon``) is a thin loop around this class, and tests drive it
directly.

Order of durable writes (each is the commit point of the step before it; the
:class:`coordinator.writer.LedgerWriter` owns the first two):
accept updates:    the batch's spool files (fsync) -> their ledger "update" blocks (one fsync)
                   -> running sum in memory -> acknowledgements (never before the fsync).
close a round:     model file for round R+1 (fsync) -> ledger "aggregate" block -> publish.
A restart rebuilds the open round from the ledger's fold (``ledger.state``, the
:class:`federation.fleet_state.FleetState` every reader of the chain uses) and the spool.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from coordinator import restore
from coordinator.acks import AckPublisher, DeviceAcks
from coordinator.admission import Admission, sane
from coordinator.aggregation import DEFAULT_STRATEGY, Strategy, StrategyParams, make_strategy
from coordinator.gateway import Gateway, SendUpstream, awaits_upstream
from coordinator.intake import UpdateIntake, scaled
from coordinator.presence import PresenceBook
from coordinator.publisher import Publish, Publisher
from coordinator.restore import RestoreError, RestoreRequest
from coordinator.rounds import Accepted, BufferState, RoundPolicy, RoundState
from coordinator.status import StatusPublisher, fleet_status
from coordinator.stopping import StopTarget
from coordinator.storage import ModelFileError, ModelStore, Spool, StorageError
from coordinator.writer import LedgerLike, LedgerWriter
from federation import deltas, envelope, records
from federation.codec import (
    CodecError,
    TensorDict,
    TensorSpec,
    decode_tensors,
    encode_tensors,
    spec_of,
)
from federation.envelope import EnvelopeError
from federation.fleet_state import FleetState
from federation.keys import CoordinatorKeys, DeviceRegistry, KeyFileError
from federation.topics import Topics
from federation.verdicts import ACCEPTED

log = logging.getLogger(__name__)

Evaluate = Callable[[TensorDict], dict[str, float]]


@dataclass(frozen=True)
class CoordinatorSettings:
    fleet: str
    policy: RoundPolicy
    strategy: str = DEFAULT_STRATEGY
    strategy_params: StrategyParams = StrategyParams()
    max_rounds: int = 0  # 0: run until stopped
    stop_at: StopTarget | None = None  # or stop once a round's aggregate metrics reach this
    max_update_bytes: int = 64 * 1024 * 1024
    keep_models: int = 10  # model files kept besides restore targets (0: all)
    heartbeat_s: float = 0.0  # how often the daemon republishes the status (0: only on changes)
    mode: str = "rounds"  # or "async": FedBuff (coordinator.rounds.BufferState)
    max_staleness: int = 4  # async: versions an update's base may be behind the current model


@dataclass(frozen=True)
class Outcome:
    accepted: bool
    reason: str
    device: str | None = None
    round: int | None = None


class Coordinator:
    def __init__(
        self, settings: CoordinatorSettings, keys: CoordinatorKeys, registry: DeviceRegistry,
        ledger: LedgerLike, models: ModelStore, spool: Spool, *, initial_model: Callable[[], TensorDict],
        publish: Publish, topics: Topics, evaluate: Evaluate | None = None,
        now: Callable[[], float] = time.time, task_info: dict[str, Any] | None = None,
        publisher: Publisher | None = None, send_upstream: SendUpstream | None = None,
    ) -> None:
        self.settings = settings
        self.keys = keys
        self.registry = registry
        self.ledger = ledger
        self.admission = Admission(settings.fleet, keys, topics, max_update_bytes=settings.max_update_bytes)
        self.publisher = publisher or Publisher(publish, topics, keys)
        self.writer = LedgerWriter(ledger, spool, models, announce=self.publisher.blocks)
        self.topics = topics
        self._initial_model = initial_model
        self._evaluate = evaluate
        self._now = now
        self.task_info = task_info or {}
        self.rejections: Counter[str] = Counter()
        self.accepted_total = 0
        self.round: RoundState | None = None
        self.train_seconds: dict[str, float] = {}  # device -> its latest reported training time (adaptive deadline)
        self.global_model: TensorDict = {}
        self.spec: TensorSpec = {}
        self.model_message = b""
        self.done = False
        self.stopped = False  # set by the daemon when it leaves: the status then says no one runs
        self.session = os.urandom(8).hex()  # tells this process's status from another coordinator's
        self._strategy: Strategy | None = None
        self.history: list[dict[str, Any]] = []
        self.presence = PresenceBook(now)
        self.presence_rejections: Counter[str] = Counter()
        self.acks = DeviceAcks(settings.fleet)
        self.ack_publisher = AckPublisher(self.acks, self.publisher.ack, now, self._open_round_number)
        self.status_publisher = StatusPublisher(self.status, self.publisher.status, now)
        # A gateway (--upstream): each round's aggregated delta goes upstream as one update, and
        # the next round trains from the model the upstream coordinator publishes next.
        self.gateway = Gateway(self, send_upstream, now) if send_upstream is not None else None
        self.intake = UpdateIntake(self)  # batched update ingest; owns the admission threads

    def close(self) -> None:
        """Release what this coordinator holds outside its state (its threads: admission, and
        the spool's and model store's file system waits)."""
        self.intake.close()
        self.spool.close()
        self.models.close()

    @property
    def awaiting_upstream(self) -> bool:
        """A gateway between its round's aggregate and the upstream's next model."""
        return self.gateway is not None and self.gateway.awaiting

    @property
    def strategy(self) -> Strategy | None:
        """The open round's (or buffer's) aggregation strategy."""
        return self._strategy

    # -- the parts' state ------------------------------------------------------------------------
    # The writer owns the spool, the model files and the ledger; these are its.
    @property
    def spool(self) -> Spool:
        return self.writer.spool

    @spool.setter
    def spool(self, spool: Spool) -> None:
        self.writer.spool = spool

    @property
    def models(self) -> ModelStore:
        return self.writer.models

    @property
    def halted(self) -> str | None:
        """Why nothing is accepted any more (storage failed, a round could not close), or None."""
        return self.writer.halted

    @halted.setter
    def halted(self, reason: str | None) -> None:
        self.writer.halted = reason

    # -- what the ledger says (its fold, kept current by every append) -------------------------
    @property
    def fleet_state(self) -> FleetState:
        return self.ledger.state

    @property
    def datasets(self) -> dict[str, bytes]:
        """Device -> SHA-256 of the data set it registered."""
        return {device: r.sha256 for device, r in self.fleet_state.datasets.items()}

    @property
    def keep_model_rounds(self) -> set[int]:
        """Rounds whose model file is never pruned: restore sources and results the ledger names."""
        return self.fleet_state.restored_rounds

    # -- start-up and recovery ------------------------------------------------------------------
    def start(self, pending_restore: RestoreRequest | None = None) -> None:
        """Load or initialise the global model and rebuild the open round from the ledger.

        ``pending_restore``: the restore request waiting in the state directory, if any. One left
        by `fledger ledger restore` names the open round's accepted updates that were lost with
        the spool: the round starts without them, to be run again when the request is applied."""
        self.spool.check_writable()
        fleet = self.fleet_state
        self._genesis: bytes = fleet.genesis_hash  # named in every model: agents pin the chain they follow
        self._record_keys(self.registry)
        for device, registration in fleet.datasets.items():
            self.acks.registered(device, registration.sha256)
        if fleet.model_block is None:
            round_number = 1
            model = self._initial_model()
            model_bytes = encode_tensors(model)
            self.writer.new_model(round_number, model, records.model_published(
                round_number, hashlib.sha256(model_bytes).digest(), initial=True, task=self.task_info))
            log.info("initialised global model for round 1 (%d tensors)", len(model))
        else:
            round_number = fleet.model_round or 1
            try:
                loaded = self.models.load(round_number)
            except ModelFileError as exc:
                raise StorageError(5, str(exc)) from None
            if loaded is None:
                raise StorageError(2, f"ledger names the model for round {round_number} but "
                                      f"{self.models.path(round_number)} is missing")
            model = loaded
            digest = hashlib.sha256(encode_tensors(model)).digest()
            if digest != fleet.model_block.data["model_sha256"]:
                raise StorageError(5, f"{self.models.path(round_number)} does not match the ledger's model hash")
            log.info("resumed at round %d from %s", round_number, self.models.path(round_number))
        last_model_block = fleet.model_block
        assert last_model_block is not None
        self.global_model = model
        self.spec = spec_of(model)
        self._model_block = last_model_block
        stop_at = self.settings.stop_at
        if stop_at is not None and last_model_block.data.get("type") == "aggregate" and \
                stop_at.reached(last_model_block.data.get("metrics", {})):
            self.done = True  # the run had reached its target before this restart
        info = fleet.rounds.get(round_number)
        opened_at = info.opened_at if info is not None else None
        if self.gateway is not None:  # stopped after its aggregate, it still waits for the upstream's model
            self.gateway.awaiting = awaits_upstream(fleet, round_number, done=self.done)
        self.open_round(round_number, announce=opened_at is None and not self.awaiting_upstream)
        if opened_at is not None and self.round is not None:
            self.round.opened_at = opened_at  # a restart does not extend the deadline
        # Re-add this round's already accepted updates (their envelopes are in the spool).
        lost = pending_restore.lost_in(round_number) if pending_restore is not None else frozenset()
        skipped = False
        for record in (info.updates if info is not None else []):
            if str(record["device"]) in lost and self.spool.get(round_number, str(record["device"])) is None:
                log.warning("accepted update of %s for round %d was lost with the state directory; the round runs "
                            "again as round %d (restore request)", record["device"], round_number, round_number + 1)
                skipped = True
                continue
            self._restore_accepted(record)
        for device in sorted(self.round.accepted if self.round else ()):
            self.publish_ack(device)  # a crash may have come before the acknowledgement went out
        if self.settings.max_rounds and round_number > self.settings.max_rounds:
            self.done = True
        dropped = self.spool.drop_before(round_number)
        if dropped:
            log.info("removed the spools of closed rounds %s (a crash interrupted their removal)", dropped)
        if self.awaiting_upstream:
            log.info("gateway: round %d waits for the upstream's next model", round_number)
        else:
            self.publish_model()
            if round_number not in fleet.published_rounds:  # a crash came between the aggregate and this record
                self._append(records.model_published(round_number, last_model_block.data["model_sha256"]))
        self.publish_status()
        if not skipped:  # else the restore request abandons this round: it must not close short of them
            self.maybe_close_round()

    def _record_keys(self, registry: DeviceRegistry) -> None:
        """Record in the ledger every device key the registry knows and every revocation, once:
        anyone verifying the chain then checks device signatures with keys from the chain itself.
        A revocation in the ledger is final: it is applied to ``registry`` whatever its file says.
        A registry the ledger would refuse raises KeyFileError before anything is appended."""
        fleet = self.fleet_state
        owner_in_ledger = {key_id: device for key_id, (device, _) in fleet.device_keys.items()}
        for device, record in registry.devices.items():
            for key_id in record.keys:
                if owner_in_ledger.get(key_id, device) != device:
                    raise KeyFileError(f"key {key_id} of {device} is registered in the ledger to "
                                       f"{owner_in_ledger[key_id]}: a key belongs to one device")
            for key_id in record.revoked:
                if key_id not in record.keys:
                    raise KeyFileError(f"{device} revokes key {key_id}, which it does not list")
        for device, record in sorted(registry.devices.items()):
            for key_id, public_key in sorted(record.keys.items()):
                if owner_in_ledger.get(key_id) != device:
                    self._append(records.device_key(device, public_key))
                    owner_in_ledger[key_id] = device
                    log.info("registered key %s of device %s in the ledger", key_id, device)
            for key_id in sorted(record.revoked):
                if key_id not in fleet.revoked:
                    self._append(records.device_key_revoked(device, key_id, "revoked by the operator"))
                    log.info("recorded revocation of key %s of device %s", key_id, device)
        for key_id in fleet.revoked:
            device = fleet.device_keys[key_id][0]
            entry = registry.devices.get(device)
            if entry is not None and key_id in entry.keys and key_id not in entry.revoked:
                entry.revoked.add(key_id)
                log.warning("key %s of device %s is revoked in the ledger; the registry file lists it as "
                            "active, it stays revoked", key_id, device)

    def reload_registry(self, registry: DeviceRegistry) -> None:
        """Adopt a changed device registry (devices added, keys rotated or revoked) while running.

        The ledger records come first: if appending fails, the old registry stays in force, so
        no update is ever accepted under a key the ledger does not hold."""
        self._record_keys(registry)
        before = {(d, k) for d, r in self.registry.devices.items() for k in r.keys if k not in r.revoked}
        after = {(d, k) for d, r in registry.devices.items() for k in r.keys if k not in r.revoked}
        self.registry = registry
        log.info("device registry reloaded: %d active keys (%d new, %d no longer active)",
                 len(after), len(after - before), len(before - after))

    def _restore_accepted(self, record: dict[str, Any]) -> None:
        assert self.round is not None and self._strategy is not None
        device = str(record["device"])
        raw = self.spool.get(self.round.number, device)
        if raw is None:
            raise StorageError(2, f"update of {device} for round {self.round.number} is in the ledger but "
                                  "missing from the spool")
        try:
            sealed = envelope.parse_update(raw, max_bytes=self.settings.max_update_bytes)
            if sealed.header_bytes != record["statement"]:
                raise StorageError(5, f"spooled update of {device} for round {self.round.number} is not the one "
                                      "the ledger records")
            weights = decode_tensors(envelope.decrypt_update(sealed, self.keys))
        except (EnvelopeError, CodecError) as exc:  # checked when accepted: the spool was damaged since
            raise StorageError(5, f"spooled update of {device} for round {self.round.number} is damaged in the "
                                  f"spool ({self.spool.directory}): {exc}") from None
        if sealed.version == 1:  # accepted by the coordinator before the upgrade: full weights
            weights = deltas.delta(weights, self.global_model)
        if "weight" in record:  # asynchronous mode: down-weighted by its staleness, as when accepted
            weights = scaled(weights, float(record["weight"]))
        self._strategy.add(weights, sealed.header.num_samples, device)
        self.round.accept(Accepted(device, sealed.header.msg_id, sealed.header.weights_sha256,
                                   sealed.header.num_samples, sealed.header.metrics))
        self.acks.verdict(device, self.round.number, sealed.header.msg_id, ACCEPTED)
        log.info("restored accepted update of %s for round %d", device, self.round.number)

    def _open_round_number(self) -> int:
        assert self.round is not None
        return self.round.number

    def open_round(self, number: int, *, announce: bool) -> None:
        """Open round ``number`` (adaptive deadline, a fresh strategy); ``announce``: record its
        round.opened (not for a round that waits for a model: the model's record comes first)."""
        policy = self.settings.policy
        deadline = policy.deadline_for(self.train_seconds.values())
        if deadline != policy.deadline_s:
            log.info("round %d stays open %.1fs: adapted to the devices' reported training times", number, deadline)
            policy = dataclasses.replace(policy, deadline_s=deadline)
        self.round = BufferState(number, self._now(), policy, max_staleness=self.settings.max_staleness) \
            if self.settings.mode == "async" else RoundState(number, self._now(), policy)
        # The strategy gets deltas (no reference model: robust strategies measure each delta's
        # norm) and keeps the round's updates in a file beside the spool (read back with pread).
        self._strategy = make_strategy(self.settings.strategy, self.settings.strategy_params,
                                       global_model=None, workdir=self.spool.directory)
        # A new round's round.opened record starts the per-round caps over (in the fold).
        if announce and not self.done and not (self.settings.max_rounds and number > self.settings.max_rounds):
            self._append(records.round_opened(number), sign=False)  # signed by its group's last block

    # -- ledger and publishing ------------------------------------------------------------------
    def _append(self, data: dict[str, Any], *, sign: bool = True) -> Any:
        return self.writer.append(data, sign=sign)

    def install_model(self, model: TensorDict, block: Any) -> None:
        """``model`` (recorded in the durable ``block``) is the global model from now on."""
        self.global_model = model
        self._model_block = block

    def announce_block(self, block: Any) -> None:
        """Tell the ledger's followers about a durable block (for every block, whoever appended it)."""
        self.writer.announce([block])

    def publish_model(self) -> None:
        assert self.round is not None
        if self.awaiting_upstream:
            # A gateway between its aggregate and the upstream's next model: the open round has no
            # model yet; the last one published stays the devices' (again, e.g. after a reconnect).
            if self.model_message:
                self.publisher.model(self.model_message)
            return
        weights = encode_tensors(self.global_model)
        self.model_message = envelope.seal_model(
            self.keys, self.round.number, weights, block=self._model_block.to_bytes(), done=self.done,
            info={**self.task_info, "genesis": self._genesis.hex()}, now=self._now(),
        )
        self.publisher.model(self.model_message)

    def status(self) -> dict[str, Any]:
        """The fleet status body now (:func:`coordinator.status.fleet_status`)."""
        assert self.round is not None
        head = self.ledger.head
        return fleet_status(
            fleet=self.settings.fleet, round_state=self.round, halted=self.halted, done=self.done,
            stopped=self.stopped, session=self.session, heartbeat_s=self.settings.heartbeat_s,
            min_clients=self.settings.policy.min_clients, height=head.index + 1, head=head.hash,
            rejections=self.rejections, accepted_total=self.accepted_total, presence=self.presence.states(),
            presence_rejections=self.presence_rejections, datasets=self.datasets.items(), now=self._now())

    def handle_presence(self, topic: str, payload: bytes) -> bool:
        """A device's signed heartbeat or Last Will. True when the status should be republished."""
        device = self.topics.device_of(topic)
        try:
            statement = envelope.open_presence(payload, self.registry.public_key, fleet=self.settings.fleet)
            if statement.device != device:
                raise EnvelopeError("topic_mismatch", f"presence of {statement.device!r} on {topic}")
        except EnvelopeError as exc:
            self.presence_rejections[exc.reason] += 1
            log.warning("ignored presence message on %s: %s: %s", topic, exc.reason, exc)
            return False
        outcome = self.presence.note(statement)
        if outcome in ("stale_session", "replay"):
            self.presence_rejections[outcome] += 1
            log.warning("ignored presence of %s: %s", device, outcome)
        return outcome == "changed"

    def publish_status(self) -> None:
        """The signed fleet status, now (round opened or closed, halt, heartbeat, reconnect)."""
        self.status_publisher.publish()

    def status_changed(self) -> None:
        """Something the status shows changed: republished at most every STATUS_INTERVAL_S."""
        self.status_publisher.changed()

    def publish_status_if_due(self) -> bool:
        """Publish a changed status if it is due (the daemon calls this after every message and
        timer). True if it published."""
        return self.status_publisher.publish_if_due()

    def publish_ack(self, device: str) -> None:
        """Tell one device (retained, signed) what the coordinator knows of it."""
        self.ack_publisher.publish(device)

    def publish_acks(self) -> None:
        """Every known device's acknowledgement again (after a reconnect)."""
        self.ack_publisher.publish_all()

    def publish_retained(self) -> None:
        """Everything the broker retains for the fleet from us, again: the model, the status and
        every device's acknowledgement (after a reconnect: the broker may have lost them; or when
        another process published over them)."""
        self.publish_model()
        self.publish_status()
        self.publish_acks()

    def ack_verdict(self, device: str, round_number: int, msg_id: bytes, verdict: str) -> None:
        self.ack_publisher.verdict(device, round_number, msg_id, verdict)

    # -- updates ----------------------------------------------------------------------------------
    def reject(self, reason: str, detail: str, *, device: str | None = None, round_number: int | None = None,
                msg_id: bytes | None = None, payload: bytes = b"", record: bool = False) -> Outcome:
        self.rejections[reason] += 1
        log.warning("rejected update from %s (round %s): %s: %s", device or "?", round_number, reason, detail)
        if (record and device is not None and not self.halted
                and Admission.may_record_rejection(self.fleet_state, device, msg_id)):
            # Only authenticated senders reach the ledger; forged junk is counted, never recorded.
            self._append(records.update_rejected(device, round_number, reason, hashlib.sha256(payload).digest(),
                                                 msg_id=msg_id))
        return Outcome(False, reason, device, round_number)

    def handle_update(self, topic: str, payload: bytes) -> Outcome:
        """Check one update message end to end; accept it into the open round or reject it.

        Never raises for bad input: every failure becomes a counted rejection."""
        return self.handle_updates([(topic, payload)])[0]

    def handle_updates(self, messages: Sequence[tuple[str, bytes]]) -> list[Outcome]:
        """Update messages already waiting, in arrival order: one Outcome each (see
        :meth:`coordinator.intake.UpdateIntake.handle_updates`). Never raises for bad input."""
        return self.intake.handle_updates(messages)

    def handle_registration(self, topic: str, payload: bytes) -> Outcome:
        """A device's signed dataset registration: recorded in the ledger once per new digest.

        Never raises for bad input: every failure becomes a counted rejection."""
        try:
            return self._handle_registration(topic, payload)
        except Exception as exc:
            log.exception("unexpected error while checking a registration")
            return self.reject("internal_error", f"{type(exc).__name__}: {exc}")

    def _handle_registration(self, topic: str, payload: bytes) -> Outcome:
        verdict = self.admission.registration(topic, payload, registry=self.registry)
        if verdict.statement is None:
            return self.reject(verdict.reason, verdict.detail, device=verdict.device)
        if self.halted:
            return self.reject("halted", self.halted)
        statement = verdict.statement
        verdict = self.admission.registration_news(statement, registry=self.registry, state=self.fleet_state,
                                                   now=self._now())
        if verdict.reason == "already_registered":
            self.ack_publisher.repeat(statement.device)  # a resend: the device has not seen our acknowledgement
            return Outcome(True, "already_registered", statement.device)
        if verdict.reason != "register":
            return self.reject(verdict.reason, verdict.detail, device=statement.device)
        try:
            self._append(records.dataset(statement.device, statement.sha256, statement.size, statement.schema,
                                         key_id=statement.key_id, statement=statement.statement,
                                         device_sig=statement.signature))
        except StorageError as exc:
            self.halted = str(exc)
            return self.reject("storage_error", str(exc))
        self.acks.registered(statement.device, statement.sha256)
        self.publish_ack(statement.device)
        log.info("device %s registered data set %s (%d bytes, %s)", statement.device, statement.sha256.hex()[:16],
                 statement.size, statement.schema.get("task"))
        self.status_changed()
        return Outcome(True, "registered", statement.device)

    # -- closing a round --------------------------------------------------------------------------
    def maybe_close_round(self) -> bool:
        """Aggregate if the open round is ready (enough updates, or deadline with quorum)."""
        assert self.round is not None and self._strategy is not None
        if self.done or self.halted or self.awaiting_upstream:
            return False
        now = self._now()
        if not self.round.ready(now):
            return False  # below min_clients, or past the deadline below quorum: the status says
        try:
            self._close_round()
        except StorageError as exc:
            self.halted = str(exc)
            log.critical("cannot persist round %d: %s; no longer accepting updates", self.round.number, exc)
            self.publish_status()
            return False
        except Exception as exc:  # e.g. a non-finite aggregate: stop, never publish a broken model
            self.halted = f"cannot close round {self.round.number}: {type(exc).__name__}: {exc}"
            log.exception("%s; no longer accepting updates", self.halted)
            self.publish_status()
            return False
        return True

    def _close_round(self) -> None:
        assert self.round is not None and self._strategy is not None
        state = self.round
        change = self._strategy.result()
        new_model = deltas.apply_delta(self.global_model, change)
        model_bytes = encode_tensors(new_model)
        next_round = state.number + 1
        eval_metrics = self._evaluation(state.number, new_model)
        train = state.train_summary()
        decisions = self._strategy.decisions
        excluded = {d: why for d, why in decisions.items() if why.get("action") == "excluded"}
        clipped = {d: why for d, why in decisions.items() if why.get("action") == "clipped"}
        for device, why in sorted(decisions.items()):
            log.warning("round %d: update of %s %s (%s)", state.number, device, why.get("action"),
                        ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                  for k, v in why.items() if k != "action"))
        # clients_*: sample-weighted means of what the devices reported; test_*: central evaluation.
        # participants = accepted minus excluded; the Merkle root is over all of this round's
        # accepted updates (excluded ones too: they were accepted, then left out).
        metrics = {**{f"clients_{k}": v for k, v in train.items()}, **{f"test_{k}": v for k, v in eval_metrics.items()}}
        stop_at = self.settings.stop_at
        reached = stop_at is not None and stop_at.reached(metrics)
        ending: dict[str, Any] = {"stop_target": str(stop_at)} if reached else {}  # the run ends with this model
        if isinstance(state, BufferState):  # what was aggregated, how stale, with which weight
            buffered = self.fleet_state.rounds[state.number].updates
            ending.update(mode="async", staleness={u["device"]: u["staleness"] for u in buffered},
                          weights={u["device"]: u["weight"] for u in buffered}, max_staleness=state.max_staleness)
        # One commit group (one fsync) for the round's three records; the aggregate keeps its own
        # signature because it travels alone, inside the model message. The round's spool goes
        # once the group is durable.
        with self.writer.group_commit() as committed:
            block = self.writer.new_model(next_round, new_model, records.aggregate(
                state.number, sorted(set(state.accepted) - set(excluded)), hashlib.sha256(model_bytes).digest(),
                self._strategy.name, metrics,
                num_samples=sum(u.num_samples for d, u in state.accepted.items() if d not in excluded),
                excluded=_finite(excluded), clipped=_finite(clipped), strategy_params=self._strategy.parameters(),
                merkle_root=self.fleet_state.merkle_root_for(state.number), **ending,
            ), closes=state.number)
            if (self.settings.max_rounds and next_round > self.settings.max_rounds) or reached:
                self.done = True
            if self.gateway is not None and not self.done:
                # A gateway: the next round opens with the upstream's next model (Gateway.adopt).
                self.gateway.awaiting = True
                self.open_round(next_round, announce=False)
            else:
                self.install_model(new_model, block)
                self.open_round(next_round, announce=True)
                self._append(records.model_published(next_round, block.data["model_sha256"]), sign=False)
        # Durable from here: publish the model, then the blocks.
        self.history.append(block.data)
        log.info("round %d aggregated from %s -> block %d %s", state.number, sorted(state.accepted),
                 block.index, block.hash.hex()[:16])
        if reached and stop_at is not None:
            log.info("round %d: target %s reached (%s %.6g); training done", state.number, stop_at, stop_at.metric,
                     metrics[stop_at.metric])
        if self.gateway is not None and self.gateway.awaiting:
            self.gateway.send(change, block.data["num_samples"], train)
        else:
            self.publish_model()
        self.writer.announce(committed)
        self.publish_status()
        pruned = self.models.prune(self.settings.keep_models, self.keep_model_rounds)  # after: not on the model's way
        if pruned:
            log.info("removed the model files of rounds %s (keeping the last %d; the ledger keeps their hashes)",
                     pruned, self.settings.keep_models)

    def adopt_upstream_model(self, model: TensorDict, upstream: dict[str, Any], *,
                             replace_open_round: bool = False) -> bool:
        """A gateway's next model, from its upstream (:meth:`coordinator.gateway.Gateway.adopt`).
        False if no round waits for one, or this coordinator is no gateway."""
        if self.gateway is None:
            return False
        return self.gateway.adopt(model, upstream, replace_open_round=replace_open_round)

    def _evaluation(self, round_number: int, model: TensorDict) -> dict[str, float | None]:
        """Central evaluation is informative: whatever it gives (a diverged model's Inf or NaN,
        an exception), the round closes. Unusable values are recorded as None, because the ledger
        takes only finite numbers and a refused aggregate would halt the fleet for good."""
        if self._evaluate is None:
            return {}
        try:
            metrics = self._evaluate(model)
        except Exception:
            log.exception("evaluating the model of round %d failed; recorded without test metrics", round_number)
            return {}
        out: dict[str, float | None] = {}
        for name, value in metrics.items():
            if isinstance(value, (int, float)) and sane(float(value)):
                out[name] = float(value)
            else:
                log.warning("round %d: central evaluation gave %s=%r (diverged model?); recorded as None",
                            round_number, name, value)
                out[name] = None
        return out

    # -- undoing a round ------------------------------------------------------------------------
    def restore_model(self, round_to_restore: int, reason: str, *, request_id: str = "") -> Any:
        """Republish the ledger-recorded global model of an earlier round as the next round.

        The open round is abandoned (its accepted updates are in the ledger, never aggregated);
        the restored model opens round N+1 with a signed ``model.published`` record naming the
        round it restores, so agents, which only follow higher rounds, take it. Returns that
        block, or None if ``request_id`` was applied already. Raises RestoreError if the ledger
        has no such model or the saved file is not it."""
        assert self.round is not None
        if self.halted:
            raise RestoreError(f"the coordinator is halted ({self.halted}); fix that first")
        fleet = self.fleet_state
        if request_id and request_id in fleet.applied_restores:
            return None  # applied before a crash removed the request file
        if round_to_restore > self.round.number:
            raise RestoreError(f"round {round_to_restore} is not before the open round {self.round.number}")
        model, digest = restore.checked_model(self.models, fleet.published_models, round_to_restore)
        abandoned, new_round = self.round.number, self.round.number + 1
        # The record keeps both model files (keep_model_rounds) and closes the abandoned round.
        block = self.writer.new_model(new_round, model, records.model_published(
            new_round, digest, restores=round_to_restore, abandoned_round=abandoned, reason=reason,
            **({"request_id": request_id} if request_id else {})), closes=abandoned)
        self.install_model(model, block)
        log.warning("restored the global model of round %d as round %d (round %d abandoned): %s -> block %d",
                    round_to_restore, new_round, abandoned, reason, block.index)
        self.done = bool(self.settings.max_rounds and new_round > self.settings.max_rounds)
        self.open_round(new_round, announce=True)
        self.publish_model()
        self.publish_status()
        return block

    def tick(self) -> None:
        """Called periodically by the daemon: closes a round whose deadline passed."""
        self.maybe_close_round()




def _finite(decisions: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Decisions as the ledger takes them: floats finite (an unbounded value becomes None)."""
    return {device: {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in why.items()}
            for device, why in decisions.items()}
