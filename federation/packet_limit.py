"""How big a publish may be, and what to say when the broker drops us over one. Pure: no MQTT.

A broker with a packet limit does not refuse an oversized publish politely: it drops the
connection ("Packet too large" in MQTT 5, nothing at all in 3.1.1), and paho, which ignores
the broker's limit, re-sends the same QoS 1 message after every reconnect, for ever. So
fledger splits every message into frames below a limit it knows (federation/chunking.py):

- by default :data:`DEFAULT_MAX_PAYLOAD`, below the strictest limit of the common brokers;
- lower when the broker states its own limit (MQTT 5 CONNACK "Maximum Packet Size"), minus
  the bytes of the PUBLISH packet around the payload (:func:`publish_overhead`).

:class:`OversizeWatch` remembers the large publishes the broker has not acknowledged yet, so
that a disconnect right after one is diagnosed once and a re-send of the same message that
gets us dropped again stops the link instead of looping.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from federation.chunking import MIN_MAX_PAYLOAD

# Largest payload fledger puts in one PUBLISH unless told otherwise. The strictest common
# broker limit is AWS IoT Core's 128 KB per message (Azure IoT Hub 256 KB, EMQX and NATS
# 1 MB, mosquitto 2.1 2,000,000 bytes). 120,000 bytes of payload plus the PUBLISH header
# (fixed header <= 5, topic <= ~200 for fledger's names, packet id 2, MQTT 5 properties) stays
# under 128,000 bytes, whichever way "KB" is counted. Measured cost: bench/chunking.py.
DEFAULT_MAX_PAYLOAD = 120_000

# MQTT 5 CONNACK reason codes (and the 3.1.1 return code 1) that mean "I do not speak v5".
UNSUPPORTED_PROTOCOL = frozenset({1, 0x84})
# MQTT 5 DISCONNECT reason code "Packet too large" (mosquitto sends it for max_packet_size).
PACKET_TOO_LARGE = 0x95
# Longest chunk topic suffix: retained chunks live on <topic>/chunk/<i> (chunking.CHUNK_TOPIC).
CHUNK_SUFFIX_BYTES = len("/chunk/") + 9
# A publish counts as "large" for the diagnosis when it is at least this big: a disconnect
# after a 200-byte heartbeat is a network problem, not a packet limit (the smallest limits
# in use are kilobytes).
LARGE_PUBLISH = 4096
SETTING = "--max-payload (FLEDGER_MAX_PAYLOAD, max_payload in [broker])"


def _varint_len(value: int) -> int:
    """Bytes of an MQTT variable byte integer (remaining length, property length)."""
    length = 1
    while value >= 128:
        value //= 128
        length += 1
    return length


def publish_overhead(topic: str, payload_size: int, *, mqtt5: bool) -> int:
    """Bytes a QoS 1 PUBLISH adds around a ``payload_size``-byte payload on ``topic``."""
    variable = 2 + len(topic.encode()) + 2 + (1 if mqtt5 else 0)  # topic, packet id, empty properties
    return 1 + _varint_len(variable + payload_size) + variable


def payload_limit(configured: int, broker_max_packet: int | None, topic: str, *, mqtt5: bool) -> int:
    """The largest frame to publish on ``topic`` (or its chunk topics); 0 means no chunking.

    ``configured`` is the ``max_payload`` setting (0: chunking off); ``broker_max_packet`` the
    limit the broker stated, if any. With chunking off the broker's limit is not applied here:
    :func:`refusal` then refuses what would not fit, rather than sending it.
    """
    if not configured or not broker_max_packet:
        return configured
    longest = topic + "x" * CHUNK_SUFFIX_BYTES
    room = broker_max_packet - publish_overhead(longest, broker_max_packet, mqtt5=mqtt5)
    if room < MIN_MAX_PAYLOAD:
        raise ValueError(f"the broker's maximum packet size of {broker_max_packet:,} bytes leaves {room} bytes "
                         f"for a payload on {topic}: below fledger's minimum of {MIN_MAX_PAYLOAD}")
    return min(configured, room)


def _now(configured: int) -> str:
    """What the setting is now, for the error lines."""
    return f"it is {configured:,}" if configured else "it is 0: chunking is off"


def refusal(size: int, topic: str, broker_max_packet: int | None, *, mqtt5: bool, configured: int = 0) -> str | None:
    """Why a ``size``-byte payload on ``topic`` must not be sent whole (None: it may).

    ``configured`` is the ``max_payload`` setting: whole payloads are sent only with chunking
    off (0), so the line says that chunking is off and how to turn it on."""
    if not broker_max_packet:
        return None
    packet = size + publish_overhead(topic, size, mqtt5=mqtt5)
    if packet <= broker_max_packet:
        return None
    return (f"not sending a {size:,}-byte message on {topic}: the broker's maximum packet size is "
            f"{broker_max_packet:,} bytes (MQTT 5 CONNACK); set {SETTING} to a size in bytes "
            f"(the default {DEFAULT_MAX_PAYLOAD:,} is lowered to the broker's limit) ({_now(configured)})")


def disconnect_diagnosis(size: int, topic: str, configured: int) -> str:
    """The one ERROR line for a disconnect that followed a large publish."""
    return (f"broker disconnected after a {size:,}-byte publish on {topic}: over its packet limit? "
            f"set {SETTING} below the broker's limit ({_now(configured)})")


@dataclass(frozen=True)
class Pending:
    topic: str
    size: int


class OversizeWatch:
    """Large publishes not yet acknowledged, keyed by paho's message id. Thread-safe.

    The owner calls :meth:`sending` before handing a payload to paho and :meth:`sent` with
    the message id paho gives it: the broker may drop the connection over the packet before
    paho's publish() even returns. :meth:`disconnected` returns ``(diagnosis, repeat)``: the
    diagnosis when a large publish was outstanding (the largest one), and ``repeat`` when the
    same message (topic and size: paho's re-send, or the owner publishing it again on
    reconnect) was the one outstanding at the previous disconnect too, i.e. the broker dropped
    us again over it. A single disconnect may be the network; the second on the same message
    is not. A disconnect with the MQTT 5 reason "Packet too large" is certain: ``repeat`` at
    once. Only a connection the broker accepted (the owner calls :meth:`connected` on a
    successful CONNACK) can have carried the message: a connection refused or dropped before
    that (a cluster node still recovering a session, say) says nothing about it. Nor can a
    message no larger than one this broker already acknowledged be over its limit: a cluster
    whose node died may drop us twice over the same retained model (NATS closes the connection
    when its replicated retained store times out) without any packet limit in play.
    """

    def __init__(self, configured: int, threshold: int = LARGE_PUBLISH) -> None:
        self.configured = configured
        self.threshold = threshold
        self._pending: dict[int, Pending] = {}
        self._sending: list[Pending] = []  # handed to paho, message id not known yet
        self._early_acks: set[int] = set()  # acknowledged while a large publish was being handed over
        self._suspect: Pending | None = None  # blamed at the previous disconnect
        self._accepted = False  # the broker accepted the connection now ending (CONNACK success)
        self._largest_through = 0  # the largest publish the broker acknowledged: its limit is at least that
        self._lock = threading.Lock()

    def sending(self, topic: str, size: int) -> Pending | None:
        if size < self.threshold:
            return None
        pending = Pending(topic, size)
        with self._lock:
            self._sending.append(pending)
        return pending

    def sent(self, pending: Pending | None, mid: int) -> None:
        if pending is None:
            return
        with self._lock:
            self._sending.remove(pending)
            if mid in self._early_acks:
                self._early_acks.discard(mid)
                self._got_through(pending)
            else:
                self._pending[mid] = pending
            if not self._sending:
                self._early_acks.clear()

    def acknowledged(self, mid: int) -> None:
        with self._lock:
            done = self._pending.pop(mid, None)
            if done is not None:
                self._got_through(done)
            elif self._sending:
                self._early_acks.add(mid)

    def _got_through(self, pending: Pending) -> None:
        self._largest_through = max(self._largest_through, pending.size)
        if pending == self._suspect:
            self._suspect = None  # the message blamed last time was acknowledged after all

    def connected(self) -> None:
        """The broker accepted a connection: what is outstanding is (re)sent on it."""
        with self._lock:
            self._accepted = True

    def disconnected(self, *, too_large: bool = False) -> tuple[str | None, bool]:
        with self._lock:
            accepted, self._accepted = self._accepted, False
            outstanding = [*self._pending.values(), *self._sending]
            if not outstanding:
                self._suspect = None
                return None, False
            if not accepted and not too_large:
                return None, False  # nothing was sent on it; the suspect stays as it was
            largest = max(outstanding, key=lambda pending: pending.size)
            if largest.size <= self._largest_through and not too_large:
                self._suspect = None
                return None, False  # one as large went through: the drop is not about its size
            repeat = too_large or largest == self._suspect
            self._suspect = largest
        return disconnect_diagnosis(largest.size, largest.topic, self.configured), repeat
