"""A gateway's side as a device of its upstream coordinator (``--upstream HOST:PORT``).

The gateway holds a device bundle of the upstream fleet. It trains nothing itself: each of its
rounds aggregates its own devices, and the aggregated delta goes upstream as one signed update
(update envelope v2) against the upstream model the round trained from, with the sum of its
devices' sample counts, so that the upstream's FedAvg over gateways equals FedAvg over every
device. The upstream's next model becomes the gateway's next round (``adopt_upstream_model``).

Its "data set", registered upstream like a device's, is a commitment to its devices' own
registrations (SHA-256 of their sorted commitments), so the upstream ledger names what the
gateway's updates stand for. It is registered with each update, as the update names it (the
devices' registrations when the gateway's round closed), and only then: a gateway's devices
may change their data sets any number of times, the upstream sees at most one new registration
per update, i.e. per upstream round, under its cap of 3 (``registration_rate``).

Like an edge agent, the gateway keeps its update (and the registration it names) in an outbox
on disk (``federation/outbox.py``, written before sending) and resends it until the upstream's
acknowledgement gives a verdict or the upstream publishes a newer model (the round closed): a
gateway killed between its send and the upstream's answer resends the same bytes after its
restart, which the upstream counts once. No network here beyond the ``publish`` callable; the
daemon's upstream link feeds :meth:`Upstream.on_message` with what arrives from the upstream broker
(``coordinator/gateway.py``: ``wait_for_upstream_model``, ``serve_upstream``).

An accepted update can still be left out of the upstream's aggregate by its robust strategy:
the aggregate block each upstream model travels with says so and why (``federation.verdicts.
left_out``, as an edge agent reads it). The gateway logs it once per upstream round and hands it
to ``on_left_out`` (the daemon counts it in the coordinator's metrics).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from federation import envelope
from federation.codec import CodecError, TensorDict, decode_tensors, encode_tensors
from federation.envelope import EnvelopeError, ModelHeader, UpdateHeader
from federation.keys import DeviceBundle
from federation.outbox import Outbox
from federation.topics import Topics
from federation.verdicts import ACCEPTED, EXPLANATIONS, FINAL_REASONS, LeftOut, left_out

log = logging.getLogger(__name__)

Publish = Callable[[str, bytes], object]
RESEND_S = 5.0  # an update (and its registration) not yet acknowledged goes again this often


def gateway_dataset(registrations: dict[str, bytes]) -> bytes:
    """What a gateway's updates stand for: SHA-256 over its devices' registered commitments."""
    digest = hashlib.sha256(b"fledger/gateway-dataset/v1\n")
    for device, sha256 in sorted(registrations.items()):
        digest.update(device.encode() + b"\0" + sha256)
    return digest.digest()


@dataclass
class Upstream:
    bundle: DeviceBundle
    topics: Topics  # the upstream fleet's topics
    publish: Publish
    outbox: Outbox  # the update sent upstream (and its registration) until the upstream answers
    max_model_bytes: int = 256 * 1024 * 1024
    model: tuple[ModelHeader, TensorDict] | None = None  # the newest upstream model
    base: ModelHeader | None = None  # the upstream model the gateway's open round trains from
    awaiting_after: int | None = None  # our last update's upstream round: a newer model answers it
    dataset: bytes = b""  # the data set our last update named
    ack: dict[str, Any] = field(default_factory=dict)
    on_left_out: Callable[[LeftOut], object] = lambda _: None  # our update was accepted, then left out
    _last_send: dict[int, float] = field(default_factory=dict)  # upstream round -> when last sent
    _left_out_told: int = 0  # the last upstream round whose exclusion from the aggregate was logged

    @property
    def subscriptions(self) -> list[str]:
        device = self.bundle.device_id
        return [self.topics.model, self.topics.model_chunks, self.topics.ack(device),
                self.topics.catch_up_reply(device, "model")]

    def on_message(self, topic: str, payload: bytes) -> ModelHeader | None:
        """An upstream message; returns the header of a newer upstream model, else None."""
        device = self.bundle.device_id
        if topic == self.topics.ack(device):
            try:
                self.ack = envelope.open_ack(payload, self.bundle.coordinator.sign_public, fleet=self.bundle.fleet,
                                             device=device)
            except EnvelopeError as exc:
                log.warning("ignored an upstream acknowledgement: %s", exc)
            return None
        if topic not in (self.topics.model, self.topics.catch_up_reply(device, "model")):
            return None
        try:
            header, body = envelope.open_model(payload, self.bundle, max_bytes=self.max_model_bytes)
            weights = decode_tensors(body)
        except (EnvelopeError, CodecError) as exc:
            log.error("refused an upstream model: %s", exc)
            return None
        if self.model is not None and header.round <= self.model[0].round:
            return None
        self.model = (header, weights)
        log.info("upstream model for its round %d (block %d)", header.round, header.block_index)
        self._tell_if_left_out(header.block_data)
        return header

    def _tell_if_left_out(self, block: dict[str, Any]) -> None:
        why = left_out(block, self.bundle.device_id)
        if why is None or why.round <= self._left_out_told:
            return
        self._left_out_told = why.round
        self.on_left_out(why)
        log.warning("upstream round %d: the upstream accepted our update but left it out of its aggregate: %s; see "
                    "docs/robustness.md (a gateway whose devices' data differs much from the other gateways' is "
                    "left out too)", why.round, why)

    @property
    def registered(self) -> bool:
        return bool(self.dataset) and self.ack.get("registered") == self.dataset.hex()

    @property
    def pending(self) -> list[int]:
        """Upstream rounds whose update is in the outbox (sent, no final answer yet)."""
        return self.outbox.rounds()

    def restore(self) -> int | None:
        """After a restart while the gateway awaited the upstream's answer: the upstream round of
        the update in the outbox, which a newer upstream model answers (None: nothing was sent,
        since the outbox is written before sending)."""
        rounds = self.outbox.rounds()
        if not rounds:
            return None
        self.awaiting_after = rounds[-1]
        header = self._header(rounds[-1])
        if header is not None:
            self.dataset = header.dataset_sha256
        log.info("gateway: our update for upstream round %d is in the outbox; sending it again until the upstream "
                 "answers", rounds[-1])
        return rounds[-1]

    def newer_model(self) -> tuple[ModelHeader, TensorDict] | None:
        """The newest upstream model if it answers our last update (or is newer than our base)."""
        after = self.awaiting_after if self.awaiting_after is not None else \
            self.base.round if self.base is not None else None
        if self.model is None or (after is not None and self.model[0].round <= after):
            return None
        return self.model

    def adopted(self, header: ModelHeader) -> None:
        self.base, self.awaiting_after = header, None

    def send(self, change: TensorDict, num_samples: int, metrics: dict[str, float],
             registrations: dict[str, bytes], now: float) -> None:
        """One update upstream: the gateway's aggregated delta against ``base``, naming the data
        set of ``registrations`` (its devices' registrations now), registered with it while the
        upstream does not list that one. Both are durable in the outbox before they are sent."""
        if self.base is None:
            raise RuntimeError("no upstream model to send a delta against")
        dataset = gateway_dataset(registrations)
        round_number = self.base.round
        payload = envelope.seal_update(self.bundle, round_number, encode_tensors(change), num_samples,
                                       {k: v for k, v in metrics.items() if isinstance(v, float)},
                                       dataset_sha256=dataset, base_sha256=self.base.model_sha256)
        # Kept even when the upstream lists the data set already: sent only while it does not
        # (an upstream that lost its state answers dataset_not_registered, and gets it again).
        self.outbox.put(round_number, envelope.seal_dataset(
            self.bundle, dataset, len(registrations), {"gateway": sorted(registrations)}), kind="register")
        self.outbox.put(round_number, payload)  # last: the update marks a complete entry
        self.dataset, self.awaiting_after = dataset, round_number
        self._last_send.pop(round_number, None)
        log.info("sending our aggregate upstream: %d samples, against its round %d, data set %s", num_samples,
                 round_number, dataset.hex()[:16])
        self.resend(now)

    def resend(self, now: float) -> None:
        """Send each update in the outbox (with its registration while the upstream does not list
        it) until the upstream's acknowledgement gives a verdict or a newer upstream model closes
        its round; drop it then, saying whether it was counted."""
        newest = self.model[0].round if self.model is not None else None
        for round_number in self.outbox.rounds():
            header = self._header(round_number)
            if header is None:
                log.error("dropped an unreadable update for upstream round %d from the outbox", round_number)
                self._drop(round_number)
                continue
            entry = self.ack.get("updates", {}).get(header.msg_id.hex())
            verdict = entry.get("verdict") if isinstance(entry, dict) else None
            if verdict == ACCEPTED:
                log.info("the upstream accepted our update for its round %d", round_number)
                self._drop(round_number)
            elif verdict in FINAL_REASONS:
                log.warning("the upstream will not count our update for its round %d: %s (%s); dropped it",
                            round_number, verdict, EXPLANATIONS.get(verdict, "see its log"))
                self._drop(round_number)
            elif newest is not None and newest > round_number:
                log.warning("the upstream closed its round %d without answering our update (%s); dropped it",
                            round_number, verdict or "no verdict")
                self._drop(round_number)
            elif now - self._last_send.get(round_number, float("-inf")) >= RESEND_S:
                if round_number in self._last_send:
                    log.info("no answer from the upstream yet (%s); sending our update for its round %d again",
                             verdict or "no verdict", round_number)
                self._last_send[round_number] = now
                registration = self.outbox.get(round_number, kind="register")
                if registration is not None and self.ack.get("registered") != header.dataset_sha256.hex():
                    self.publish(self.topics.register(self.bundle.device_id), registration)
                self.publish(self.topics.update(self.bundle.device_id), self.outbox.get(round_number) or b"")

    def _header(self, round_number: int) -> UpdateHeader | None:
        payload = self.outbox.get(round_number)
        if payload is None:
            return None
        try:
            return envelope.parse_update(payload, max_bytes=len(payload)).header
        except EnvelopeError:
            return None  # our own sealed update: only a damaged file

    def _drop(self, round_number: int) -> None:
        self.outbox.remove(round_number)
        self._last_send.pop(round_number, None)
