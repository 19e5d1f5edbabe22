"""The MQTT edge of both roles: a paho client with the settings fledger needs.

- persistent session (clean_session=False) with a stable client id, QoS 1;
- reconnect with exponential backoff plus random jitter (paho's own has none, so a fleet
  would reconnect in lock-step after a broker restart);
- TCP_NODELAY (Nagle's algorithm otherwise holds small packets for ~40-70 ms);
- TLS and username/password read from a file;
- subscriptions re-made on every connect; messages handed to a queue, never processed on
  paho's network thread.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

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
        backoff: tuple[float, float] = (0.5, 30.0),
    ) -> None:
        self.config = config
        self.client_id = client_id
        self.subscriptions = list(subscriptions or [])
        self.inbox: queue.Queue[Message] = queue.Queue(maxsize=inbox_size)
        self.connected = threading.Event()
        self.connect_count = 0  # grows on every (re)connect: the owner republishes retained state
        self._stopping = False
        self._backoff = backoff
        self._client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False,
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
        # paho's own retry (after a successful first connect) gets backoff; we add jitter by
        # randomising the bounds per client.
        low, high = backoff
        self._client.reconnect_delay_set(min_delay=max(1, round(low + random.random())), max_delay=int(high))

    # -- paho callbacks (network thread: keep them tiny) --------------------------------------
    def _on_socket_open(self, client: Any, userdata: Any, sock: Any) -> None:
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            log.error("broker refused connection: %s", reason)
            return
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
            self.inbox.put_nowait(Message(msg.topic, bytes(msg.payload), bool(msg.retain), time.time()))
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
        remaining = None if deadline is None else max(0.1, deadline - time.monotonic())
        if not self.connected.wait(remaining):
            self.stop()
            raise ConnectionError(
                f"MQTT broker {self.config.broker_host}:{self.config.broker_port} did not accept the connection"
            )

    def subscribe(self, topic: str) -> None:
        if topic not in self.subscriptions:
            self.subscriptions.append(topic)
        self._client.subscribe(topic, qos=1)

    def publish(self, topic: str, payload: bytes, *, retain: bool = False, qos: int = 1,
                wait: float | None = None) -> bool:
        """Publish; with ``wait`` block up to that many seconds for the broker's PUBACK."""
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if wait is None:
            return True
        try:
            info.wait_for_publish(timeout=wait)
        except (RuntimeError, ValueError):
            return False
        return info.is_published()

    def stop(self) -> None:
        self._stopping = True
        try:
            self._client.disconnect()
        finally:
            self._client.loop_stop()
