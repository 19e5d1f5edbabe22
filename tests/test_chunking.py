"""Chunking: pure tests of split/Reassembler, and a real mosquitto with a small max_packet_size."""

from __future__ import annotations

import hashlib
import os
import queue
import random
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import msgpack
import paho.mqtt.client as paho
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from manual_clock import ManualClock
from paho.mqtt.enums import CallbackAPIVersion

from federation.chunking import (
    CHUNK_OVERHEAD,
    HOLD_VIEW_MIN,
    MIN_MAX_PAYLOAD,
    VIEW_OVERHEAD,
    ChunkError,
    Header,
    Reassembler,
    chunk_count,
    chunk_topic,
    parse_frame,
    retained_topics,
    split,
    stream_key,
)
from tests.conftest import Mosquitto


def make(budget: int = 10 << 20, limit: int = 8 << 20, timeout: float = 30.0,
         clock: Callable[[], float] | None = None, **kw: int | bool) -> Reassembler:
    return Reassembler(budget, limit, timeout, clock or ManualClock(), **kw)  # type: ignore[arg-type]


def feed_all(r: Reassembler, key: str, frames: list[bytes]) -> list[bytes]:
    return [out for frame in frames if (out := r.feed(key, frame)) is not None]


def reason_of(call: Callable[[], object]) -> str:
    with pytest.raises(ChunkError) as info:
        call()
    return info.value.reason


def chunk_data_offset(frame: bytes) -> int:
    return 7 + int.from_bytes(frame[5:7], "big")


# -- round trips ---------------------------------------------------------------------------------

def boundary_sizes(max_payload: int) -> list[int]:
    sizes = {0, 1, max_payload - 6, max_payload - 5, max_payload - 4, max_payload, 3 * max_payload + 7}
    big = 10 * max_payload
    cs = len(parse_frame(split(os.urandom(big), max_payload)[0]).data)
    for k in (1, 2, 3, 10):
        sizes |= {cs * k - 1, cs * k, cs * k + 1}
    return sorted(s for s in sizes if s >= 0)


@pytest.mark.parametrize("max_payload", [MIN_MAX_PAYLOAD, 1000, 4096, 65536 - 1024])
def test_round_trip_sizes_and_boundaries(max_payload: int) -> None:
    r = make()
    for size in boundary_sizes(max_payload):
        message = os.urandom(size)
        frames = split(message, max_payload)
        assert all(len(f) <= max_payload for f in frames), size
        assert len(frames) == chunk_count(size, max_payload)
        kinds = {parse_frame(f).kind for f in frames}
        assert kinds == ({"whole"} if size + 5 <= max_payload else {"chunk"})
        results = [r.feed("t/x", f) for f in frames]
        assert results[-1] == message and all(x is None for x in results[:-1]), size
    assert r.partial_count == 0 and r.bytes_in_flight == 0 and not r.errors


def test_chunk_frames_fill_the_limit() -> None:
    frames = split(os.urandom(1 << 20), 64512)
    assert max(len(f) for f in frames) > 64512 - 32  # the worst-case header estimate wastes little
    overhead = sum(map(len, frames)) - (1 << 20)
    assert overhead / (1 << 20) < 0.002


def test_out_of_order_and_duplicated_frames() -> None:
    rng = random.Random(5)
    message = os.urandom(50_000)
    frames = split(message, 1000)
    order = frames + rng.sample(frames, 20)  # QoS 1 redeliveries, before and after completion
    rng.shuffle(order)
    r = make()
    assert feed_all(r, "t/a", order) == [message]
    assert r.events["completed"] == 1 and r.events["duplicate"] + r.events["ignored_done"] == 20
    assert r.partial_count == 0 and not r.errors


def test_streams_on_different_keys_never_mix() -> None:
    a, b = os.urandom(20_000), os.urandom(30_000)
    fa, fb = split(a, 1000), split(b, 1000)
    r = make()
    got: dict[str, list[bytes]] = {"dev-a": [], "dev-b": []}
    for i in range(max(len(fa), len(fb))):
        for key, frames in (("dev-a", fa), ("dev-b", fb)):
            if i < len(frames) and (out := r.feed(key, frames[i])) is not None:
                got[key].append(out)
    assert got == {"dev-a": [a], "dev-b": [b]}
    # The same chunks under another key are another transfer, never completed by dev-a's.
    r2 = make()
    assert r2.feed("dev-a", fa[0]) is None and r2.feed("dev-b", fa[1]) is None
    assert r2.partial_count == 2


# -- failures ------------------------------------------------------------------------------------

def test_missing_chunk_times_out_and_frees_memory() -> None:
    clock = ManualClock()
    r = make(timeout=10.0, clock=clock)
    frames = split(os.urandom(40_000), 1000)
    missing = frames.pop(17)
    assert feed_all(r, "t/a", frames) == []
    held = 40_000 - len(parse_frame(missing).data)  # what actually arrived, not the declared size
    assert r.bytes_in_flight == r.bytes_buffered == held and r.partial_count == 1
    clock.t += 9.9
    assert r.expire() == []
    clock.t += 0.2
    expired = r.expire()
    assert [e.reason for e in expired] == ["timeout"] and expired[0].key == "t/a"
    assert "1 of" in str(expired[0]) and "t/a" in str(expired[0])
    assert r.errors["timeout"] == 1 and r.bytes_in_flight == 0 and r.partial_count == 0
    # The late chunk neither completes anything nor starts a transfer that could only time out.
    assert r.feed("t/a", missing) is None and r.partial_count == 0


def test_feed_expires_lazily() -> None:
    clock = ManualClock()
    r = make(budget=50_000, timeout=5.0, clock=clock)
    assert feed_all(r, "t/a", split(os.urandom(40_000), 1000)[:-1]) == []  # ~39 KB really buffered
    frames = split(os.urandom(40_000), 1000)
    fits = (50_000 - r.bytes_charged) // (len(parse_frame(frames[0]).data) + CHUNK_OVERHEAD)
    assert fits >= 3 and feed_all(r, "t/b", frames[:fits]) == []  # chunks are charged as they arrive
    assert reason_of(lambda: r.feed("t/b", frames[fits])) == "over_budget"  # this one would not fit
    clock.t += 6
    fresh = os.urandom(40_000)
    assert feed_all(r, "t/b", split(fresh, 1000)) == [fresh]  # the stale transfer was dropped first
    assert r.errors == {"over_budget": 1, "timeout": 1} and r.bytes_in_flight == 0


def test_corrupt_chunk_is_digest_mismatch() -> None:
    message = os.urandom(30_000)
    frames = split(message, 1000)
    bad = bytearray(frames[5])
    bad[chunk_data_offset(frames[5]) + 10] ^= 0x01
    frames[5] = bytes(bad)
    r = make()
    with pytest.raises(ChunkError) as info:
        feed_all(r, "t/a", frames)
    assert info.value.reason == "digest_mismatch" and info.value.key == "t/a"
    assert r.errors == {"digest_mismatch": 1} and r.bytes_in_flight == 0
    # A resend under a new id (the sender's outbox) goes through.
    assert feed_all(r, "t/a", split(message, 1000)) == [message]


def test_declared_size_over_limit_rejected_at_first_frame() -> None:
    r = make(limit=10_000)
    frames = split(os.urandom(50_000), 1000)
    assert reason_of(lambda: r.feed("t/a", frames[3])) == "too_large"
    assert r.bytes_in_flight == 0 and r.bytes_buffered == 0 and r.partial_count == 0
    assert feed_all(r, "t/a", frames) == []  # the rest of that message is ignored, not re-counted
    assert r.errors == {"too_large": 1}
    # A forged header claiming a huge size allocates nothing.
    head = msgpack.packb({"id": b"x" * 16, "i": 0, "n": 1 << 20, "cs": 1 << 20, "size": 1 << 40,
                          "sha256": b"\0" * 32})
    forged = b"FLC1C" + len(head).to_bytes(2, "big") + head + b"y" * (1 << 20)
    assert reason_of(lambda: r.feed("t/b", forged)) == "too_large"
    # Whole and unframed payloads are held to the same limit.
    assert reason_of(lambda: r.feed("t/c", split(b"z" * 10_001, 1 << 20)[0])) == "too_large"
    assert reason_of(lambda: r.feed("t/c", b"\x85" + b"z" * 10_000)) == "too_large"


def test_bounded_memory_under_many_concurrent_partial_transfers() -> None:
    clock = ManualClock()
    budget = 1_000_000
    r = make(budget=budget, limit=200_000, timeout=20.0, clock=clock)
    messages = {f"fleet/update/dev-{k}": os.urandom(100_000) for k in range(200)}
    split_frames = {key: split(m, 4096) for key, m in messages.items()}
    count = len(next(iter(split_frames.values())))
    # 200 senders interleave their chunks: 20 MB offered against a 1 MB budget.
    done: dict[str, bytes] = {}
    refused: list[str] = []
    for i in range(count):
        for key, frames in split_frames.items():
            try:
                if (out := r.feed(key, frames[i])) is not None:
                    done[key] = out
            except ChunkError as exc:
                assert exc.reason == "over_budget"
                refused.append(key)
            assert r.bytes_buffered == r.bytes_in_flight <= r.bytes_charged <= budget
    # Every sender either completed or was refused once (the chunk over budget refuses its own
    # transfer; its later chunks are ignored, not counted again); nothing is left half-held.
    assert len(refused) == len(set(refused)) == r.errors["over_budget"] and not set(refused) & set(done)
    assert len(done) + len(refused) == 200 and len(done) >= budget // (100_000 + count * CHUNK_OVERHEAD)
    assert all(done[key] == messages[key] for key in done)
    assert r.partial_count == 0 and r.bytes_in_flight == 0 and r.events["ignored_refused"] > 0
    # A refused sender's resend (the outbox draws a new id) goes through.
    fresh = os.urandom(100_000)
    assert feed_all(r, refused[0], split(fresh, 4096)) == [fresh]


def test_chunk_over_budget_refuses_its_own_transfer_not_older_ones() -> None:
    r = make(budget=30_000, limit=30_000)
    a, b = os.urandom(20_000), os.urandom(20_000)
    fa, fb = split(a, 1000), split(b, 1000)
    cs = len(parse_frame(fa[0]).data)
    charge = cs + CHUNK_OVERHEAD  # what each chunk costs the budget
    na = 12
    nb = (30_000 - na * charge) // charge  # b then fills the budget to within one chunk
    assert feed_all(r, "t/a", fa[:na]) == [] and feed_all(r, "t/b", fb[:nb]) == []
    before = r.bytes_charged
    assert before == (na + nb) * charge <= 30_000 < before + charge
    assert r.bytes_in_flight == (na + nb) * cs
    # The chunk that would go over refuses the transfer it belongs to (here the older one, a)...
    assert reason_of(lambda: r.feed("t/a", fa[na])) == "over_budget"
    assert r.partial_count == 1 and r.bytes_in_flight == r.bytes_buffered == nb * cs
    assert feed_all(r, "t/a", fa) == [] and r.errors == {"over_budget": 1}  # rest of a: ignored
    # ...and b, which was not evicted, completes.
    assert feed_all(r, "t/b", fb[nb:]) == [b] and r.bytes_in_flight == 0
    # A declared size that could never fit the budget is refused at once, holding nothing.
    big = split(os.urandom(30_001), 1000)
    r2 = make(budget=30_000, limit=100_000)
    assert reason_of(lambda: r2.feed("t/c", big[7])) == "over_budget" and r2.partial_count == 0
    assert feed_all(r2, "t/c", big) == [] and r2.errors == {"over_budget": 1}


def forged_chunk(declared: int, index: int = 0, cs: int = 200) -> bytes:
    """A ~300-byte chunk frame whose header claims a ``declared``-byte message."""
    head = msgpack.packb({"id": os.urandom(16), "i": index, "n": -(-declared // cs), "cs": cs,
                          "size": declared, "sha256": os.urandom(32)})
    return b"FLC1C" + len(head).to_bytes(2, "big") + head + os.urandom(cs)


def test_tiny_frames_declaring_huge_sizes_do_not_take_the_budget() -> None:
    """The attack: frames of ~300 bytes, each declaring max_message_bytes, on two update topics.

    With the budget charged from declared sizes, four of them reserved 4 x 64 MB (the whole
    budget the MQTT client uses) and every genuine chunked update was refused as over_budget
    until they timed out. Now they hold only the bytes really sent.
    """
    limit = 64 << 20
    clock = ManualClock()
    r = make(budget=4 * limit, limit=limit, timeout=30.0, clock=clock)  # as federation.mqtt builds it
    for round_ in range(3):  # the attacker simply repeats (new ids supersede its own old ones)
        for topic in ("fleet/update/evil-1", "fleet/update/evil-2"):
            for _ in range(2):
                frame = forged_chunk(limit)
                assert len(frame) < 400 and r.feed(topic, frame) is None
        assert r.partial_count == 4
        message = os.urandom(5 << 20)
        frames = split(message, 65536 - 1024)
        assert feed_all(r, f"fleet/update/dev-{round_}/chunk/0", frames) == [message]
        assert r.bytes_in_flight == r.bytes_buffered == 4 * 200  # only what the attacker sent
        clock.t += 1
    assert not r.errors and r.events["completed"] == 3
    # Forged chunks on many topics still hold only their bytes; a genuine update completes.
    for k in range(100):
        r.feed(f"fleet/update/evil-{k}", forged_chunk(limit))
    assert r.bytes_in_flight <= 104 * 200
    message = os.urandom(1 << 20)
    assert feed_all(r, "fleet/update/dev-x", split(message, 4096)) == [message]
    # A sender can only fill the budget with bytes it really sends; even then, a full budget
    # refuses the newcomer and leaves the transfers in progress alone.
    small = make(budget=50_000 + 40 * CHUNK_OVERHEAD, limit=40_000)  # data + per-chunk overhead
    assert small.feed("t/evil", forged_chunk(40_000, cs=10_000)) is None
    assert small.bytes_in_flight == 10_000
    assert feed_all(small, "t/dev", split(message[:35_000], 1000)) == [message[:35_000]]


def test_one_stream_keeps_at_most_max_transfers_per_key() -> None:
    r = make(max_transfers_per_key=2)
    firsts = [split(os.urandom(20_000), 1000)[0] for _ in range(3)]
    for frame in firsts:
        r.feed("t/a", frame)
    held = sum(len(parse_frame(f).data) for f in firsts[1:])  # the superseded one's bytes are freed
    assert r.partial_count == 2 and r.events["superseded"] == 1 and r.bytes_in_flight == held


# -- fairness between streams and real memory ----------------------------------------------------

def chunks_of(size: int, cs: int) -> tuple[bytes, list[bytes]]:
    """A random message and valid frames of it in ``cs``-byte chunks (split() never goes this small)."""
    message, ident = os.urandom(size), os.urandom(16)
    digest, n = hashlib.sha256(message).digest(), -(-size // cs)
    frames = []
    for i in range(n):
        head = msgpack.packb({"id": ident, "i": i, "n": n, "cs": cs, "size": size, "sha256": digest})
        frames.append(b"FLC1C" + len(head).to_bytes(2, "big") + head + message[i * cs:(i + 1) * cs])
    return message, frames


@pytest.mark.parametrize(("hog_topics", "budget_factor"), [
    (["fleet/update/evil"], 2),
    # One device on every topic it may write, with the budget MqttLink uses (4 x max).
    (["fleet/update/evil", "fleet/register/evil", "fleet/presence/evil"], 4),
])
def test_a_stream_abandoning_transfers_cannot_fail_another_streams_message(hog_topics: list[str],
                                                                           budget_factor: int) -> None:
    """The hog starts max-size messages and never finishes them, round after round.

    With one budget shared by all, its partials (2 per topic) filled it and every other
    sender's chunked message was refused as over_budget until they timed out. Now a stream
    holds at most its share, the hog's newer message displaces its own older one, and the
    displaced ones are reported.
    """
    limit = 200_000
    clock = ManualClock()
    r = make(budget=budget_factor * limit, limit=limit, timeout=30.0, clock=clock)
    for round_ in range(4):
        for topic in hog_topics:
            for frame in split(os.urandom(limit), 4096)[:-1]:  # all but the last chunk
                assert r.feed(topic, frame) is None
            assert r.stream_bytes_charged(topic) <= r.max_stream_bytes < 1.2 * limit
        message = os.urandom(80_000)
        assert feed_all(r, f"fleet/update/dev-{round_}", split(message, 4096)) == [message]
        assert r.bytes_charged <= r.max_bytes_in_flight
        clock.t += 1
    reports = r.expire()  # what MqttLink logs: each of the hog's displaced messages
    assert len(reports) == 3 * len(hog_topics) and {e.reason for e in reports} == {"superseded"}
    assert {e.key for e in reports} == set(hog_topics) and not r.errors
    assert r.partial_count == len(hog_topics)  # only the hog's latest, never completed


def test_a_streams_new_transfer_evicts_its_own_stale_one() -> None:
    """A sender that restarts mid-message leaves a partial one behind; its new message displaces
    that one (never another stream's) and the displaced one is reported."""
    r = make(budget=200_000, limit=100_000)
    other = os.urandom(60_000)
    fo = split(other, 4096)
    assert feed_all(r, "fleet/update/dev-b", fo[:8]) == []  # another device, halfway through
    stale = split(os.urandom(100_000), 4096)
    assert feed_all(r, "fleet/update/dev-a", stale[:-3]) == []  # dev-a restarts before the end
    fresh = os.urandom(100_000)  # a max-size message in 4 KB chunks fits its stream's share
    # Both of dev-a's would exceed its share (and with dev-b's, the budget): the stale one goes.
    assert feed_all(r, "fleet/update/dev-a", split(fresh, 4096)) == [fresh]
    reports = r.expire()
    assert [(e.reason, e.key) for e in reports] == [("superseded", "fleet/update/dev-a")]
    assert f"{len(stale) - 3} of {len(stale)} chunks" in str(reports[0])
    assert feed_all(r, "fleet/update/dev-a", stale[-3:]) == [] and r.partial_count == 1  # late: ignored
    assert feed_all(r, "fleet/update/dev-b", fo[8:]) == [other]
    assert r.partial_count == 0 and r.bytes_charged == 0 and not r.errors
    # A new message on a stream that already has max_transfers_per_key partials evicts its oldest.
    messages = [os.urandom(20_000) for _ in range(3)]
    frames = [split(m, 4096) for m in messages]
    for f in frames:
        assert r.feed("fleet/update/dev-c", f[0]) is None
    reports = r.expire()
    assert [(e.reason, e.key) for e in reports] == [("superseded", "fleet/update/dev-c")]
    oldest = parse_frame(frames[0][0]).header
    assert oldest is not None and oldest.id.hex()[:8] in str(reports[0])
    assert feed_all(r, "fleet/update/dev-c", frames[0][1:]) == []  # the evicted one is ignored
    assert feed_all(r, "fleet/update/dev-c", frames[1][1:] + frames[2][1:]) == messages[1:]
    assert r.partial_count == 0 and not r.errors


def test_tiny_chunks_exhaust_the_budget_by_their_overhead() -> None:
    """Each chunk is charged its bytes plus CHUNK_OVERHEAD: tiny chunks hit the budget early.

    Counting data alone, 10 KB in 10-byte chunks took a fifth of a 50 KB budget while holding
    ~125 KB of Python objects.
    """
    budget = 50_000
    r = make(budget=budget, limit=1 << 20)
    _, frames = chunks_of(10_000, 10)
    fits = budget // (10 + CHUNK_OVERHEAD)
    assert fits < len(frames) and feed_all(r, "t/tiny", frames[:fits]) == []
    assert r.bytes_in_flight == 10 * fits and r.bytes_charged == fits * (10 + CHUNK_OVERHEAD)
    assert r.stream_bytes_charged("t/tiny/chunk/3") == r.bytes_charged
    assert reason_of(lambda: r.feed("t/tiny", frames[fits])) == "over_budget"
    assert r.partial_count == 0 and r.bytes_charged == 0 and r.bytes_in_flight == 0
    assert feed_all(r, "t/tiny", frames) == []  # the refused message's other chunks are ignored
    # The same data in real-sized chunks goes through.
    message = os.urandom(10_000)
    assert feed_all(r, "t/tiny", split(message, 1000)) == [message]

    # The charge bounds what the chunks really take: 20 streams of 8-byte chunks, never completed.
    budget = 200_000
    r = make(budget=budget, limit=1 << 20)
    streams = [chunks_of(3200, 8)[1][:-1] for _ in range(20)]
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        for k, frames in enumerate(streams):
            for frame in frames:
                try:
                    r.feed(f"t/{k}", frame)
                except ChunkError as exc:
                    assert exc.reason == "over_budget"
        grown = tracemalloc.get_traced_memory()[0] - start
    finally:
        tracemalloc.stop()
    assert r.bytes_charged <= budget and r.errors["over_budget"] > 0
    assert grown <= budget  # about 0.6 x here; counting data alone it was 4 x the budget


# -- large chunks: held as views into the received frames, copied once --------------------------

BIG_PAYLOAD = 65536 - 1024  # chunks of ~64 KB, above HOLD_VIEW_MIN


def test_large_chunks_any_order_duplicates_tampering_and_their_charge() -> None:
    rng = random.Random(7)
    message = os.urandom(1 << 20)
    frames = split(message, BIG_PAYLOAD)
    assert len(parse_frame(frames[0]).data) >= HOLD_VIEW_MIN and len(frames) > 10
    order = frames + rng.sample(frames, 6)  # redeliveries, before and after completion
    rng.shuffle(order)
    r = make()
    assert feed_all(r, "t/a", order) == [message]
    assert r.events["completed"] == 1 and r.events["duplicate"] + r.events["ignored_done"] == 6
    assert r.partial_count == 0 and r.bytes_charged == 0 and not r.errors

    # Held chunks are charged their whole frame plus the view, on top of CHUNK_OVERHEAD.
    r = make()
    assert feed_all(r, "t/a", frames[:3]) == []
    data = sum(len(parse_frame(f).data) for f in frames[:3])
    assert r.bytes_in_flight == data
    assert r.bytes_charged == sum(len(f) + CHUNK_OVERHEAD + VIEW_OVERHEAD for f in frames[:3])
    # The same index again with other bytes is refused; a flipped bit anywhere fails the digest.
    bad = bytearray(frames[1])
    bad[-1] ^= 0x01
    assert reason_of(lambda: r.feed("t/a", bytes(bad))) == "inconsistent"
    for position in (0, len(frames) - 1):  # hashed as they arrive in order / at the end
        tampered = list(frames)
        flipped = bytearray(tampered[position])
        flipped[chunk_data_offset(tampered[position]) + 5] ^= 0x80
        tampered[position] = bytes(flipped)
        r = make()
        with pytest.raises(ChunkError) as info:
            feed_all(r, "t/b", list(reversed(tampered)) if position else tampered)
        assert info.value.reason == "digest_mismatch"
        assert r.partial_count == 0 and r.bytes_charged == 0 and r.bytes_in_flight == 0


def test_large_chunks_fed_as_mutable_buffers_are_copied() -> None:
    """A view is held only into immutable bytes: a caller reusing its buffer corrupts nothing."""
    message = os.urandom(300_000)
    frames = [bytearray(f) for f in split(message, BIG_PAYLOAD)]
    r = make()
    for frame in frames[:-1]:
        assert r.feed("t/a", frame) is None  # type: ignore[arg-type]
        frame[:] = b"\0" * len(frame)  # a view held into it would now see zeros
    assert r.feed("t/a", frames[-1]) == message  # type: ignore[arg-type]


def test_large_chunks_real_memory_stays_within_the_charge() -> None:
    """Holding views keeps whole frames alive: the charge must still bound what they take."""
    budget = 3_000_000
    r = make(budget=budget, limit=400_000)
    # Chunks just above HOLD_VIEW_MIN: the most frames, and so the most views, per byte held.
    messages = [split(os.urandom(400_000), HOLD_VIEW_MIN + 1024)[:-1] for _ in range(12)]  # never completed
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        for k, frames in enumerate(messages):
            for frame in frames:
                received = bytes(bytearray(frame))  # a fresh object, as paho hands over each payload
                try:
                    r.feed(f"t/{k}", received)
                except ChunkError as exc:
                    assert exc.reason == "over_budget"
                del received
        grown = tracemalloc.get_traced_memory()[0] - start
    finally:
        tracemalloc.stop()
    assert r.bytes_charged <= budget and r.errors["over_budget"] > 0
    # Each partial message also has its _Transfer, hasher and ids (~2 KB, not charged, as before);
    # not charging the frames' headers and views, this was ~70 KB over.
    assert grown <= r.bytes_charged + 3072 * r.partial_count, (grown, r.bytes_charged)


def test_inconsistent_and_malformed_frames() -> None:
    r = make()
    frames = split(os.urandom(20_000), 1000)
    r.feed("t/a", frames[0])
    # Same id, different description.
    f1 = parse_frame(frames[1])
    assert f1.header is not None
    head = msgpack.packb({"id": f1.header.id, "i": 1, "n": 40, "cs": 500, "size": 20_000, "sha256": b"\0" * 32})
    other = b"FLC1C" + len(head).to_bytes(2, "big") + head + b"q" * 500
    assert reason_of(lambda: r.feed("t/a", other)) == "inconsistent"
    # Same chunk again with other bytes.
    bad = bytearray(frames[0])
    bad[-1] ^= 0xFF
    assert reason_of(lambda: r.feed("t/a", bytes(bad))) == "inconsistent"
    malformed = [
        b"FLC1", b"FLC1C", b"FLC1C\x00", b"FLC1Q" + b"x" * 10, b"FLC1C\xff\xff" + b"x" * 100,
        frames[0][:-1], frames[0] + b"x",  # data length does not match the header
        b"FLC1C\x00\x03\x93\x01\x02",  # header is not a map
        b"FLC1M" + frames[0][5:],  # a manifest with data
    ]
    for frame in malformed:
        with pytest.raises(ChunkError) as info:
            r.feed("t/m", frame)
        assert info.value.reason == "malformed", frame[:12]
    assert reason_of(lambda: r.feed("t/m", b"FLC2W hello")) == "unsupported_version"
    assert r.errors["malformed"] == len(malformed) and r.errors["inconsistent"] == 2
    # Payloads of peers that predate chunking pass through (or are refused if so configured).
    assert r.feed("t/m", b"\x86legacy") == b"\x86legacy"
    assert reason_of(lambda: make(accept_unframed=False).feed("t/m", b"\x86legacy")) == "malformed"
    # An empty payload (a deleted retained chunk) is ignored.
    assert r.feed("t/m/chunk/3", b"") is None and r.events["empty"] == 1


# -- retained messages ---------------------------------------------------------------------------

def test_retained_topics_layout_and_stale_chunk_cleanup() -> None:
    frames = split(os.urandom(10_000), 1000)
    n = len(frames)
    pubs = retained_topics("f/model/global", frames, previous_count=n + 3)
    assert [t for t, _ in pubs[:n]] == [chunk_topic("f/model/global", i) for i in range(n)]
    assert pubs[n:n + 3] == [(f"f/model/global/chunk/{i}", b"") for i in range(n, n + 3)]
    topic, manifest = pubs[-1]
    assert topic == "f/model/global" and parse_frame(manifest).kind == "manifest"
    first = parse_frame(frames[0]).header
    assert first is not None
    assert parse_frame(manifest).header == Header(first.id, n, first.chunk_size, first.size, first.sha256)
    # A model that now fits one frame: the whole frame on the base topic, old chunks deleted.
    whole = split(b"small", 1000)
    assert retained_topics("f/m", whole, previous_count=2) == [("f/m/chunk/0", b""), ("f/m/chunk/1", b""),
                                                               ("f/m", whole[0])]
    assert stream_key("f/m/chunk/12") == "f/m" and stream_key("f/m/chunky/1") == "f/m/chunky/1"
    with pytest.raises(ValueError):
        retained_topics("f/m", frames[:-1])


def test_retained_delivery_in_any_order_with_stale_chunks() -> None:
    """A new subscriber gets the retained manifest, current chunks and stale ones, in any order."""
    rng = random.Random(7)
    clock = ManualClock()
    old, new = os.urandom(30_000), os.urandom(12_000)
    old_pubs = retained_topics("f/model", split(old, 1000))
    new_pubs = retained_topics("f/model", split(new, 1000))
    retained = dict(old_pubs)
    retained.update(new_pubs)  # without cleanup: stale old chunks stay on the higher indices
    for _ in range(20):
        r = make(timeout=10, clock=clock)
        items = list(retained.items())
        rng.shuffle(items)
        assert [m for t, p in items if (m := r.feed(t, p)) is not None] == [new]
        clock.t += 11
        r.expire()
        assert r.partial_count == 0 and r.bytes_in_flight == 0
    # With the manifest seen last (the publish order), stale partials are dropped at once.
    r = make(clock=clock)
    stale = [(t, p) for t, p in old_pubs[-5:-1]]
    got = [m for t, p in stale + new_pubs if (m := r.feed(t, p)) is not None]
    assert got == [new] and r.partial_count == 0 and r.events["superseded"] == 1


def test_manifest_without_its_chunks_times_out() -> None:
    clock = ManualClock()
    r = make(timeout=5, clock=clock)
    pubs = retained_topics("f/model", split(os.urandom(9000), 1000))
    assert r.feed(*pubs[-1]) is None and r.partial_count == 1
    assert r.bytes_in_flight == 0  # a manifest carries no data, so it holds no budget
    clock.t += 6
    assert [e.reason for e in r.expire()] == ["timeout"]


# -- properties ----------------------------------------------------------------------------------

@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(message=st.binary(max_size=12_000), max_payload=st.integers(MIN_MAX_PAYLOAD, 5000), rnd=st.randoms(),
       dups=st.integers(0, 10))
def test_property_split_then_feed_in_any_order(message: bytes, max_payload: int, rnd: random.Random,
                                               dups: int) -> None:
    frames = split(message, max_payload)
    assert all(len(f) <= max_payload for f in frames)
    order = frames + [rnd.choice(frames) for _ in range(dups)]
    rnd.shuffle(order)
    r = make()
    # Chunked messages come out once; a whole frame has no id, so each copy is passed on (the
    # envelope's msg_id catches replays above this layer).
    assert feed_all(r, "k", order) == [message] * (1 + dups if len(frames) == 1 else 1)
    assert r.partial_count == 0 and r.bytes_in_flight == 0 and not r.errors


@settings(max_examples=500, deadline=None)
@given(data=st.data())
def test_property_mutated_frames_only_raise_chunk_error(data: st.DataObject) -> None:
    frames = split(bytes(range(256)) * 20, 700)
    frame = bytearray(data.draw(st.sampled_from(frames)))
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(frame) - 1))
        frame[pos] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(frame)))
    r = make(budget=100_000, limit=50_000)
    try:
        out = r.feed("k", bytes(frame[:cut]))
    except ChunkError as exc:
        assert exc.reason in r.errors
    else:
        assert out is None or isinstance(out, bytes)
    assert r.bytes_in_flight <= 100_000


# -- a real broker with a packet limit -----------------------------------------------------------

LIMIT = 65536
MAX_PAYLOAD = LIMIT - 1024  # room for the MQTT fixed header, topic and packet id


@pytest.fixture
def small_broker(tmp_path: Path) -> Iterator[Mosquitto]:
    broker = Mosquitto(tmp_path / "mosquitto", extra_config=f"max_packet_size {LIMIT}").start()
    try:
        yield broker
    finally:
        broker.stop()


class Client:
    """A bare paho client (MQTT 3.1.1, clean session) recording what it receives."""

    def __init__(self, broker: Mosquitto, subscriptions: Sequence[str] = ()) -> None:
        self.received: queue.Queue[tuple[str, bytes, bool]] = queue.Queue()
        self.connected = threading.Event()
        self.disconnected = threading.Event()
        self.subscribed = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"t-{os.urandom(4).hex()}",
                                  clean_session=True, protocol=paho.MQTTv311)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port, 30)
        self.client.loop_start()
        assert self.connected.wait(5)
        if subscriptions:
            self.client.subscribe([(t, 1) for t in subscriptions])
            assert self.subscribed.wait(5)

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        self.disconnected.clear()
        self.connected.set()

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        self.connected.clear()
        self.disconnected.set()

    def _on_subscribe(self, client: Any, userdata: Any, mid: Any, reasons: Any, properties: Any) -> None:
        self.subscribed.set()

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        self.received.put((msg.topic, bytes(msg.payload), bool(msg.retain)))

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(timeout=10)
        assert info.is_published(), topic

    def reassemble(self, r: Reassembler, timeout: float = 10.0) -> tuple[bytes, list[str]]:
        deadline = time.monotonic() + timeout
        topics = []
        while time.monotonic() < deadline:
            try:
                topic, payload, _ = self.received.get(timeout=0.1)
            except queue.Empty:
                continue
            topics.append(topic)
            if (message := r.feed(topic, payload)) is not None:
                return message, topics
        raise AssertionError(f"no whole message within {timeout}s (got {len(topics)} frames)")

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.mark.mosquitto
def test_mosquitto_small_packet_limit_chunked_gets_through_unsplit_does_not(small_broker: Mosquitto) -> None:
    message = os.urandom(1 << 20)
    sub = Client(small_broker, ["fleet/update/+"])
    pub = Client(small_broker)
    try:
        frames = split(message, MAX_PAYLOAD)
        assert len(frames) == 17 and max(map(len, frames)) <= MAX_PAYLOAD
        for frame in frames:
            pub.publish("fleet/update/dev-1", frame)
        r = Reassembler(4 << 20, 2 << 20, 30.0)
        got, topics = sub.reassemble(r)
        assert got == message and hashlib.sha256(got).digest() == hashlib.sha256(message).digest()
        assert len(topics) == 17 and r.bytes_in_flight == 0
        assert not pub.disconnected.is_set()
    finally:
        pub.stop()

    # Unsplit, the broker drops the publisher's connection and nothing is delivered. paho would
    # re-send it after every reconnect, so this client is stopped right after.
    big = Client(small_broker)
    try:
        big.client.publish("fleet/update/dev-2", message, qos=1)
        assert big.disconnected.wait(5), "the broker should disconnect an oversize publisher"
        with pytest.raises(queue.Empty):
            sub.received.get(timeout=2.0)
    finally:
        big.stop()
        sub.stop()
    log = small_broker.directory / "mosquitto.log"
    deadline = time.monotonic() + 2
    while "oversize packet" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "disconnected due to oversize packet" in log.read_text()


@pytest.mark.mosquitto
def test_mosquitto_retained_chunked_model_and_cleanup(small_broker: Mosquitto) -> None:
    base = "fleet/model/global"
    subs = [base, f"{base}/chunk/+"]
    pub = Client(small_broker)
    try:
        first = os.urandom(600_000)
        first_frames = split(first, MAX_PAYLOAD)
        for topic, payload in retained_topics(base, first_frames):
            pub.publish(topic, payload, retain=True)
        late = Client(small_broker, subs)  # subscribes after the publish: only retained copies
        try:
            got, _ = late.reassemble(Reassembler(4 << 20, 2 << 20, 30.0))
            assert got == first
        finally:
            late.stop()

        second = os.urandom(200_000)  # fewer chunks: the higher chunk topics must be deleted
        second_frames = split(second, MAX_PAYLOAD)
        assert len(second_frames) < len(first_frames)
        for topic, payload in retained_topics(base, second_frames, previous_count=len(first_frames)):
            pub.publish(topic, payload, retain=True)
        late = Client(small_broker, subs)
        try:
            r = Reassembler(4 << 20, 2 << 20, 30.0)
            got, topics = late.reassemble(r)
            assert got == second
            time.sleep(0.5)  # let every retained message arrive
            while not late.received.empty():
                topic, payload, _ = late.received.get()
                topics.append(topic)
                assert r.feed(topic, payload) is None
            expected = {base} | {chunk_topic(base, i) for i in range(len(second_frames))}
            assert set(topics) == expected  # no stale chunk of the first model is retained
            assert r.partial_count == 0 and not r.errors
        finally:
            late.stop()
    finally:
        pub.stop()
