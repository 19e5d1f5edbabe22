"""Chunking: carry messages larger than a broker's packet limit as a series of frames.

Pure: no MQTT in here. The sender calls :func:`split` (or :func:`retained_topics` for a
retained message) and publishes the frames; the receiver passes every payload it gets to
:meth:`Reassembler.feed` and acts on the whole messages it returns. See "Chunking" in
docs/protocol.md for the wire format.

Why: many brokers cap a message (EMQX 1 MB by default, AWS IoT 128 KB, mosquitto 2.1 2 MB)
and paho ignores the cap: an oversized QoS 1 publish "succeeds", the broker drops the
connection and paho re-sends it after every reconnect, for ever. So a sender must stay
below the limit itself.

Every frame starts with ``FLC1`` (magic + version) and a kind byte:

- ``W`` whole: the rest is the message (it fitted in one frame);
- ``C`` chunk: u16 big-endian header length, msgpack header, chunk bytes;
- ``M`` manifest: u16 header length, msgpack header (no data); names the current message of
  a retained topic whose chunks live on ``<base>/chunk/<i>``.

Chunk header: ``{"id": 16 random bytes, "i": index, "n": count, "cs": chunk size,
"size": total bytes, "sha256": of the whole message}``; the manifest has the same fields
without ``i``. Every chunk carries the whole description, so chunks may arrive in any order
and the first one seen is enough to reject a transfer that is too large. The reassembly
budget counts only chunks actually received (their bytes plus a fixed per-chunk overhead),
never a declared size (a header costs the sender nothing to forge), and one stream (topic)
may hold at most one message's worth of it. Receiving copies each chunk once: a large chunk is
held as a view into the received frame (see :data:`HOLD_VIEW_MIN`) until the message is joined.
"""

from __future__ import annotations

import hashlib
import os
import re
import struct
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack

MAGIC = b"FLC"
VERSION = b"1"
PREFIX = MAGIC + VERSION
KIND_WHOLE = b"W"
KIND_CHUNK = b"C"
KIND_MANIFEST = b"M"
ID_BYTES = 16
MAX_HEADER_BYTES = 256
_LEN = struct.Struct(">H")
WHOLE_OVERHEAD = len(PREFIX) + 1  # b"FLC1W"
_CHUNK_PREFIX = len(PREFIX) + 1 + _LEN.size  # b"FLC1C" + u16
MIN_MAX_PAYLOAD = 256  # below this the header would eat most of every frame

CHUNK_TOPIC = re.compile(r"^(?P<base>.+)/chunk/(?P<index>0|[1-9][0-9]{0,8})$")

# Error reasons (ChunkError.reason), each counted in Reassembler.errors.
MALFORMED = "malformed"
UNSUPPORTED_VERSION = "unsupported_version"
TOO_LARGE = "too_large"
DIGEST_MISMATCH = "digest_mismatch"
INCONSISTENT = "inconsistent"
TIMEOUT = "timeout"
OVER_BUDGET = "over_budget"
REASONS = (MALFORMED, UNSUPPORTED_VERSION, TOO_LARGE, DIGEST_MISMATCH, INCONSISTENT, TIMEOUT, OVER_BUDGET)
# A partial message dropped because its own stream moved on (a newer message): not a bad frame
# and not raised by feed(), so it is reported by Reassembler.expire() and counted in events.
SUPERSEDED = "superseded"

# Each buffered chunk is charged its data plus this, for the objects that hold it (bytes
# header, dict slot, int key: ~115 bytes measured on CPython 3.11). Counting data alone, 1-byte
# chunks made memory ~80x the budget; now tiny chunks simply exhaust the budget sooner.
CHUNK_OVERHEAD = 128
# A stream's share of the budget is one max-size message sent in chunks of >= 1 KiB (overhead
# <= 1/8 of the data; real brokers take 128 KB or more). One sender, whatever it sends on its
# topic, can then only crowd out its own messages.
STREAM_SHARE_SLACK = 8
# Partial messages per stream. A live sender needs 1, but 2: a new subscriber of a retained
# chunked topic gets stale chunks of the previous model mixed, in any order, with the current
# one's on the same stream; with 1, a stale chunk would evict the current model.
MAX_TRANSFERS_PER_KEY = 2
MAX_REPORTS = 64  # superseded errors kept for expire(); beyond that they are only counted
# A chunk of at least this many bytes, received as ``bytes`` (immutable: paho's payloads are),
# is held as a view into its frame instead of a copy, so each received chunk is copied once, into
# the joined message. The frame's header bytes and the view object are then charged too
# (VIEW_OVERHEAD: memoryview + its managed buffer, ~240 bytes on CPython 3.11); below this size
# the copy is cheap and the smaller charge lets tiny chunks go further.
HOLD_VIEW_MIN = 16 * 1024
VIEW_OVERHEAD = 256


class ChunkError(ValueError):
    """A frame (or a partial message) was rejected; ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str, detail: str, key: str | None = None) -> None:
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail
        self.key = key

    def __str__(self) -> str:
        where = f" on {self.key}" if self.key is not None else ""
        return f"chunk {self.reason}{where}: {self.detail}"


@dataclass(frozen=True)
class Header:
    """The description every chunk (and the manifest) carries; ``index`` is -1 for a manifest."""

    id: bytes
    count: int
    chunk_size: int
    size: int
    sha256: bytes
    index: int = -1

    def to_map(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id}
        if self.index >= 0:
            out["i"] = self.index
        out.update({"n": self.count, "cs": self.chunk_size, "size": self.size, "sha256": self.sha256})
        return out

    def same_message(self, other: Header) -> bool:
        return (self.id, self.count, self.chunk_size, self.size, self.sha256) == (
            other.id, other.count, other.chunk_size, other.size, other.sha256)


@dataclass(frozen=True)
class Frame:
    """A parsed frame: ``kind`` is ``"whole"``, ``"chunk"``, ``"manifest"`` or ``"unframed"``."""

    kind: str
    data: bytes
    header: Header | None = None


# -- sending ------------------------------------------------------------------------------------

def _pack_header(header: Header) -> bytes:
    return msgpack.packb(header.to_map(), use_bin_type=True)


def _chunk_size(size: int, max_payload: int) -> int:
    # msgpack ints grow with their value, so a header with every number set to ``size`` is at
    # least as long as any real header of this message: every frame then fits max_payload.
    worst = Header(b"\0" * ID_BYTES, size, size, size, b"\0" * 32, size)
    return max_payload - _CHUNK_PREFIX - len(_pack_header(worst))


def _check_max_payload(max_payload: int) -> None:
    if max_payload < MIN_MAX_PAYLOAD:
        raise ValueError(f"max_payload {max_payload} is below the minimum of {MIN_MAX_PAYLOAD} bytes")


def chunk_count(size: int, max_payload: int) -> int:
    """How many frames :func:`split` makes of a ``size``-byte message (1 = a whole frame)."""
    _check_max_payload(max_payload)
    if size + WHOLE_OVERHEAD <= max_payload:
        return 1
    return -(-size // _chunk_size(size, max_payload))


def split(message: bytes, max_payload: int, *, message_id: bytes | None = None) -> list[bytes]:
    """Frames for ``message``, each at most ``max_payload`` bytes.

    A message that fits (with the 5-byte ``FLC1W`` prefix) is one whole frame; a larger one
    becomes chunk frames sharing a fresh random 16-byte id. Publish them in order, QoS 1, on
    one topic (or use :func:`retained_topics` for a retained message). ``max_payload`` must
    leave room for the MQTT header and topic below the broker's packet limit (limit - 1024 is
    a safe choice).
    """
    _check_max_payload(max_payload)
    size = len(message)
    if size + WHOLE_OVERHEAD <= max_payload:
        return [PREFIX + KIND_WHOLE + bytes(message)]
    cs = _chunk_size(size, max_payload)
    count = -(-size // cs)
    ident = message_id if message_id is not None else os.urandom(ID_BYTES)
    if len(ident) != ID_BYTES:
        raise ValueError(f"message_id must be {ID_BYTES} bytes")
    digest = hashlib.sha256(message).digest()
    view = memoryview(message)
    frames = []
    for i in range(count):
        head = _pack_header(Header(ident, count, cs, size, digest, i))
        frames.append(b"".join((PREFIX, KIND_CHUNK, _LEN.pack(len(head)), head, view[i * cs:(i + 1) * cs])))
    return frames


def manifest_frame(header: Header) -> bytes:
    """The manifest frame for a chunked message described by ``header`` (its index is ignored)."""
    head = _pack_header(Header(header.id, header.count, header.chunk_size, header.size, header.sha256))
    return b"".join((PREFIX, KIND_MANIFEST, _LEN.pack(len(head)), head))


def chunk_topic(base_topic: str, index: int) -> str:
    return f"{base_topic}/chunk/{index}"


def stream_key(topic: str) -> str:
    """The stream a topic belongs to: ``<base>/chunk/<i>`` -> ``<base>``; any other topic itself."""
    match = CHUNK_TOPIC.match(topic)
    return match.group("base") if match else topic


def retained_topics(base_topic: str, frames: Sequence[bytes], previous_count: int = 0) -> list[tuple[str, bytes]]:
    """Where to publish the frames of a *retained* message, in this order, all retained, QoS 1.

    Retained messages on one topic overwrite each other, so chunk ``i`` goes to
    ``<base>/chunk/<i>`` and a manifest (id, n, cs, size, sha256) to ``<base>``, published
    last. A whole frame goes to ``<base>`` itself. Chunk topics ``n .. previous_count-1``,
    left over from an earlier, larger message, are deleted (empty retained payload); pass the
    frame count of the previous message (after a restart: federation/chunk_record.py).
    """
    if not frames:
        raise ValueError("no frames")
    first = parse_frame(frames[0])
    out: list[tuple[str, bytes]] = []
    if first.kind == "whole" and len(frames) == 1:
        count = 0
        tail = (base_topic, bytes(frames[0]))
    elif first.kind == "chunk" and first.header is not None and len(frames) == first.header.count:
        count = first.header.count
        out = [(chunk_topic(base_topic, i), bytes(frame)) for i, frame in enumerate(frames)]
        tail = (base_topic, manifest_frame(first.header))
    else:
        raise ValueError("frames must be the output of split()")
    out += [(chunk_topic(base_topic, i), b"") for i in range(count, previous_count)]
    out.append(tail)
    return out


# -- receiving ----------------------------------------------------------------------------------

def _int_field(head: dict[str, Any], name: str, low: int, high: int) -> int:
    value = head.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ChunkError(MALFORMED, f"header field {name!r} missing or out of range")
    return value


def _bytes_field(head: dict[str, Any], name: str, length: int) -> bytes:
    value = head.get(name)
    if not isinstance(value, bytes) or len(value) != length:
        raise ChunkError(MALFORMED, f"header field {name!r} must be {length} bytes")
    return value


def _parse_header(frame: memoryview, manifest: bool) -> tuple[Header, int]:
    if len(frame) < _CHUNK_PREFIX:
        raise ChunkError(MALFORMED, "frame too short")
    (hlen,) = _LEN.unpack_from(frame, len(PREFIX) + 1)
    start = _CHUNK_PREFIX
    if hlen > MAX_HEADER_BYTES or start + hlen > len(frame):
        raise ChunkError(MALFORMED, f"bad header length {hlen}")
    try:
        head = msgpack.unpackb(frame[start:start + hlen], raw=False, strict_map_key=True, max_map_len=8,
                               max_array_len=0, max_str_len=16, max_bin_len=64, max_ext_len=0)
    except Exception as exc:  # msgpack raises several types; all mean the same here
        raise ChunkError(MALFORMED, f"header is not msgpack ({type(exc).__name__})") from None
    expected = {"id", "n", "cs", "size", "sha256"} | (set() if manifest else {"i"})
    if not isinstance(head, dict) or set(head) != expected:
        raise ChunkError(MALFORMED, "header must be a map with exactly " + ", ".join(sorted(expected)))
    size = _int_field(head, "size", 1, 2**62)
    cs = _int_field(head, "cs", 1, 2**62)
    count = _int_field(head, "n", 1, 2**32)
    if count != -(-size // cs):
        raise ChunkError(MALFORMED, f"n={count} does not match size={size} / cs={cs}")
    index = -1 if manifest else _int_field(head, "i", 0, count - 1)
    header = Header(_bytes_field(head, "id", ID_BYTES), count, cs, size, _bytes_field(head, "sha256", 32), index)
    return header, start + hlen


def parse_frame(frame: bytes) -> Frame:
    """Parse one payload. Anything not starting with ``FLC`` is an ``unframed`` legacy payload."""
    kind, data, header = _parse_view(frame)
    return Frame(kind, bytes(data), header)


def _parse_view(frame: bytes) -> tuple[str, memoryview, Header | None]:
    """:func:`parse_frame` without copying: the data is a view into ``frame`` (the chunk path
    of a received 424 KB update copied each chunk here, then again to join them)."""
    view = memoryview(frame).cast("B")  # bytes-like of any shape: index and len() in bytes
    if view[:len(MAGIC)] != MAGIC:
        return "unframed", view, None
    if view[len(MAGIC):len(PREFIX)] != VERSION:
        version = bytes(view[len(MAGIC):len(PREFIX)])
        raise ChunkError(UNSUPPORTED_VERSION, f"frame version {version!r}, expected {VERSION!r}")
    kind = view[len(PREFIX):len(PREFIX) + 1]
    if kind == KIND_WHOLE:
        return "whole", view[WHOLE_OVERHEAD:], None
    if kind == KIND_MANIFEST:
        header, end = _parse_header(view, manifest=True)
        if end != len(view):
            raise ChunkError(MALFORMED, "manifest carries data")
        return "manifest", view[end:], header
    if kind == KIND_CHUNK:
        header, end = _parse_header(view, manifest=False)
        data = view[end:]
        last = header.size - header.chunk_size * (header.count - 1)
        want = header.chunk_size if header.index < header.count - 1 else last
        if len(data) != want:
            raise ChunkError(MALFORMED, f"chunk {header.index} has {len(data)} bytes, expected {want}")
        return "chunk", data, header
    raise ChunkError(MALFORMED, f"unknown frame kind {bytes(kind)!r}")


@dataclass
class _Transfer:
    key: str
    header: Header
    started: float
    chunks: dict[int, bytes | memoryview] = field(default_factory=dict)
    received: int = 0  # data bytes
    charged: int = 0  # data bytes + CHUNK_OVERHEAD per chunk (+ frame header and view): the budget's count
    # SHA-256 of chunks 0 .. hashed-1, fed as they arrive in order (the usual case), so the
    # integrity check needs no pass over the whole message once it is complete.
    hasher: Any = None
    hashed: int = 0


class Reassembler:
    """Rebuilds chunked messages with bounded memory. Thread-safe.

    - ``max_bytes_in_flight``: the chunks actually buffered, all partial messages together,
      never charge more than this: each chunk costs its bytes plus :data:`CHUNK_OVERHEAD`, so
      the budget bounds real memory (see :attr:`bytes_charged`). Chunks are charged as they
      arrive, not reserved from a declared size, so a sender can only take budget with bytes it
      has really sent (four tiny frames declaring huge sizes hold a few hundred bytes, not the
      whole budget).
    - :attr:`max_stream_bytes`: one stream (topic) may hold at most one message's worth of the
      budget (``max_message_bytes`` plus the overhead of chunks of >= 1 KiB), so a sender that
      starts and abandons transfers only crowds out its own messages.
    - A chunk that would take its stream over its share, or the total over the budget, first
      drops its *own stream's* other partial messages (``superseded``: the sender moved on);
      if it still does not fit it refuses *its own* transfer (``over_budget``): the transfer is
      dropped, its bytes freed and its later chunks ignored. Other streams' transfers are never
      evicted to make room, so whoever fills the budget cannot destroy other senders' nearly
      complete messages; the refused sender's outbox resends under a new id. A message whose
      declared size alone exceeds the budget could never complete and is refused at its first
      frame.
    - ``max_message_bytes``: a declared size above it is refused at the first frame, before
      anything is buffered (``too_large``); whole and unframed payloads are held to it too.
    - ``timeout_s``: a partial message older than this (since its first frame) is dropped
      (``timeout``) by :meth:`expire`, which :meth:`feed` also runs.
    - ``max_transfers_per_key``: partial messages kept per stream (see
      :data:`MAX_TRANSFERS_PER_KEY`); a new one beyond it drops the oldest of that stream.
      Every message dropped as ``superseded`` is counted in :attr:`events` and reported, as a
      :class:`ChunkError`, by the next :meth:`expire` (the stale retained model a manifest
      replaces is only counted: that is routine).
    - ``accept_unframed``: pass payloads without the ``FLC`` magic through unchanged (peers
      that predate chunking); otherwise they are ``malformed``.

    Duplicate chunks are ignored, chunks may come in any order, and ids of recently finished
    (or failed) messages are remembered, so a QoS 1 redelivery after completion neither
    delivers the message twice nor starts a transfer that can only time out.
    """

    def __init__(
        self, max_bytes_in_flight: int, max_message_bytes: int, timeout_s: float,
        now: Callable[[], float] = time.monotonic, *, max_transfers_per_key: int = MAX_TRANSFERS_PER_KEY,
        accept_unframed: bool = True, remember_ids: int = 4096,
    ) -> None:
        if max_bytes_in_flight <= 0 or max_message_bytes <= 0 or timeout_s <= 0 or max_transfers_per_key <= 0:
            raise ValueError("limits and timeout must be positive")
        self.max_bytes_in_flight = max_bytes_in_flight
        self.max_message_bytes = max_message_bytes
        self.max_stream_bytes = min(max_bytes_in_flight, max_message_bytes + max_message_bytes // STREAM_SHARE_SLACK)
        self.timeout_s = timeout_s
        self.now = now
        self.max_transfers_per_key = max_transfers_per_key
        self.accept_unframed = accept_unframed
        self.remember_ids = remember_ids
        self.errors: Counter[str] = Counter()
        self.events: Counter[str] = Counter()
        self._transfers: dict[tuple[str, bytes], _Transfer] = {}  # insertion order = start order
        # ids no longer in progress -> "done" / "failed" / "refused": later frames are ignored
        self._finished: OrderedDict[tuple[str, bytes], str] = OrderedDict()
        self._buffered = 0  # chunk data bytes held by all partial messages
        self._charged = 0  # the same plus CHUNK_OVERHEAD per chunk (what the budget counts)
        self._stream_charged: dict[str, int] = {}  # stream -> its part of _charged (no zeros kept)
        self._reports: list[ChunkError] = []  # superseded messages, until expire() returns them
        self._lock = threading.Lock()

    # -- introspection ----------------------------------------------------------------------
    @property
    def bytes_in_flight(self) -> int:
        """Chunk data bytes held by the partial messages."""
        return self._buffered

    @property
    def bytes_charged(self) -> int:
        """What the budget counts: :attr:`bytes_in_flight` plus :data:`CHUNK_OVERHEAD` per chunk."""
        return self._charged

    def stream_bytes_charged(self, key: str) -> int:
        """The part of :attr:`bytes_charged` held by one stream (never over :attr:`max_stream_bytes`)."""
        with self._lock:
            return self._stream_charged.get(stream_key(key), 0)

    @property
    def bytes_buffered(self) -> int:
        """Chunk bytes actually held, summed over the transfers (equals :attr:`bytes_in_flight`)."""
        with self._lock:
            return sum(t.received for t in self._transfers.values())

    @property
    def partial_count(self) -> int:
        return len(self._transfers)

    # -- API --------------------------------------------------------------------------------
    def feed(self, key: str, frame: bytes) -> bytes | None:
        """Take one received payload; return a whole message when one is complete, else None.

        ``key`` is the topic it arrived on (``<base>/chunk/<i>`` is mapped to ``<base>``, see
        :func:`stream_key`), so streams of different senders never mix. An empty payload (a
        deleted retained chunk) is ignored. Raises :class:`ChunkError` for a bad frame; the
        error is counted in :attr:`errors` by reason.
        """
        key = stream_key(key)
        with self._lock:
            self._expire_locked()
            try:
                return self._feed_locked(key, frame)
            except ChunkError as exc:
                exc.key = key
                self.errors[exc.reason] += 1
                raise

    def expire(self) -> list[ChunkError]:
        """Drop partial messages older than ``timeout_s``; return one ``timeout`` error each,
        preceded by a ``superseded`` error for each message its own stream displaced since the
        last call (at most :data:`MAX_REPORTS`)."""
        with self._lock:
            reports, self._reports = self._reports, []
            return reports + self._expire_locked()

    # -- internals --------------------------------------------------------------------------
    def _expire_locked(self) -> list[ChunkError]:
        dropped: list[ChunkError] = []
        cutoff = self.now() - self.timeout_s
        for tid, transfer in list(self._transfers.items()):
            if transfer.started > cutoff:
                break  # later transfers started later
            self._drop(tid, "failed")
            missing = transfer.header.count - len(transfer.chunks)
            dropped.append(ChunkError(
                TIMEOUT, f"message {transfer.header.id.hex()[:8]} incomplete after {self.timeout_s:g}s "
                f"({missing} of {transfer.header.count} chunks missing)", transfer.key))
            self.errors[TIMEOUT] += 1
        return dropped

    def _drop(self, tid: tuple[str, bytes], outcome: str) -> None:
        transfer = self._transfers.pop(tid)
        self._buffered -= transfer.received
        self._charged -= transfer.charged
        if transfer.charged:
            left = self._stream_charged[transfer.key] - transfer.charged
            if left:
                self._stream_charged[transfer.key] = left
            else:
                del self._stream_charged[transfer.key]  # no entry per idle topic
        self._remember(tid, outcome)

    def _supersede(self, tid: tuple[str, bytes], why: str | None) -> None:
        """Drop a partial message whose stream moved on; report it (``why``) unless routine."""
        transfer = self._transfers[tid]
        self._drop(tid, "failed")
        self.events["superseded"] += 1
        if why is not None and len(self._reports) < MAX_REPORTS:  # bounded: a hog may cause many
            header = transfer.header
            self._reports.append(ChunkError(
                SUPERSEDED, f"message {header.id.hex()[:8]} dropped with {len(transfer.chunks)} of "
                f"{header.count} chunks in: {why}", transfer.key))

    def _fits(self, key: str, cost: int) -> bool:
        return (self._charged + cost <= self.max_bytes_in_flight
                and self._stream_charged.get(key, 0) + cost <= self.max_stream_bytes)

    def _make_room(self, tid: tuple[str, bytes], header: Header, cost: int) -> None:
        """Make ``cost`` fit: drop the stream's other partials, else refuse this transfer."""
        key = tid[0]
        if self._fits(key, cost):
            return  # the usual case: no scan of the transfers
        for other in [t for t in self._transfers if t[0] == key and t != tid]:  # oldest first
            self._supersede(other, "a newer message on its stream needed the room")
            if self._fits(key, cost):
                return
        stream = self._stream_charged.get(key, 0)
        if stream + cost > self.max_stream_bytes:
            where = f"its stream's share ({stream} of {self.max_stream_bytes} bytes charged)"
        else:
            where = f"the reassembly budget ({self._charged} of {self.max_bytes_in_flight} bytes charged)"
        # Refuse the transfer this chunk belongs to rather than evict another stream's.
        self._drop(tid, "refused")
        raise ChunkError(OVER_BUDGET, f"chunk {header.index} of message {header.id.hex()[:8]} ({header.size} "
                                      f"bytes in {header.count} chunks, charged {CHUNK_OVERHEAD} bytes each on "
                                      f"top of their data) would exceed {where}")

    def _remember(self, tid: tuple[str, bytes], outcome: str) -> None:
        self._finished[tid] = outcome
        self._finished.move_to_end(tid)
        while len(self._finished) > self.remember_ids:
            self._finished.popitem(last=False)

    def _check_size(self, size: int) -> None:
        if size > self.max_message_bytes:
            raise ChunkError(TOO_LARGE, f"message of {size} bytes exceeds the limit of {self.max_message_bytes}")

    def _feed_locked(self, key: str, frame: bytes) -> bytes | None:
        if len(frame) == 0:
            self.events["empty"] += 1
            return None
        kind, data, header = _parse_view(frame)
        if kind in ("whole", "unframed"):
            if kind == "unframed" and not self.accept_unframed:
                raise ChunkError(MALFORMED, "payload is not a chunking frame (no FLC1 magic)")
            self._check_size(len(data))
            self.events[kind] += 1
            if kind == "unframed" and type(frame) is bytes:
                return frame  # as it came: no copy
            return bytes(data)  # the one copy: strips the 5-byte FLC1W prefix
        assert header is not None
        tid = (key, header.id)
        if kind == "manifest":
            self.events["manifest"] += 1
            # A sender publishes a message's chunks before its manifest, so partial messages of
            # other ids on this stream are stale (an older retained model): free them now.
            for other in [t for t in self._transfers if t[0] == key and t != tid]:
                self._supersede(other, None)
        outcome = self._finished.get(tid)
        if outcome is not None:
            self.events[f"ignored_{outcome}"] += 1  # e.g. a QoS 1 redelivery after completion
            return None
        transfer = self._transfers.get(tid)
        if transfer is None:
            try:
                transfer = self._start(key, header)
            except ChunkError:
                self._remember(tid, "refused")  # its other chunks are ignored, not counted again
                raise
        elif not transfer.header.same_message(header):
            raise ChunkError(INCONSISTENT, f"header of message {header.id.hex()[:8]} differs from its earlier chunks")
        if kind == "manifest":
            return None  # the transfer now exists: if its chunks never come, it times out
        previous = transfer.chunks.get(header.index)
        if previous is not None:
            if previous != data:
                raise ChunkError(INCONSISTENT, f"chunk {header.index} of message {header.id.hex()[:8]} "
                                               "arrived twice with different bytes")
            self.events["duplicate"] += 1
            return None
        held: bytes | memoryview
        if len(data) >= HOLD_VIEW_MIN and type(frame) is bytes:
            held = data  # keeps the frame alive: charge its header bytes and the view too
            cost = len(frame) + CHUNK_OVERHEAD + VIEW_OVERHEAD
        else:
            held = bytes(data)
            cost = len(data) + CHUNK_OVERHEAD
        self._make_room(tid, header, cost)
        chunks = transfer.chunks
        chunks[header.index] = held
        transfer.received += len(data)
        transfer.charged += cost
        self._buffered += len(data)
        self._charged += cost
        self._stream_charged[key] = self._stream_charged.get(key, 0) + cost
        self.events["chunks"] += 1
        if transfer.hashed in chunks:
            if transfer.hasher is None:
                transfer.hasher = hashlib.sha256()
            while transfer.hashed in chunks:  # in order so far: hash what is now contiguous
                transfer.hasher.update(chunks[transfer.hashed])
                transfer.hashed += 1
        if len(chunks) < header.count:
            return None
        # All chunks are in, so all were hashed in order above (hashed == count).
        ok = transfer.hasher.digest() == header.sha256
        message = b"".join([chunks[i] for i in range(header.count)]) if ok else b""
        chunks.clear()
        self._drop(tid, "done" if ok else "failed")
        if not ok:
            raise ChunkError(DIGEST_MISMATCH, f"message {header.id.hex()[:8]} ({header.size} bytes, "
                                              f"{header.count} chunks) does not match its SHA-256")
        self.events["completed"] += 1
        return message

    def _start(self, key: str, header: Header) -> _Transfer:
        # Nothing is reserved here: the declared size is only checked against the limits, and
        # the budget is charged chunk by chunk as bytes arrive (see _feed_locked).
        self._check_size(header.size)
        if header.size > self.max_bytes_in_flight:
            raise ChunkError(OVER_BUDGET, f"message of {header.size} bytes can never fit the reassembly budget "
                                          f"of {self.max_bytes_in_flight} bytes")
        same_key = [t for t in self._transfers if t[0] == key]
        for old in same_key[:max(0, len(same_key) - self.max_transfers_per_key + 1)]:
            # The sender gave up on those (e.g. it restarted): keep its newest.
            self._supersede(old, f"its stream started a newer one (at most {self.max_transfers_per_key} "
                                 "partial messages per stream)")
        transfer = _Transfer(key, header, self.now())
        self._transfers[(key, header.id)] = transfer
        return transfer
