"""A gateway's side as a device of its upstream coordinator (``--upstream HOST:PORT``).

The gateway holds a device bundle of the upstream fleet. It trains nothing itself: each of its
rounds aggregates its own devices, and the aggregated delta goes upstream as one signed update
(update envelope v2) against the upstream model the round trained from, with the sum of its
devices' sample counts, so that the upstream's FedAvg over gateways equals FedAvg over every
device. The upstream's next model becomes the gateway's next round (``adopt_upstream_model``).

Its "data set", registered upstream like a device's, is a commitment to its devices' own
registrations (SHA-256 of their sorted commitments), so the upstream ledger names what the
gateway's updates stand for. No network here beyond the ``publish`` callable; the daemon feeds
:meth:`Upstream.on_message` with what arrives from the upstream broker.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from federation import envelope
from federation.codec import CodecError, TensorDict, decode_tensors, encode_tensors
from federation.envelope import EnvelopeError, ModelHeader
from federation.keys import DeviceBundle
from federation.topics import Topics
from federation.verdicts import ACCEPTED, EXPLANATIONS, FINAL_REASONS

log = logging.getLogger(__name__)

Publish = Callable[[str, bytes], object]
RESEND_S = 5.0  # an update or registration not yet acknowledged goes again this often


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
    max_model_bytes: int = 256 * 1024 * 1024
    model: tuple[ModelHeader, TensorDict] | None = None  # the newest upstream model
    base: ModelHeader | None = None  # the upstream model the gateway's open round trains from
    dataset: bytes = b""
    ack: dict[str, Any] = field(default_factory=dict)
    pending: tuple[bytes, str] | None = None  # (sealed update, hex msg_id) until acknowledged
    _last_send: float = float("-inf")
    _last_registration: float = float("-inf")

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
        return header

    def register(self, registrations: dict[str, bytes], now: float) -> None:
        """Register (again, until acknowledged) the gateway's data set upstream: before each update
        (only when its devices' registrations changed is it a new one: the upstream caps those)."""
        dataset = gateway_dataset(registrations)
        if dataset != self.dataset:
            self.dataset, self._last_registration = dataset, float("-inf")
        if self.ack.get("registered") == dataset.hex() or now - self._last_registration < RESEND_S:
            return
        self._last_registration = now
        self.publish(self.topics.register(self.bundle.device_id), envelope.seal_dataset(
            self.bundle, dataset, len(registrations), {"gateway": sorted(registrations)}))

    @property
    def registered(self) -> bool:
        return bool(self.dataset) and self.ack.get("registered") == self.dataset.hex()

    def newer_model(self) -> tuple[ModelHeader, TensorDict] | None:
        """The newest upstream model if it is newer than the base of the gateway's last round."""
        if self.model is None or (self.base is not None and self.model[0].round <= self.base.round):
            return None
        return self.model

    def send(self, change: TensorDict, num_samples: int, metrics: dict[str, float], now: float) -> None:
        """One update upstream: the gateway's aggregated delta against ``base``."""
        if self.base is None:
            raise RuntimeError("no upstream model to send a delta against")
        payload = envelope.seal_update(self.bundle, self.base.round, encode_tensors(change), num_samples,
                                       {k: v for k, v in metrics.items() if isinstance(v, float)},
                                       dataset_sha256=self.dataset, base_sha256=self.base.model_sha256)
        msg_id = envelope.parse_update(payload, max_bytes=len(payload)).header.msg_id.hex()
        self.pending = (payload, msg_id)
        self._last_send = float("-inf")
        self.resend(now)
        log.info("sent our aggregate upstream: %d samples, against its round %d", num_samples, self.base.round)

    def resend(self, now: float) -> None:
        """Send the pending update until the upstream's acknowledgement gives a verdict."""
        if self.pending is None:
            return
        payload, msg_id = self.pending
        entry = self.ack.get("updates", {}).get(msg_id)
        verdict = entry.get("verdict") if isinstance(entry, dict) else None
        if verdict == ACCEPTED or verdict in FINAL_REASONS:
            if verdict != ACCEPTED:
                log.warning("the upstream did not count our update: %s (%s)", verdict,
                            EXPLANATIONS.get(verdict, "see its log"))
            self.pending = None
            return
        if now - self._last_send >= RESEND_S:
            self._last_send = now
            self.publish(self.topics.update(self.bundle.device_id), payload)
