"""Update intake: one job, a batch of update messages from arrival to acknowledgement.

Admission (:class:`coordinator.admission.Admission`) gives each message a pure verdict, computed
side by side on a pool this object owns; the accepted ones of a batch become durable together
(:meth:`coordinator.writer.LedgerWriter.accept_updates`: spool files, then one ledger commit
group); only then are they added to the open round and the strategy, acknowledged and announced.
The :class:`coordinator.service.Coordinator` owns the state this reads (the open round, the
fold, the registry) and delegates ``handle_updates`` here.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from coordinator.admission import Opened, UpdateVerdict, sane
from coordinator.rounds import Accepted, BufferState
from coordinator.storage import StorageError
from federation import records
from federation.codec import TensorDict
from federation.verdicts import ACCEPTED

if TYPE_CHECKING:
    from coordinator.service import Coordinator, Outcome

log = logging.getLogger(__name__)

ADMISSION_THREADS = 2  # verdicts of a batch computed side by side (2-2.5x for 424 KB updates on 2 cores)
MAX_AHEAD = 1024  # messages opened ahead and not yet judged (a bound, never reached by the daemon's use)


class UpdateIntake:
    """Batched update ingest for one coordinator; :meth:`close` ends its admission threads."""

    def __init__(self, coordinator: Coordinator, *, threads: int = ADMISSION_THREADS) -> None:
        self._coordinator = coordinator
        self._threads = threads
        self._pool: ThreadPoolExecutor | None = None  # created by the first batch of two or more
        # Update messages being opened ahead (Admission.open_ahead), by id of their payload.
        self._ahead: dict[int, tuple[bytes, Future[Opened]]] = {}

    def close(self) -> None:
        """Shut the admission pool down (idempotent; a later batch would create a new one)."""
        self._ahead.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def open_ahead(self, messages: Sequence[tuple[str, bytes]]) -> None:
        """Start the costly part of these update messages' verdicts (parse, signature, decryption,
        tensors: :meth:`Admission.open_ahead`) on the admission threads, to be used when they are
        handed to :meth:`handle_updates`: the daemon opens the next batch while this one is made
        durable. Decides nothing; a message never handed in is forgotten at :data:`MAX_AHEAD`.
        Only a device's first message here is opened: its later ones are judged after the first
        one's record (duplicate_in_round, before any decryption, once it is accepted), so opening
        them ahead would let one device have a whole batch decrypted and held for nothing."""
        c = self._coordinator
        if self._threads < 2 or c.halted or c.round is None:
            return
        if len(self._ahead) + len(messages) > MAX_AHEAD:
            self._ahead.clear()
        admission, round_state, state, registry, spec = c.admission, c.round, c.fleet_state, c.registry, c.spec
        pool = self._admission_pool()
        devices: set[str | None] = set()
        for topic, payload in messages:
            device = c.topics.device_of(topic)
            if device in devices:
                continue  # judged whole when due (and after its device's first message)
            devices.add(device)
            self._ahead[id(payload)] = (payload, pool.submit(
                admission.open_ahead, topic, payload, registry=registry, round=round_state, state=state, spec=spec))

    def _admission_pool(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self._threads, thread_name_prefix="admission")
        return self._pool

    def _opened(self, payload: bytes) -> Future[Opened] | None:
        entry = self._ahead.pop(id(payload), None)
        return entry[1] if entry is not None and entry[0] is payload else None

    def handle_updates(self, messages: Sequence[tuple[str, bytes]]) -> list[Outcome]:
        """Update messages already waiting, in arrival order: one Outcome each.

        They are admitted one by one (pure verdicts), and the accepted ones of a batch become
        durable together: their spool files, then their ledger records in one commit group
        (:meth:`LedgerWriter.accept_updates`). Only then are they added to the round, answered
        and announced: no acknowledgement before its fsync. A batch ends early where a device
        comes a second time (its verdict needs the first one's record) and where the round
        becomes ready (the rest may be for the next round); the rest follows in the next batch.
        Never raises for bad input: every failure becomes a counted rejection."""
        outcomes: list[Outcome] = []
        try:
            while len(outcomes) < len(messages):
                outcomes.extend(self._update_batch(messages[len(outcomes):]))
        finally:  # an unexpected error: what was opened ahead of the rest is not kept
            for _, payload in messages[len(outcomes):]:
                self._opened(payload)
        return outcomes

    def _update_batch(self, messages: Sequence[tuple[str, bytes]]) -> list[Outcome]:
        from coordinator.service import Outcome

        c = self._coordinator
        assert c.round is not None
        batch: list[tuple[str, bytes]] = []
        devices: set[str] = set()
        for topic, payload in messages:
            device = c.topics.device_of(topic)
            if device is not None and device in devices:
                break  # its verdict depends on the first one's record: next batch
            if device is not None:
                devices.add(device)
            batch.append((topic, payload))
        verdicts = self._verdicts(batch)
        outcomes: list[Outcome | None] = []
        staged: list[tuple[int, UpdateVerdict, bytes]] = []  # (position, accepted verdict, envelope)
        for (topic, payload), verdict in zip(batch, verdicts, strict=True):
            try:
                outcome, accepted = self._act_on_verdict(topic, payload, verdict)
            except StorageError as exc:  # a rejection record could not be written
                c.halted = c.halted or str(exc)
                outcome, accepted = c.reject("storage_error", str(exc)), None
            if accepted is None:
                outcomes.append(outcome)
                continue
            staged.append((len(outcomes), accepted, payload))
            outcomes.append(None)
            if len(c.round.accepted) + len(staged) >= c.settings.policy.min_clients:
                break  # the round may close on this batch: later messages may be for the next round
        try:
            self._commit_updates(staged)
        except StorageError as exc:
            c.halted = c.halted or str(exc)
            for position, _, _ in staged:
                outcomes[position] = c.reject("storage_error", str(exc))
            return [o for o in outcomes if o is not None]
        for position, accepted, _ in staged:
            assert accepted.sealed is not None
            outcomes[position] = Outcome(True, "accepted", accepted.sealed.header.device, accepted.sealed.header.round)
        if staged:
            c.maybe_close_round()
        return [o for o in outcomes if o is not None]

    def _verdicts(self, batch: Sequence[tuple[str, bytes]]) -> list[UpdateVerdict | Exception]:
        """Admission's verdicts on a batch, computed side by side (:data:`ADMISSION_THREADS`):
        admission is pure and nothing it reads changes until the batch is acted on, and the
        cryptography (libsodium, pycryptodome, hashlib) releases the GIL. An exception (a bug)
        is returned in its message's place."""
        c = self._coordinator
        assert c.round is not None
        opened = [self._opened(payload) for _, payload in batch]  # forgotten here, whatever happens next
        if c.halted:
            return [RuntimeError("halted")] * len(batch)  # not checked: refused as halted
        admission, round_state, state, registry, spec, done = \
            c.admission, c.round, c.fleet_state, c.registry, c.spec, c.done

        def verdict(message: tuple[str, bytes], ahead: Opened | None = None) -> UpdateVerdict | Exception:
            try:
                return admission.update(message[0], message[1], registry=registry, round=round_state,
                                        state=state, spec=spec, done=done, opened=ahead)
            except Exception as exc:
                return exc

        if (len(batch) < 2 or self._threads < 2) and not any(opened):
            return [verdict(message) for message in batch]
        # Messages not opened ahead get their whole verdict on the admission threads; those opened
        # ahead, only the rest of it here, in order (cheap: what remains are look-ups).
        pool = self._admission_pool()
        whole = {i: pool.submit(verdict, message) for i, (message, ahead) in enumerate(zip(batch, opened, strict=True))
                 if ahead is None}
        out: list[UpdateVerdict | Exception] = []
        for i, (message, ahead) in enumerate(zip(batch, opened, strict=True)):
            if ahead is None:
                out.append(whole[i].result())
                continue
            try:
                done_ahead = ahead.result()
            except Exception as exc:  # a bug in open_ahead: the whole verdict, here
                log.error("opening an update ahead failed", exc_info=exc)
                done_ahead = None
            out.append(verdict(message, done_ahead))
        return out

    def _act_on_verdict(self, topic: str, payload: bytes, verdict: UpdateVerdict | Exception
                        ) -> tuple[Outcome | None, UpdateVerdict | None]:
        """The rejection's Outcome (counted, recorded, answered), or the accepted verdict (not
        yet durable)."""
        c = self._coordinator
        if c.halted:
            return c.reject("halted", c.halted), None
        if isinstance(verdict, Exception):  # a bug must not kill the worker nor touch the model
            log.error("unexpected error while checking an update", exc_info=verdict)
            return c.reject("internal_error", f"{type(verdict).__name__}: {verdict}"), None
        if verdict.sealed is None:  # not authenticated: counted, never recorded nor answered
            return c.reject(verdict.reason, verdict.detail, device=verdict.device, round_number=verdict.round), None
        header = verdict.sealed.header
        seconds = header.metrics.get("train_seconds") if isinstance(header.metrics, dict) else None
        if isinstance(seconds, (int, float)) and sane(float(seconds)):
            c.train_seconds[header.device] = float(seconds)  # also from a late update: it tells the most
        if not verdict.accepted:
            # Only accepted updates' ids are in accepted_msg_ids: a replay's answer is "accepted".
            c.ack_verdict(header.device, header.round, header.msg_id,
                          ACCEPTED if verdict.reason == "replay" else verdict.reason)
            return c.reject(verdict.reason, verdict.detail, device=header.device, round_number=header.round,
                            msg_id=header.msg_id, payload=payload, record=verdict.record), None
        return None, verdict

    def _commit_updates(self, staged: list[tuple[int, UpdateVerdict, bytes]]) -> None:
        """Accepted updates made durable together (spool, then one ledger commit group); then,
        and only then, folded into the round, acknowledged and announced."""
        c = self._coordinator
        strategy = c.strategy
        assert c.round is not None and strategy is not None
        if not staged:
            return
        plans: list[tuple[UpdateVerdict, bytes, TensorDict, dict[str, Any]]] = []
        for _, verdict, payload in staged:
            assert verdict.sealed is not None and verdict.weights is not None
            weights, staleness = verdict.weights, {}
            if isinstance(c.round, BufferState):  # recorded: the buffer (version) it joins, how stale, its weight
                lag = c.round.staleness(verdict.sealed.header.round)
                staleness = {"version": c.round.number, "staleness": lag, "weight": records.staleness_weight(lag)}
                weights = scaled(weights, staleness["weight"])
            plans.append((verdict, payload, weights, staleness))
        for verdict, _, _, _ in plans:  # verified by admission: the ledger's check need not repeat it
            if verdict.sealed is not None and verdict.public_key is not None:
                c.writer.ledger.vouch(verdict.public_key, verdict.sealed.header_bytes, verdict.sealed.signature)
        blocks = c.writer.accept_updates(c.round.number, [
            (v.sealed.header.device, payload, v.sealed.header_bytes, v.sealed.signature, staleness)
            for v, payload, _, staleness in plans if v.sealed is not None])
        for verdict, _, weights, _ in plans:
            assert verdict.sealed is not None
            header = verdict.sealed.header
            strategy.add(weights, header.num_samples, header.device)
            c.round.accept(Accepted(header.device, header.msg_id, header.weights_sha256, header.num_samples,
                                    header.metrics))
            c.accepted_total += 1
            c.ack_verdict(header.device, header.round, header.msg_id, ACCEPTED)
            log.info("accepted update from %s for round %d (%d samples); %d/%d in", header.device, header.round,
                     header.num_samples, len(c.round.accepted), c.settings.policy.min_clients)
        c.writer.announce(blocks)
        c.status_changed()


def scaled(change: TensorDict, weight: float) -> TensorDict:
    """A delta times ``weight`` (FedBuff's staleness weight); integer tensors (counters) unscaled."""
    return {name: (array * weight).astype(array.dtype) if array.dtype.kind == "f" else array
            for name, array in change.items()}
