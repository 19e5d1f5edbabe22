"""Everything the coordinator tells the fleet over MQTT: the global model, its status, each
device's acknowledgement and the ledger's blocks.

Signing happens here (the coordinator's key); sending is the callable the daemon passes in, so
tests collect messages without a broker. A message that may exceed the broker's packet limit
(the model) goes through ``send_large`` when the daemon configures one (it chunks).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from federation import envelope
from federation.keys import CoordinatorKeys
from federation.topics import Topics

Publish = Callable[[str, bytes, bool], None]  # (topic, payload, retain)


class Publisher:
    def __init__(self, send: Publish, topics: Topics, keys: CoordinatorKeys, *,
                 send_large: Publish | None = None, on_head: Callable[[bytes], None] | None = None) -> None:
        self._send = send
        self._send_large = send_large or send
        self._on_head = on_head  # e.g. the daemon's checkpoint file, which guards against rollback
        self.topics = topics
        self.keys = keys

    def block(self, block: Any, checkpoint: str) -> None:
        """A durable ledger block: the block, the retained head and the signed checkpoint."""
        raw = block.to_bytes()
        self._send(self.topics.ledger_blocks, raw, False)
        self._send(self.topics.ledger_head, raw, True)
        if self._on_head is not None:
            self._on_head(raw)
        self._send(self.topics.ledger_checkpoint, checkpoint.encode(), True)

    def model(self, message: bytes) -> None:
        """The sealed global model (retained)."""
        self._send_large(self.topics.model, message, True)

    def status(self, body: dict[str, Any]) -> None:
        self._send(self.topics.status, envelope.seal_status(self.keys, body), True)

    def ack(self, device: str, body: dict[str, Any]) -> None:
        """One device's acknowledgement (retained, signed)."""
        self._send(self.topics.ack(device), envelope.seal_ack(self.keys, body), True)
