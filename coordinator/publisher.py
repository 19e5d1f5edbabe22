"""Everything the coordinator tells the fleet over MQTT: the global model, its status, each
device's acknowledgement and the ledger's blocks.

Signing happens here (the coordinator's key); sending is the callable the daemon passes in, so
tests collect messages without a broker. Whether a message is chunked is the link's business
(every fledger message may be), not the publisher's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from federation import envelope
from federation.keys import CoordinatorKeys
from federation.topics import Topics

Publish = Callable[[str, bytes, bool], None]  # (topic, payload, retain)


class Publisher:
    def __init__(self, send: Publish, topics: Topics, keys: CoordinatorKeys, *,
                 on_head: Callable[[bytes], None] | None = None) -> None:
        self._send = send
        self._on_head = on_head  # e.g. the daemon's checkpoint file, which guards against rollback
        self.topics = topics
        self.keys = keys

    def blocks(self, blocks: Sequence[Any], checkpoint: str) -> None:
        """Durable ledger blocks (one, or a commit group): each block, then the retained head and
        the signed checkpoint once, at the last (signed) block."""
        if not blocks:
            return
        for block in blocks:
            self._send(self.topics.ledger_blocks, block.to_bytes(), False)
        head = blocks[-1].to_bytes()
        self._send(self.topics.ledger_head, head, True)
        if self._on_head is not None:
            self._on_head(head)
        self._send(self.topics.ledger_checkpoint, checkpoint.encode(), True)

    def model(self, message: bytes) -> None:
        """The sealed global model (retained)."""
        self._send(self.topics.model, message, True)

    def status(self, body: dict[str, Any]) -> None:
        self._send(self.topics.status, envelope.seal_status(self.keys, body), True)

    def ack(self, device: str, body: dict[str, Any]) -> None:
        """One device's acknowledgement (retained, signed)."""
        self._send(self.topics.ack(device), envelope.seal_ack(self.keys, body), True)
