"""The I/O around :mod:`coordinator.state_check`: the state directory's lock, the checkpoint
file, the saved models and the broker's retained ledger head.

- ``STATE/lock``: an exclusive ``flock`` held for the coordinator's lifetime, so a second
  coordinator on the same state directory is refused at once (the lock dies with the process).
- ``STATE/checkpoint``: the latest block this coordinator appended (signed, so it names height
  and hash and cannot be forged), rewritten atomically after every append. It catches a
  ledger.log restored from an older backup or truncated at a block boundary, without a broker.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import queue
import time
from pathlib import Path

from coordinator.state_check import Evidence, Head, StateRefused, model_round_of, signed_head
from coordinator.storage import ModelStore
from federation import durable
from federation.mqtt import BrokerConfig, MqttLink
from federation.topics import Topics
from ledger import Ledger

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint"


def lock_state_dir(state_dir: Path) -> int:
    """Hold ``STATE/lock`` (returns its descriptor); StateRefused if another process holds it."""
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / "lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        owner = path.read_text().strip() or "?"
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise StateRefused(f"another coordinator (pid {owner}) is running on state directory {state_dir}; "
                               "stop it first (two writers would fork the ledger)") from None
        raise
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def write_checkpoint(state_dir: Path, head_block: bytes) -> None:
    durable.atomic_write(state_dir / CHECKPOINT, head_block)


def read_checkpoint(state_dir: Path, coordinator_key: bytes) -> Head | None:
    path = state_dir / CHECKPOINT
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    head = signed_head(raw, coordinator_key, f"checkpoint {path}")
    if head is None:
        raise StateRefused(f"{path} is not a block signed by this coordinator's key: damaged or from another "
                           "fleet; check the state directory (delete the file only if the ledger is known good)")
    return head


def broker_head(config: BrokerConfig, topics: Topics, client_id: str, coordinator_key: bytes,
                wait: float) -> Head | None:
    """The fleet's retained ledger head, if the broker has one signed by our key (a short-lived
    clean-session client, so the broker keeps nothing for it afterwards)."""
    probe = MqttLink(config, client_id, subscriptions=[topics.ledger_head], persistent=False)
    probe.start(timeout=60)
    try:
        deadline = time.monotonic() + wait
        while (left := deadline - time.monotonic()) > 0:
            try:
                message = probe.inbox.get(timeout=left)
            except queue.Empty:
                break
            if message.topic != topics.ledger_head:
                continue  # amqtt hands out retained messages of other topics too
            head = signed_head(message.payload, coordinator_key, "the broker's retained ledger head")
            if head is None:
                log.warning("ignored a retained ledger head not signed by this coordinator's key")
                continue
            return head
        return None
    finally:
        probe.stop()


def evidence(state_dir: Path, ledger: Ledger | None, heads: list[Head]) -> Evidence:
    blocks = list(ledger) if ledger is not None else []
    return Evidence(len(blocks), lambda i: blocks[i].hash, model_round_of(b.data for b in blocks) if blocks else None,
                    tuple(heads), tuple(ModelStore(state_dir / "models").rounds()), str(state_dir / "models"))
