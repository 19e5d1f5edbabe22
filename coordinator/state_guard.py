"""The I/O around :mod:`coordinator.state_check`: the state directory's lock, the checkpoint
file, the saved models and the broker's retained ledger head.

- ``STATE/lock``: an exclusive ``flock`` held for the coordinator's lifetime, so a second
  coordinator on the same state directory is refused at once (the lock dies with the process).
- ``STATE/checkpoint``: a recent durable block this coordinator appended (signed, so it names
  height and hash and cannot be forged), rewritten atomically after a commit group is durable,
  at most once a second (:class:`CheckpointFile`; the newest head is written on the next tick
  and on exit). It catches a ledger.log restored from an older backup or truncated at a block
  boundary, without a broker; it is never ahead of the durable ledger, at most a second behind.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from coordinator.state_check import Evidence, Head, StateRefused, model_round_of, signed_head
from coordinator.storage import ModelStore
from federation import durable, envelope
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


CHECKPOINT_INTERVAL_S = 1.0


class CheckpointFile:
    """``STATE/checkpoint`` at a bounded rate: each write is two fsyncs and a rename, and a
    busy coordinator makes many commit groups a second. :meth:`offer` a durable head;
    :meth:`flush_if_due` (the daemon's timer) and :meth:`flush` (on exit) write the newest."""

    def __init__(self, state_dir: Path, *, interval_s: float = CHECKPOINT_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.state_dir = state_dir
        self.interval_s = interval_s
        self._clock = clock
        self._pending: bytes | None = None
        self._written_at = float("-inf")

    def offer(self, head_block: bytes) -> None:
        self._pending = head_block
        self.flush_if_due()

    def flush_if_due(self) -> None:
        if self._pending is not None and self._clock() - self._written_at >= self.interval_s:
            self.flush()

    def flush(self) -> None:
        head, self._pending = self._pending, None
        if head is None:
            return
        self._written_at = self._clock()
        try:
            write_checkpoint(self.state_dir, head)
        except OSError as exc:  # the ledger has the block; the checkpoint only guards against rollback
            log.error("cannot write the checkpoint in %s: %s", self.state_dir, exc)


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
                wait: float, *, heartbeat: float, stop: threading.Event | None = None) -> Head | None:
    """The fleet's retained ledger head, if the broker has one signed by our key (a short-lived
    clean-session client, so the broker keeps nothing for it afterwards).

    Also refuses (StateRefused) when another coordinator of this fleet is alive: its retained
    status is recent and not final, and a fresh one arrives within two of its heartbeats. (Two
    coordinators would fork the ledger, and with one client id they knock each other off.)"""
    # With their chunk topics: a head or status over the broker's payload limit (an aggregate or
    # presence map of a large fleet) is retained as chunks and a manifest, never as one message.
    probe = MqttLink(config, client_id, subscriptions=[topics.ledger_head, topics.ledger_head_chunks, topics.status,
                                                       topics.status_chunks], persistent=False)
    stop = stop or threading.Event()
    if not probe.start(timeout=60, stop=stop):
        return None  # stopped while connecting
    try:
        head: Head | None = None
        status: dict[str, Any] | None = None
        deadline = time.monotonic() + wait
        while (left := deadline - time.monotonic()) > 0 and (head is None or status is None) and not stop.is_set():
            try:
                message = probe.inbox.get(timeout=min(left, 0.5))
            except queue.Empty:
                continue  # until the deadline, or a stop
            if message.topic == topics.ledger_head and head is None:
                head = signed_head(message.payload, coordinator_key, "the broker's retained ledger head")
                if head is None:
                    log.warning("ignored a retained ledger head not signed by this coordinator's key")
            elif message.topic == topics.status and status is None:
                status = _signed_status(message.payload, coordinator_key)
            # anything else: amqtt hands out retained messages of other topics too
        if status is not None:
            _refuse_if_alive(probe, topics, coordinator_key, status, heartbeat, stop)
        return head
    finally:
        probe.stop()


LIVE_STATES = ("waiting", "aggregating")


def _signed_status(payload: bytes, coordinator_key: bytes) -> dict[str, Any] | None:
    try:
        return envelope.open_status(payload, coordinator_key)
    except envelope.EnvelopeError:
        return None


def _refuse_if_alive(probe: MqttLink, topics: Topics, coordinator_key: bytes, status: dict[str, Any],
                     own_heartbeat: float, stop: threading.Event) -> None:
    period = status.get("heartbeat")
    period = float(period) if isinstance(period, (int, float)) and 0 < period < 3600 else own_heartbeat
    stamp = status.get("time")
    age = time.time() - float(stamp) if isinstance(stamp, (int, float)) else float("inf")
    if status.get("state") not in LIVE_STATES or age > 3 * period:
        return  # it said it stopped, or it has been silent for long: nobody is running
    log.info("the fleet's status is %.0fs old: waiting up to %.0fs to see whether its coordinator still runs",
             age, 2 * period + 1)
    deadline = time.monotonic() + 2 * period + 1
    while (left := deadline - time.monotonic()) > 0 and not stop.is_set():
        try:
            message = probe.inbox.get(timeout=min(left, 0.5))
        except queue.Empty:
            continue
        fresh = _signed_status(message.payload, coordinator_key) if message.topic == topics.status else None
        if fresh is not None and not message.retain and fresh.get("state") in LIVE_STATES:
            raise StateRefused(f"another coordinator of fleet {topics.fleet} is running (its signed status is "
                               f"being published, session {fresh.get('session')}): stop it first; two would fork "
                               "the ledger")


def evidence(state_dir: Path, ledger: Ledger | None, heads: list[Head]) -> Evidence:
    blocks = list(ledger) if ledger is not None else []
    return Evidence(len(blocks), lambda i: blocks[i].hash, model_round_of(b.data for b in blocks) if blocks else None,
                    tuple(heads), tuple(ModelStore(state_dir / "models").rounds()), str(state_dir / "models"))
