"""The MQTT edge of both roles: a paho client with the settings fledger needs.

- persistent session (clean_session=False, or in MQTT 5 clean_start=False with a session that
  never expires) with a stable client id, QoS 1;
- MQTT 5 when the broker offers it (``mqtt_version = "auto"``), so the broker's maximum
  packet size is known; MQTT 3.1.1 otherwise;
- every message split into frames below the broker's packet limit (federation/chunking.py,
  federation/packet_limit.py), and a disconnect caused by an oversized publish diagnosed
  once and never re-sent in a loop;
- reconnect with exponential backoff plus random jitter (paho's own has none, so a fleet
  would reconnect in lock-step after a broker restart);
- TCP_NODELAY (Nagle's algorithm otherwise holds small packets for ~40-70 ms);
- TLS and username/password read from a file;
- subscriptions re-made on every connect; messages handed to a queue and processed by the
  owner's thread (paho's network thread only reassembles chunks and checks their SHA-256);
- that queue (the inbox) bounded in bytes with backpressure, not by dropping: while it holds
  more than ``inbox_bytes``, the network thread waits (before acknowledging the message that
  went over) until the owner has taken messages out. Meanwhile nothing is read from the
  socket, TCP flow control stops the broker, and the broker keeps the backlog in its queue
  for our session (mosquitto: raise ``max_queued_messages``, deploy/mosquitto/fledger.conf).
  So a coordinator that 1,000 devices send updates to at once holds O(budget) of them in
  memory, not all of them, and loses none. (Holding PUBACKs back instead would rely on the
  broker's in-flight window: mosquitto 2.0.11 did not keep to it, sending thousands.)
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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from federation.chunk_record import ChunkRecord
from federation.chunking import MIN_MAX_PAYLOAD, ChunkError, Reassembler, retained_topics, split, stream_key
from federation.config import ConfigError, read_secret, setting
from federation.packet_limit import (
    DEFAULT_MAX_PAYLOAD,
    PACKET_TOO_LARGE,
    UNSUPPORTED_PROTOCOL,
    OversizeWatch,
    payload_limit,
    refusal,
)

log = logging.getLogger(__name__)

LIVENESS_PERIODS = 4  # heartbeats without even a role's own echo before its link is re-made
DEFAULT_INBOX_BYTES = 32 * 1024 * 1024
MESSAGE_OVERHEAD_BYTES = 256  # counted per message besides its payload: many tiny ones also fill the inbox
# Longest the network thread waits for room in the inbox before letting one more message in:
# a stalled owner must not cost the connection its keepalive, nor outlast amqtt's fixed 5 s
# wait for a PUBACK (../shared/notes/brokers.md); the inbox then grows by one message per wait.
BACKPRESSURE_WAIT_S = 2.0


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
    max_payload: int = setting(DEFAULT_MAX_PAYLOAD, "largest MQTT payload sent in one packet; bigger messages "
                                                    "(models, updates, ledger blocks, status) go in chunks. The "
                                                    "default fits every common broker (AWS IoT Core: 128 KB); an "
                                                    "MQTT 5 broker's stated limit lowers it further. Set ~1 KB "
                                                    "under your broker's packet limit if that is lower; 0: no "
                                                    "chunking (the broker must take the largest model)")
    mqtt_version: str = setting("auto", "MQTT protocol: auto (MQTT 5 if the broker offers it, so its packet limit "
                                        "is known, else 3.1.1), 5, or 3.1.1")
    max_message_bytes: int = setting(256 * 1024 * 1024, "largest chunked message reassembled")
    chunk_timeout: float = setting(120.0, "seconds a partly received chunked message is kept")
    inbox_bytes: int = setting(DEFAULT_INBOX_BYTES, "bytes of received messages held in memory; above it the "
                                                    "client stops reading until they are handled (the broker "
                                                    "queues the rest: backpressure, nothing dropped)")

    def __post_init__(self) -> None:
        # Caught when the settings are read, not 60 s later when connecting fails.
        if not 0 < self.broker_port < 65536:
            raise ConfigError(f"broker port {self.broker_port} is not in 1..65535")
        if self.max_payload != 0 and self.max_payload < MIN_MAX_PAYLOAD:
            raise ConfigError(f"max_payload {self.max_payload} is below the minimum of {MIN_MAX_PAYLOAD} bytes "
                              "(0 turns chunking off)")
        if self.keepalive <= 0:
            raise ConfigError(f"keepalive {self.keepalive} must be a positive number of seconds")


class LivenessWatchdog:
    """When did anything last arrive; silent for longer than ``timeout``? (Pure: times passed in.)"""

    def __init__(self, timeout: float, now: float) -> None:
        if not timeout > 0:
            raise ValueError(f"liveness timeout must be > 0 seconds, not {timeout}")
        self.timeout = timeout
        self.last = now

    def note(self, now: float) -> None:
        self.last = max(self.last, now)

    def silent_for(self, now: float) -> float | None:
        """Seconds of silence if past the timeout, else None."""
        silent = now - self.last
        return silent if silent > self.timeout else None


@dataclass(frozen=True)
class Message:
    topic: str
    payload: bytes
    retain: bool
    received: float
    # MQTT 5 request/response (None over 3.1.1, or when the sender set none): where the sender
    # asks for the answer, and the bytes to echo with it. A chunked message takes them from the
    # frame that completed it (a fledger sender sets them on every frame).
    response_topic: str | None = None
    correlation: bytes | None = None

    @property
    def inbox_bytes(self) -> int:
        """What this message counts for in an inbox's byte budget."""
        return len(self.payload) + len(self.topic) + MESSAGE_OVERHEAD_BYTES


class Inbox(queue.Queue[Message]):
    """The received messages, a queue unbounded in count that tells ``taken`` each message its
    owner takes out (``get``, ``get_nowait``), so the link can account for the bytes held."""

    def __init__(self, taken: Callable[[Message], None]) -> None:
        super().__init__()
        self._taken = taken

    def get(self, block: bool = True, timeout: float | None = None) -> Message:
        message = super().get(block, timeout)
        self._taken(message)  # outside the queue's lock: it may wake the network thread
        return message


def take_following(first: Message, inbox: queue.Queue[Message], belongs: Callable[[str], bool], *,
                   max_count: int, max_bytes: int | None = None) -> tuple[list[Message], Message | None]:
    """``first`` and the messages of the same kind (``belongs(topic)``) already queued right
    behind it, at most ``max_count`` of them and, with ``max_bytes``, until their payloads reach
    it; never waits for more. Also returns the first other message taken out, which the caller
    must still handle."""
    batch = [first]
    size = len(first.payload)
    while len(batch) < max_count and (max_bytes is None or size < max_bytes):
        try:
            message = inbox.get_nowait()
        except queue.Empty:
            return batch, None
        if not belongs(message.topic):
            return batch, message
        batch.append(message)
        size += len(message.payload)
    return batch, None


class MqttLink:
    """A connected, self-healing MQTT client that puts received messages on ``inbox``."""

    def __init__(
        self, config: BrokerConfig, client_id: str, *, subscriptions: list[str] | None = None,
        will: tuple[str, bytes, bool] | None = None,
        backoff: tuple[float, float] = (0.5, 30.0), persistent: bool = True,
        chunk_record: ChunkRecord | None = None,
    ) -> None:
        self.config = config
        self.client_id = client_id
        self.subscriptions = list(subscriptions or [])
        # Bytes in the inbox, and the network thread's wait for room in it (see the module doc).
        self.inbox: queue.Queue[Message] = Inbox(self._taken)
        self.inbox_budget = max(0, config.inbox_bytes)
        self.inbox_bytes = 0
        self.inbox_peak_bytes = 0  # the most it held (benchmarks and tests read it)
        self.backpressure_waits = 0  # times the network thread waited for room in the inbox
        self.backpressure_overruns = 0  # waits that ended without room (stalled owner, or one awaiting a PUBACK)
        self._inbox_room = threading.Condition()
        self._publish_waits = 0  # owners waiting for a PUBACK: the network thread must not wait then
        self.connected = threading.Event()
        self.connect_count = 0  # grows on every (re)connect: the owner republishes retained state
        self._stopping = False
        self._backoff = backoff
        self.refused: str | None = None  # the broker's reason when it refuses our login
        # Bounded reassembly of chunked messages: at most a few large messages in flight.
        self.reassembler = Reassembler(4 * config.max_message_bytes, config.max_message_bytes, config.chunk_timeout)
        # Chunk topics each retained message of ours holds; from the record of an earlier run, if
        # given, so that its leftovers (and only they) are cleared (federation/chunk_record.py).
        self._chunk_record = chunk_record
        self._chunk_counts: dict[str, int] = dict(chunk_record.counts) if chunk_record else {}
        self._will = will
        self._persistent = persistent
        self.liveness: LivenessWatchdog | None = None  # see watch()
        self.forced_reconnects = 0
        # The broker's packet limit and what to do about oversized publishes (see packet_limit).
        self.broker_max_packet: int | None = None  # from an MQTT 5 CONNACK
        self.failed: str | None = None  # set when the link gave up (the owner stops with an error)
        self._oversize = OversizeWatch(config.max_payload)
        self._auto_protocol = _protocol_setting(config.mqtt_version) is None  # decided by a probe in start()
        self._client = self._new_client(_protocol_setting(config.mqtt_version) or paho.MQTTv311)

    @property
    def mqtt5(self) -> bool:
        return bool(self._client.protocol == paho.MQTTv5)

    def _new_client(self, protocol: MQTTProtocolVersion) -> paho.Client:
        client = _configured_client(self.config, self.client_id, protocol, persistent=self._persistent)
        # A TCP connect to a silent address must not outlast a SIGTERM's 5 s (paho's default is 5 s).
        client.connect_timeout = 3.0
        client.max_inflight_messages_set(20)
        client.max_queued_messages_set(0)  # unbounded: QoS 1 messages queue while offline
        if self._will:
            topic, payload, retain = self._will
            client.will_set(topic, payload, qos=1, retain=retain)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_socket_open = self._on_socket_open
        # paho's own retry (after a successful first connect) doubles its delay from min to max
        # with no jitter; randomising both bounds per client spreads a fleet's reconnects after a
        # broker restart instead of having every device retry in lock-step.
        low, high = self._backoff
        client.reconnect_delay_set(min_delay=random.randint(max(1, int(low)), max(2, int(low) + 3)),
                                   max_delay=random.randint(max(2, int(high) // 2), max(2, int(high))))
        return client

    def _connect(self) -> None:
        if self.mqtt5 and self._persistent:
            # The MQTT 5 form of clean_session=False: keep the session (and the QoS 1 messages
            # queued for us while offline) across disconnects, and never let it expire.
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = SESSION_NEVER_EXPIRES
            self._client.connect(self.config.broker_host, self.config.broker_port, self.config.keepalive,
                                 clean_start=False, properties=props)
        elif self.mqtt5:
            self._client.connect(self.config.broker_host, self.config.broker_port, self.config.keepalive,
                                 clean_start=True)
        else:
            self._client.connect(self.config.broker_host, self.config.broker_port, self.config.keepalive)

    # -- paho callbacks (network thread: keep them tiny) --------------------------------------
    def _on_socket_open(self, client: Any, userdata: Any, sock: Any) -> None:
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if self._stopping:  # a reconnect paho had under way when the link gave up or was stopped
            client.disconnect()
            return
        if reason.is_failure:
            self.refused = str(reason)
            log.error("broker refused connection: %s", reason)
            return
        self.refused = None
        self._oversize.connected()
        self.broker_max_packet = getattr(properties, "MaximumPacketSize", None) if self.mqtt5 else None
        for topic in self.subscriptions:
            client.subscribe(topic, qos=1)
        self.connect_count += 1
        if self.liveness is not None:
            self.liveness.note(time.monotonic())  # a fresh connection gets a full timeout
        self.connected.set()
        limit = f", broker's maximum packet size {self.broker_max_packet:,} bytes" if self.broker_max_packet else ""
        log.info("connected to %s:%s as %s (MQTT %s%s)", self.config.broker_host, self.config.broker_port,
                 self.client_id, "5" if self.mqtt5 else "3.1.1", limit)

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        self.connected.clear()
        if self._stopping:
            return
        too_large = self.mqtt5 and getattr(reason, "value", None) == PACKET_TOO_LARGE
        diagnosis, repeat = self._oversize.disconnected(too_large=too_large)
        if diagnosis is not None and repeat:
            # paho would re-send the message after every reconnect and be dropped again, for ever.
            self.failed = diagnosis
            log.error("%s; stopping rather than re-sending it", diagnosis)
            self._stopping = True
            client.disconnect()  # from the network thread: paho's loop then ends, no reconnect
        elif diagnosis is not None:
            log.warning("disconnected from broker (%s) with a large publish unacknowledged; reconnecting; "
                        "if the re-sent message is dropped again, it is over the broker's packet limit", reason)
        else:
            log.warning("disconnected from broker (%s); reconnecting with backoff", reason)

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        self._oversize.acknowledged(mid)

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        if self.liveness is not None:
            self.liveness.note(time.monotonic())
        try:
            whole = self.reassembler.feed(msg.topic, bytes(msg.payload))
        except ChunkError as exc:
            log.warning("dropped a chunked message: %s", exc)
            return
        if whole is None:
            return  # a chunk: the message is not complete yet
        response_topic, correlation = _response_properties(msg)
        self._admit(Message(stream_key(msg.topic), whole, bool(msg.retain), time.time(), response_topic, correlation))

    def _admit(self, message: Message) -> None:
        """Queue ``message``; while the inbox is over budget, wait (paho acknowledges the message
        and reads the socket again only once this returns). A message larger than the whole
        budget still comes in, alone. A stalled owner lets one more in every BACKPRESSURE_WAIT_S."""
        with self._inbox_room:
            self.inbox.put_nowait(message)
            self.inbox_bytes += message.inbox_bytes
            self.inbox_peak_bytes = max(self.inbox_peak_bytes, self.inbox_bytes)
            if self.inbox_bytes > self.inbox_budget and not self._stopping:
                self.backpressure_waits += 1
                self._inbox_room.wait_for(self._may_read, timeout=BACKPRESSURE_WAIT_S)
                if self.inbox_bytes > self.inbox_budget and not self._stopping:
                    self.backpressure_overruns += 1  # no room came in time: one more message may come in

    def _may_read(self) -> bool:
        # An owner waiting for a PUBACK takes nothing out meanwhile: let the acknowledgement in.
        return self.inbox_bytes <= self.inbox_budget or self._stopping or self._publish_waits > 0

    def _taken(self, message: Message) -> None:
        """The owner took ``message`` out of the inbox: wake the network thread if it waits."""
        with self._inbox_room:
            self.inbox_bytes -= message.inbox_bytes
            if self.inbox_bytes <= self.inbox_budget:
                self._inbox_room.notify_all()

    def hold(self, messages: Iterable[Message], held: bool = True) -> None:
        """Count messages the owner took out of the inbox but keeps in memory for later (a batch
        read ahead) against the inbox's budget, as if still in it (``held=False``: done with
        them, room again): what is received and not yet handled stays within the budget."""
        size = sum(message.inbox_bytes for message in messages)
        with self._inbox_room:
            self.inbox_bytes += size if held else -size
            if self.inbox_bytes <= self.inbox_budget:
                self._inbox_room.notify_all()

    # -- API ------------------------------------------------------------------------------------
    def start(self, timeout: float | None = 30.0, *, stop: threading.Event | None = None) -> bool:
        """Connect (retrying with jittered backoff until ``timeout``) and start the network loop.

        Returns False, not connected, as soon as ``stop`` is set (a SIGTERM while the broker is
        unreachable must not wait out the backoff)."""
        stop = stop or threading.Event()
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = self._backoff[0]
        while True:
            if stop.is_set():
                return False
            try:
                if self._auto_protocol:
                    if offers_mqtt5(self.config, self.client_id):
                        self._client = self._new_client(paho.MQTTv5)
                    self._auto_protocol = False
                self._connect()
                break
            except (OSError, ssl.SSLError) as exc:
                if deadline is not None and time.monotonic() + delay > deadline:
                    raise ConnectionError(
                        f"cannot reach MQTT broker {self.config.broker_host}:{self.config.broker_port}: {exc}"
                    ) from exc
                log.warning("broker %s:%s unreachable (%s); retrying in %.1fs",
                            self.config.broker_host, self.config.broker_port, exc, delay)
                stop.wait(delay * (0.5 + random.random()))
                delay = min(delay * 2, self._backoff[1])
        self._client.loop_start()
        while not self.connected.wait(0.1):
            if stop.is_set():
                self.stop(timeout=2)
                return False
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
        return True

    def watch(self, echo_topic: str, timeout: float) -> None:
        """Application-level liveness: subscribe to ``echo_topic``, which the owner publishes to
        itself periodically, and reconnect when nothing at all has arrived for ``timeout``
        seconds. A path that still carries keepalive pings but no data (a faulty proxy or
        middlebox) otherwise stalls the link for good: paho only notices missing PINGRESPs."""
        self.liveness = LivenessWatchdog(timeout, time.monotonic())
        self.subscribe(echo_topic)
        threading.Thread(target=self._watchdog, name="mqtt-liveness", daemon=True).start()

    def _watchdog(self) -> None:
        assert self.liveness is not None
        while not self._stopping:
            time.sleep(min(1.0, self.liveness.timeout / 4))
            silent = self.liveness.silent_for(time.monotonic())
            if silent is None or not self.connected.is_set() or self._stopping:
                continue
            log.warning("nothing received for %.0fs, not even our own echo, although the connection is up: "
                        "reconnecting", silent)
            self.liveness.note(time.monotonic())
            self.forced_reconnects += 1
            sock: Any = self._client.socket()
            with contextlib.suppress(OSError, AttributeError):
                sock.shutdown(socket.SHUT_RDWR)  # paho sees the connection lost and reconnects

    def subscribe(self, topic: str) -> None:
        if topic not in self.subscriptions:
            self.subscriptions.append(topic)
        self._client.subscribe(topic, qos=1)

    def publish(self, topic: str, payload: bytes, *, retain: bool = False, qos: int = 1,
                wait: float | None = None, chunked: bool = True, response_topic: str | None = None,
                correlation: bytes | None = None) -> bool:
        """Publish; with ``wait`` block up to that many seconds for the broker's PUBACK(s).

        ``chunked`` (the default, for every fledger message): with ``max_payload`` set (the
        default) the payload is sent as frames no bigger than it, or than the broker's stated
        limit (see federation.chunking and federation.packet_limit), a retained one as chunk
        topics plus a manifest; ``chunked=False`` sends the bytes as they are (for readers
        that are not fledger). Chunk topics left by a larger earlier message on the same
        retained topic are deleted (also those of an earlier run, with a ``chunk_record``).
        Returns False, without sending, when the broker has said it would drop the unchunked
        payload (``failed`` is then set).

        ``response_topic`` and ``correlation``: the MQTT 5 Response Topic and Correlation Data
        of a request, or of a response (correlation only), set on every frame; not sent over
        MQTT 3.1.1, which has no properties (the payload must then say what they would)."""
        limit = payload_limit(self.config.max_payload, self.broker_max_packet, topic, mqtt5=self.mqtt5)
        properties = self._publish_properties(response_topic, correlation)
        if not (chunked and limit) and not self._may_send_whole(topic, payload):
            return False
        if chunked and limit:
            frames = split(payload, limit)
            if retain:
                previous = self._chunk_counts.get(topic, 0)
                count = len(frames) if len(frames) > 1 else 0
                if self._chunk_record is not None and count > previous:
                    self._chunk_record.set(topic, count)  # before: the record never says less than is there
                pubs = retained_topics(topic, frames, previous)
                self._chunk_counts[topic] = count
            else:
                pubs = [(topic, frame) for frame in frames]
        else:
            pubs = [(topic, payload)]
        infos = [self._publish_one(t, p, qos=qos, retain=retain, properties=properties) for t, p in pubs]
        if self._chunk_record is not None and retain and chunked and limit:
            self._chunk_record.set(topic, self._chunk_counts[topic])  # the leftovers' deletes are queued
        if wait is None:
            return True
        deadline = time.monotonic() + wait
        with self._inbox_room:
            self._publish_waits += 1
            self._inbox_room.notify_all()
        try:
            for info in infos:
                info.wait_for_publish(timeout=max(0.01, deadline - time.monotonic()))
        except (RuntimeError, ValueError):
            return False
        finally:
            with self._inbox_room:
                self._publish_waits -= 1
        return all(info.is_published() for info in infos)

    def publish_all(self, topic: str, payloads: Iterable[bytes], *, qos: int = 1) -> Callable[[], bool]:
        """Queue several messages on one topic; returns a check of whether the broker has
        acknowledged all of them, so a caller can hold back more until it has (paho's queue
        is unbounded)."""
        limit = payload_limit(self.config.max_payload, self.broker_max_packet, topic, mqtt5=self.mqtt5)
        if limit:
            framed = [frame for payload in payloads for frame in split(payload, limit)]
        else:
            framed = [payload for payload in payloads if self._may_send_whole(topic, payload)]
        infos = [self._publish_one(topic, frame, qos=qos) for frame in framed]

        def acknowledged() -> bool:
            for info in infos:
                try:
                    if not info.is_published():
                        return False
                except (RuntimeError, ValueError):
                    continue  # queued while disconnected (paho cannot tell us more), or not queued
            return True

        return acknowledged

    def _publish_properties(self, response_topic: str | None, correlation: bytes | None) -> Properties | None:
        if not self.mqtt5 or (response_topic is None and correlation is None):
            return None
        properties = Properties(PacketTypes.PUBLISH)
        if response_topic is not None:
            properties.ResponseTopic = response_topic
        if correlation is not None:
            properties.CorrelationData = correlation
        return properties

    def _publish_one(self, topic: str, payload: bytes, *, qos: int, retain: bool = False,
                     properties: Properties | None = None) -> paho.MQTTMessageInfo:
        watched = self._oversize.sending(topic, len(payload)) if qos > 0 else None
        info = self._client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        self._oversize.sent(watched, info.mid)
        return info

    def _may_send_whole(self, topic: str, payload: bytes) -> bool:
        """False (and the link failed) when the broker said it would drop this unchunked payload."""
        reason = refusal(len(payload), topic, self.broker_max_packet, mqtt5=self.mqtt5,
                         configured=self.config.max_payload)
        if reason is None:
            return True
        if self.failed is None:
            self.failed = reason
            log.error("%s", reason)
        return False

    def expire_partial(self) -> None:
        """Drop chunked messages that did not complete in time (call about once a second)."""
        for error in self.reassembler.expire():
            log.warning("chunked message expired: %s", error)

    def stop(self, timeout: float = 10.0) -> None:
        """Disconnect and stop the network thread, waiting at most ``timeout`` seconds."""
        self._stopping = True
        with self._inbox_room:
            self._inbox_room.notify_all()  # a network thread waiting for room in the inbox
        try:
            self._client.disconnect()
        finally:
            # paho's loop_stop() joins without a timeout; never let shutdown hang on it.
            stopper = threading.Thread(target=self._client.loop_stop, name="mqtt-stop", daemon=True)
            stopper.start()
            stopper.join(timeout)
            if stopper.is_alive():
                log.warning("MQTT network thread did not stop within %.0fs", timeout)


SESSION_NEVER_EXPIRES = 0xFFFFFFFF  # MQTT 5 Session Expiry Interval: as 3.1.1's clean_session=False
PROBE_TIMEOUT_S = 5.0
def _response_properties(msg: Any) -> tuple[str | None, bytes | None]:
    """(Response Topic, Correlation Data) of a received MQTT 5 PUBLISH; (None, None) otherwise."""
    properties = getattr(msg, "properties", None)
    if properties is None:
        return None, None
    response_topic = getattr(properties, "ResponseTopic", None)
    correlation = getattr(properties, "CorrelationData", None)
    return (response_topic if isinstance(response_topic, str) and response_topic else None,
            bytes(correlation) if isinstance(correlation, (bytes, bytearray)) else None)


_PROTOCOLS = {"auto": None, "5": paho.MQTTv5, "3.1.1": paho.MQTTv311}


def _protocol_setting(value: str) -> MQTTProtocolVersion | None:
    """The paho protocol for the ``mqtt_version`` setting (None: auto)."""
    try:
        return _PROTOCOLS[str(value).strip()]
    except KeyError:
        raise ConfigError(f"setting mqtt_version: {value!r} is not one of {', '.join(_PROTOCOLS)}") from None


def _configured_client(config: BrokerConfig, client_id: str, protocol: MQTTProtocolVersion, *,
                       persistent: bool = True) -> paho.Client:
    """A paho client with fledger's identity, credentials and TLS (no callbacks)."""
    if protocol == paho.MQTTv5:
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol)
    else:
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=not persistent,
                             protocol=protocol)
    if config.username:
        client.username_pw_set(config.username, read_secret(config.password_file, "MQTT password"))
    if config.tls_ca:
        context = ssl.create_default_context(cafile=str(config.tls_ca))
        if config.tls_cert:
            context.load_cert_chain(str(config.tls_cert), str(config.tls_key) if config.tls_key else None)
        client.tls_set_context(context)
    return client


def offers_mqtt5(config: BrokerConfig, client_id: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether the broker speaks MQTT 5: one short connection with a clean session of its own.

    A plain MQTT 5 CONNECT (no properties) gets a clear answer from 3.1.1-only brokers:
    amqtt and NATS refuse the protocol version at once, others may close the connection; silence
    until ``timeout`` also means no. (amqtt does not answer a CONNECT with properties at all,
    which is why the real connection is not the probe.) Raises OSError if unreachable.

    The probe logs in as nobody: the question is the protocol, which a broker answers before
    it looks at credentials (an MQTT 5 broker that wants a login answers "not authorized" in
    an MQTT 5 CONNACK, which is a yes). amqtt misreads an MQTT 5 CONNECT that carries a user
    name and waits for bytes that never come, so a probe with the login cost every process 5 s
    on the embedded broker with the fleet's logins (the default).
    """
    client = _configured_client(replace(config, username=None, password_file=None), f"{client_id}-probe",
                                paho.MQTTv5)
    answer: list[bool] = []
    client.on_connect = lambda c, u, f, reason, p: answer.append(reason.value not in UNSUPPORTED_PROTOCOL)
    client.connect(config.broker_host, config.broker_port, config.keepalive, clean_start=True)
    deadline = time.monotonic() + timeout
    try:
        while not answer and time.monotonic() < deadline:
            if client.loop(0.1) != paho.MQTT_ERR_SUCCESS:
                break  # the broker closed the connection: not MQTT 5
    finally:
        with contextlib.suppress(Exception):
            client.disconnect()
    offered = bool(answer and answer[0])
    log.info("broker %s:%s %s MQTT 5", config.broker_host, config.broker_port,
             "speaks" if offered else "does not speak")
    return offered
