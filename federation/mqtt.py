"""The MQTT edge of both roles: a paho client with the settings fledger needs.

- persistent session (clean_session=False) with a stable client id, QoS 1;
- reconnect with exponential backoff plus random jitter (paho's own has none, so a fleet
  would reconnect in lock-step after a broker restart);
- TCP_NODELAY (Nagle's algorithm otherwise holds small packets for ~40-70 ms);
- TLS and username/password read from a file;
- subscriptions re-made on every connect; messages handed to a queue and processed by the
  owner's thread (paho's network thread only reassembles chunks and checks their SHA-256).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import random
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from federation.chunking import ChunkError, Reassembler, chunk_count, retained_topics, split, stream_key
from federation.config import read_secret, setting

log = logging.getLogger(__name__)


@dataclass
class BrokerConfig:
    broker_host: str = setting("127.0.0.1", "MQTT broker host name or address")
    broker_port: int = setting(1883, "MQTT broker port (8883 is usual for TLS)")
    username: str | None = setting(None, "MQTT user name")
    password_file: Path | None = setting(None, "file holding the MQTT password (never pass it on the command line)")
    tls_ca: Path | None = setting(None, "CA certificate (PEM) to verify the broker; enables TLS")
    tls_cert: Path | None = setting(None, "client certificate (PEM) for mutual TLS")
    tls_key: Path | None = setting(None, "client private key (PEM) for mutual TLS")
    keepalive: int = setting(30, "MQTT keepalive in seconds")
    topic_prefix: str = setting("fledger", "first level of every topic")
    max_payload: int = setting(0, "largest MQTT payload the broker takes; bigger models and updates are sent in "
                                  "chunks (set ~1 KB under the broker's limit, e.g. 1047552 for a 1 MiB cap; "
                                  "0: no chunking)")
    max_message_bytes: int = setting(256 * 1024 * 1024, "largest chunked message reassembled")
    chunk_timeout: float = setting(120.0, "seconds a partly received chunked message is kept")


@dataclass(frozen=True)
class Message:
    topic: str
    payload: bytes
    retain: bool
    received: float


class MqttLink:
    """A connected, self-healing MQTT client that puts received messages on ``inbox``."""

    def __init__(
        self, config: BrokerConfig, client_id: str, *, subscriptions: list[str] | None = None,
        will: tuple[str, bytes, bool] | None = None, inbox_size: int = 10_000,
        backoff: tuple[float, float] = (0.5, 30.0), clean_session: bool = False,
    ) -> None:
        self.config = config
        self.client_id = client_id
        self.subscriptions = list(subscriptions or [])
        self.inbox: queue.Queue[Message] = queue.Queue(maxsize=inbox_size)
        self.connected = threading.Event()
        self.connect_count = 0  # grows on every (re)connect: the owner republishes retained state
        self._stopping = False
        self._backoff = backoff
        self.refused: str | None = None  # the broker's reason when it refuses our login
        # Bounded reassembly of chunked messages: at most a few large messages in flight.
        self.reassembler = Reassembler(4 * config.max_message_bytes, config.max_message_bytes, config.chunk_timeout)
        self._chunk_counts: dict[str, int] = {}
        self._client = paho.Client(
            # A one-shot reader (fledger status) asks for a clean session: nothing queued for it.
            CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean_session,
            protocol=paho.MQTTv311,
        )
        self._client.max_inflight_messages_set(20)
        self._client.max_queued_messages_set(0)  # unbounded: QoS 1 messages queue while offline
        if config.username:
            self._client.username_pw_set(config.username, read_secret(config.password_file, "MQTT password"))
        if config.tls_ca:
            context = ssl.create_default_context(cafile=str(config.tls_ca))
            if config.tls_cert:
                context.load_cert_chain(str(config.tls_cert), str(config.tls_key) if config.tls_key else None)
            self._client.tls_set_context(context)
        if will:
            topic, payload, retain = will
            self._client.will_set(topic, payload, qos=1, retain=retain)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._client.on_socket_open = self._on_socket_open
        # paho's own retry (after a successful first connect) doubles its delay from min to max
        # with no jitter; randomising both bounds per client spreads a fleet's reconnects after a
        # broker restart instead of having every device retry in lock-step.
        low, high = backoff
        self._client.reconnect_delay_set(min_delay=random.randint(max(1, int(low)), max(2, int(low) + 3)),
                                         max_delay=random.randint(max(2, int(high) // 2), max(2, int(high))))

    # -- paho callbacks (network thread: keep them tiny) --------------------------------------
    def _on_socket_open(self, client: Any, userdata: Any, sock: Any) -> None:
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            self.refused = str(reason)
            log.error("broker refused connection: %s", reason)
            return
        self.refused = None
        for topic in self.subscriptions:
            client.subscribe(topic, qos=1)
        self.connect_count += 1
        self.connected.set()
        log.info("connected to %s:%s as %s", self.config.broker_host, self.config.broker_port, self.client_id)

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        self.connected.clear()
        if not self._stopping:
            log.warning("disconnected from broker (%s); reconnecting with backoff", reason)

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        try:
            whole = self.reassembler.feed(msg.topic, bytes(msg.payload))
        except ChunkError as exc:
            log.warning("dropped a chunked message: %s", exc)
            return
        if whole is None:
            return  # a chunk: the message is not complete yet
        try:
            self.inbox.put_nowait(Message(stream_key(msg.topic), whole, bool(msg.retain), time.time()))
        except queue.Full:
            log.error("inbox full: dropped a message on %s", msg.topic)

    # -- API ------------------------------------------------------------------------------------
    def start(self, timeout: float | None = 30.0) -> None:
        """Connect (retrying with jittered backoff until ``timeout``) and start the network loop."""
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = self._backoff[0]
        while True:
            try:
                self._client.connect(self.config.broker_host, self.config.broker_port, self.config.keepalive)
                break
            except (OSError, ssl.SSLError) as exc:
                if deadline is not None and time.monotonic() + delay > deadline:
                    raise ConnectionError(
                        f"cannot reach MQTT broker {self.config.broker_host}:{self.config.broker_port}: {exc}"
                    ) from exc
                log.warning("broker %s:%s unreachable (%s); retrying in %.1fs",
                            self.config.broker_host, self.config.broker_port, exc, delay)
                time.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, self._backoff[1])
        self._client.loop_start()
        while not self.connected.wait(0.1):
            if self.refused is not None:
                self.stop()
                raise ConnectionError(f"MQTT broker {self.config.broker_host}:{self.config.broker_port} refused "
                                      f"the connection: {self.refused}")
            if deadline is not None and time.monotonic() > deadline:
                break
        if not self.connected.is_set():
            self.stop()
            raise ConnectionError(
                f"MQTT broker {self.config.broker_host}:{self.config.broker_port} did not accept the connection"
            )

    def subscribe(self, topic: str) -> None:
        if topic not in self.subscriptions:
            self.subscriptions.append(topic)
        self._client.subscribe(topic, qos=1)

    def publish(self, topic: str, payload: bytes, *, retain: bool = False, qos: int = 1,
                wait: float | None = None, chunked: bool = False, clear_stale_chunks: bool = False) -> bool:
        """Publish; with ``wait`` block up to that many seconds for the broker's PUBACK(s).

        ``chunked``: the payload may exceed the broker's limit (models, updates); with
        ``max_payload`` set it is sent as frames (see federation.chunking), a retained one as
        chunk topics plus a manifest. ``clear_stale_chunks`` deletes chunk topics a previous
        process may have left for a larger retained message."""
        limit = self.config.max_payload
        if chunked and limit:
            frames = split(payload, limit)
            if retain:
                previous = self._chunk_counts.get(topic, 0)
                if clear_stale_chunks:
                    previous = max(previous, chunk_count(self.config.max_message_bytes, limit))
                pubs = retained_topics(topic, frames, previous)
                self._chunk_counts[topic] = len(frames) if len(frames) > 1 else 0
            else:
                pubs = [(topic, frame) for frame in frames]
        else:
            pubs = [(topic, payload)]
        infos = [self._client.publish(t, p, qos=qos, retain=retain) for t, p in pubs]
        if wait is None:
            return True
        deadline = time.monotonic() + wait
        try:
            for info in infos:
                info.wait_for_publish(timeout=max(0.01, deadline - time.monotonic()))
        except (RuntimeError, ValueError):
            return False
        return all(info.is_published() for info in infos)

    def publish_all(self, topic: str, payloads: Iterable[bytes], *, qos: int = 1) -> Callable[[], bool]:
        """Queue several messages on one topic; returns a check of whether the broker has
        acknowledged all of them, so a caller can hold back more until it has (paho's queue
        is unbounded)."""
        infos = [self._client.publish(topic, payload, qos=qos) for payload in payloads]

        def acknowledged() -> bool:
            for info in infos:
                try:
                    if not info.is_published():
                        return False
                except (RuntimeError, ValueError):
                    continue  # queued while disconnected (paho cannot tell us more), or not queued
            return True

        return acknowledged

    def expire_partial(self) -> None:
        """Drop chunked messages that did not complete in time (call about once a second)."""
        for error in self.reassembler.expire():
            log.warning("chunked message expired: %s", error)

    def stop(self, timeout: float = 10.0) -> None:
        """Disconnect and stop the network thread, waiting at most ``timeout`` seconds."""
        self._stopping = True
        try:
            self._client.disconnect()
        finally:
            # paho's loop_stop() joins without a timeout; never let shutdown hang on it.
            stopper = threading.Thread(target=self._client.loop_stop, name="mqtt-stop", daemon=True)
            stopper.start()
            stopper.join(timeout)
            if stopper.is_alive():
                log.warning("MQTT network thread did not stop within %.0fs", timeout)
