"""Updates that arrive together are made durable together: the spool files first, then their
ledger records in one commit group; nothing is acknowledged before that fsync, a crash in
between loses nothing acknowledged, and the fleet status follows changes at a bounded rate."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_coordinator import TOPICS, Harness, weights

from coordinator.rounds import RoundPolicy
from coordinator.state_guard import CheckpointFile, write_checkpoint
from coordinator.status import STATUS_INTERVAL_S
from federation import envelope
from federation.fleet_state import verify_file


class Events:
    """What reached the disk (fsyncs, by file) and the broker (publications), in order."""

    def __init__(self, h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
        self.log: list[tuple[str, str]] = []
        real_fsync = os.fsync

        def fsync(fd: int) -> None:
            real_fsync(fd)
            self.log.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))

        monkeypatch.setattr(os, "fsync", fsync)
        h.coordinator.publisher._send = lambda topic, payload, retain: self.log.append(("publish", topic))

    def index(self, kind: str, where: str) -> list[int]:
        return [i for i, (k, what) in enumerate(self.log) if k == kind and where in what]


def test_a_batch_is_spooled_then_recorded_with_one_fsync_and_acknowledged_after_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    h = Harness(tmp_path, RoundPolicy(min_clients=3, quorum=1, deadline_s=0))
    events = Events(h, monkeypatch)
    height = h.ledger.head.index
    outcomes = h.coordinator.handle_updates([(TOPICS.update(d), h.update(d, 1, weights(1.0)))
                                             for d in ("dev-a", "dev-b")])
    assert [o.reason for o in outcomes] == ["accepted", "accepted"]
    ledger_fsyncs = events.index("fsync", "ledger.log")
    assert len(ledger_fsyncs) == 1  # both records in one commit group
    assert h.ledger.head.index == height + 2
    spool_fsyncs = events.index("fsync", "/spool/round-000001")
    assert spool_fsyncs and max(spool_fsyncs) < ledger_fsyncs[0]  # envelopes durable before their records
    for device in ("dev-a", "dev-b"):
        acks = events.index("publish", TOPICS.ack(device))
        assert acks and min(acks) > ledger_fsyncs[0]  # no acknowledgement before its fsync
    blocks = events.index("publish", TOPICS.ledger_blocks)
    assert blocks and min(blocks) > ledger_fsyncs[0]


def test_a_device_twice_in_one_batch_is_checked_against_its_first_record(tmp_path: Path) -> None:
    h = Harness(tmp_path, RoundPolicy(min_clients=3, quorum=1, deadline_s=0))
    first = h.update("dev-a", 1, weights(1.0))
    second = h.update("dev-a", 1, weights(2.0))
    outcomes = h.coordinator.handle_updates([(TOPICS.update("dev-a"), first), (TOPICS.update("dev-a"), first),
                                             (TOPICS.update("dev-a"), second), (TOPICS.update("dev-b"), first)])
    assert [o.reason for o in outcomes] == ["accepted", "replay", "duplicate_in_round", "topic_mismatch"]
    assert sum(1 for b in h.ledger if b.data["type"] == "update") == 1
    assert verify_file(tmp_path / "ledger.log").ok


def test_the_rest_of_a_batch_is_checked_after_the_round_closes(tmp_path: Path) -> None:
    """The batch stops where the round becomes ready: what follows is checked against the next
    round (a late third update for round 1 is stale, not added to a closed round), and the
    round's two updates are aggregated once."""
    h = Harness(tmp_path, strategy="fedavg")  # min_clients 2
    messages = [(TOPICS.update(d), h.update(d, 1, weights(1.0))) for d in ("dev-a", "dev-b", "dev-c")]
    outcomes = h.coordinator.handle_updates(messages)
    assert [o.reason for o in outcomes] == ["accepted", "accepted", "stale_round"]
    assert h.coordinator.round is not None and h.coordinator.round.number == 2
    np.testing.assert_allclose(h.coordinator.global_model["w"], 1.0, rtol=1e-6)
    kinds = [b.data["type"] for b in h.ledger]
    assert kinds.count("aggregate") == 1 and kinds.count("update") == 2
    # The next round's updates (trained from its model) are accepted as usual.
    assert all(h.send(d, h.update(d, 2, weights(3.0))).accepted for d in ("dev-a", "dev-c"))
    assert h.coordinator.round.number == 3
    np.testing.assert_allclose(h.coordinator.global_model["w"], 3.0, rtol=1e-6)
    assert verify_file(tmp_path / "ledger.log").ok


def test_a_crash_between_spool_and_ledger_loses_nothing_acknowledged(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    h = Harness(tmp_path, RoundPolicy(min_clients=3, quorum=1, deadline_s=0))
    assert h.send("dev-c", h.update("dev-c", 1, weights(5.0))).accepted  # acknowledged before the crash
    acks_before = [p for t, p, r in h.published if t == TOPICS.ack("dev-a")]
    batch = [(TOPICS.update(d), h.update(d, 1, weights(1.0))) for d in ("dev-a", "dev-b")]

    class Crash(BaseException):
        """The process dies here (BaseException: nothing catches it on the way out)."""

    def crash(*args: Any, **kwargs: Any) -> Any:
        raise Crash

    monkeypatch.setattr(h.coordinator.writer, "group_commit", crash)  # after the spool, before the ledger
    with pytest.raises(Crash):
        h.coordinator.handle_updates(batch)
    assert h.coordinator.spool.get(1, "dev-a") == batch[0][1]  # spooled, never recorded
    assert [p for t, p, r in h.published if t == TOPICS.ack("dev-a")] == acks_before  # never acknowledged
    monkeypatch.undo()

    h.coordinator = h.build(register=False)  # the restart: the recorded update is back, the others are not
    assert h.coordinator.round is not None and sorted(h.coordinator.round.accepted) == ["dev-c"]
    outcomes = h.coordinator.handle_updates(batch)  # the devices send again: accepted, the round closes
    assert [o.reason for o in outcomes] == ["accepted", "accepted"]
    assert h.coordinator.round.number == 2
    assert verify_file(tmp_path / "ledger.log").ok


def test_the_fleet_status_follows_updates_at_a_bounded_rate_and_round_changes_at_once(tmp_path: Path) -> None:
    h = Harness(tmp_path, RoundPolicy(min_clients=3, quorum=1, deadline_s=0))
    h.coordinator.publish_status()
    h.published.clear()

    def statuses() -> list[dict[str, Any]]:
        return [envelope.open_status(p, h.keys.public.sign_public) for t, p, r in h.published if t == TOPICS.status]

    assert h.send("dev-a", h.update("dev-a", 1, weights(1.0))).accepted
    assert h.send("dev-b", h.update("dev-b", 1, weights(1.0))).accepted
    assert not h.coordinator.publish_status_if_due()  # changed, but the last status is not a second old
    assert statuses() == [] and [t for t, _, _ in h.published].count(TOPICS.ack("dev-b")) == 1
    h.clock.t += STATUS_INTERVAL_S
    assert h.coordinator.publish_status_if_due()
    assert statuses()[-1]["accepted"] == ["dev-a", "dev-b"]
    assert not h.coordinator.publish_status_if_due()  # nothing changed since
    assert h.send("dev-c", h.update("dev-c", 1, weights(1.0))).accepted  # closes the round
    assert statuses()[-1]["round"] == 2  # at once, not at the next tick


def test_the_checkpoint_file_is_written_at_a_bounded_rate_and_its_newest_head_on_flush(tmp_path: Path) -> None:
    now = [100.0]
    checkpoint = CheckpointFile(tmp_path, interval_s=1.0, clock=lambda: now[0])
    written: list[bytes] = []
    path = tmp_path / "checkpoint"
    checkpoint.offer(b"head-1")
    written.append(path.read_bytes())
    checkpoint.offer(b"head-2")
    checkpoint.offer(b"head-3")
    assert path.read_bytes() == b"head-1"  # within the second: not yet
    checkpoint.flush_if_due()
    assert path.read_bytes() == b"head-1"
    now[0] += 1.0
    checkpoint.flush_if_due()
    assert path.read_bytes() == b"head-3"  # the newest durable head, never an older one after it
    checkpoint.offer(b"head-4")
    checkpoint.flush()  # on exit
    assert path.read_bytes() == b"head-4"
    write_checkpoint(tmp_path, b"x")  # the plain write stays available


def test_the_daemon_takes_only_the_updates_already_waiting_and_hands_back_the_next_message() -> None:
    import queue

    from coordinator import daemon
    from federation.mqtt import Message

    def message(topic: str, size: int = 10) -> Message:
        return Message(topic, bytes(size), False, 0.0)

    inbox: queue.Queue[Message] = queue.Queue()
    for m in [message(TOPICS.update("dev-b")), message(TOPICS.presence("dev-a")), message(TOPICS.update("dev-c"))]:
        inbox.put(m)
    batch, other = daemon.take_updates(message(TOPICS.update("dev-a")), inbox, TOPICS)
    assert [m.topic for m in batch] == [TOPICS.update("dev-a"), TOPICS.update("dev-b")]
    assert other is not None and other.topic == TOPICS.presence("dev-a")  # the caller handles it next
    batch, other = daemon.take_updates(inbox.get(), inbox, TOPICS)  # never waits for more
    assert len(batch) == 1 and other is None
    for i in range(3):
        inbox.put(message(TOPICS.update(f"dev-{i}"), daemon.UPDATE_BATCH_BYTES // 2))
    batch, other = daemon.take_updates(inbox.get(), inbox, TOPICS)
    assert len(batch) == 2 and other is None and inbox.qsize() == 1  # bounded in bytes


def test_admission_threads_are_the_coordinators_started_by_a_batch_and_ended_by_close(tmp_path: Path) -> None:
    h = Harness(tmp_path, RoundPolicy(min_clients=3, quorum=1, deadline_s=0))
    before = _threads()
    assert h.coordinator.handle_update(TOPICS.update("dev-a"), h.update("dev-a", 1, weights(1.0))).accepted
    assert not _threads("admission") - before  # one message at a time: checked in place, no pool
    outcomes = h.coordinator.handle_updates([(TOPICS.update(d), h.update(d, 1, weights(1.0)))
                                             for d in ("dev-b", "dev-c")])
    assert [o.reason for o in outcomes] == ["accepted", "accepted"]
    assert _threads("admission") - before  # the batch's verdicts were computed side by side
    started = _threads() - before
    assert _threads("storage") & started  # the spool's fsyncs waited side by side too
    h.coordinator.close()
    assert not any(t.is_alive() for t in started)


def _threads(prefix: str = "") -> set[threading.Thread]:
    """The coordinators' worker threads (admission verdicts, file system waits) alive now."""
    return {t for t in threading.enumerate() if t.name.startswith(prefix or ("admission", "storage"))}


def test_the_spool_keeps_a_batch_in_a_few_segment_files_and_reads_each_devices_latest_back(tmp_path: Path) -> None:
    """256 small updates cost a few fsyncs, not 256; after a restart (a new Spool on the same
    directory) every device's latest envelope comes back byte for byte, also from a spool of an
    earlier version (one file per device) and an envelope larger than a segment."""
    from coordinator.storage import SEGMENT_BYTES, Spool

    spool = Spool(tmp_path / "spool")
    small = {f"dev-{i:03d}": os.urandom(20_000) for i in range(256)}
    spool.put_many(1, list(small.items()))
    files = sorted((tmp_path / "spool" / "round-000001").iterdir())
    assert 1 < len(files) <= 256 * 20_000 // SEGMENT_BYTES + 2 and all(f.suffix == ".spool" for f in files)
    large = os.urandom(SEGMENT_BYTES + 5)
    again = os.urandom(100)  # dev-000 once more, in a later batch (after a crash before its record)
    spool.put_many(1, [("dev-big", large), ("dev-000", again)])
    (tmp_path / "spool" / "round-000001" / "dev-old.update").write_bytes(b"from an earlier version")
    spool.close()
    for reader in (spool, Spool(tmp_path / "spool")):
        assert reader.get(1, "dev-000") == again and reader.get(1, "dev-big") == large
        assert all(reader.get(1, d) == data for d, data in small.items() if d != "dev-000")
        assert reader.get(1, "dev-old") == b"from an earlier version" and reader.get(1, "dev-none") is None
    restarted = Spool(tmp_path / "spool")
    restarted.put_many(1, [("dev-001", b"newest")])  # numbered after the segments already there
    assert Spool(tmp_path / "spool").get(1, "dev-001") == b"newest"
    restarted.drop_round(1)
    restarted.close()
    assert restarted.get(1, "dev-001") is None


def test_an_envelope_over_100_mib_spooled_before_a_crash_is_read_back_after_it(tmp_path: Path) -> None:
    """--max-update-bytes may be raised past 100 MiB (a large model): such an update is spooled,
    recorded and acknowledged, so after a restart it must come back from its segment. msgpack's
    Unpacker buffers at most 100 MiB by default: the segment looked damaged, the update was
    'missing from the spool' and the coordinator could not start again."""
    from coordinator.storage import Spool

    large = b"\x01" * ((100 << 20) + 1)
    spool = Spool(tmp_path / "spool")
    spool.put_many(1, [("dev-a", b"small"), ("dev-big", large)])
    spool.close()
    restarted = Spool(tmp_path / "spool")
    try:
        assert restarted.get(1, "dev-big") == large and restarted.get(1, "dev-a") == b"small"
    finally:
        restarted.close()


def test_one_device_flooding_a_batch_gets_no_more_updates_decrypted_ahead_than_before(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A hostile registered device fills the batch read ahead with many genuine updates for the
    open round (new message ids). Only its first can be accepted (duplicate_in_round for the
    rest, decided before any decryption when each is judged): opening ahead must not decrypt,
    decode and hold the rest's tensors either (CPU and memory an attacker would get for free)."""
    h = Harness(tmp_path, RoundPolicy(min_clients=3, quorum=1, deadline_s=0))
    flood = [(TOPICS.update("dev-a"), h.update("dev-a", 1, weights(float(i)))) for i in range(6)]
    batch = [*flood, (TOPICS.update("dev-b"), h.update("dev-b", 1, weights(1.0)))]
    decrypted: list[bytes] = []
    real = envelope.decrypt_update

    def counting(sealed: Any, keys: Any) -> bytes:
        decrypted.append(sealed.header.msg_id)
        return real(sealed, keys)

    monkeypatch.setattr(envelope, "decrypt_update", counting)
    h.coordinator.intake.open_ahead(batch)
    outcomes = h.coordinator.handle_updates(batch)
    assert [o.reason for o in outcomes] == ["accepted", *["duplicate_in_round"] * 5, "accepted"]
    assert len(decrypted) == 2  # dev-a's first and dev-b's, as without opening ahead


def test_a_batch_that_fails_midway_leaves_nothing_opened_ahead_behind(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Updates opened ahead (payload, decrypted tensors) are kept until judged: a batch that ends
    in an unexpected error (the daemon logs it and goes on) must not leave the rest of it held,
    batch after batch, until the MAX_AHEAD count (1,024 envelopes and their tensors)."""
    h = Harness(tmp_path, RoundPolicy(min_clients=3, quorum=1, deadline_s=0))
    batch = [(TOPICS.update("dev-a"), h.update("dev-a", 1, weights(1.0))),
             (TOPICS.update("dev-a"), h.update("dev-a", 1, weights(2.0))),  # ends the first sub-batch
             (TOPICS.update("dev-b"), h.update("dev-b", 1, weights(1.0)))]

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(h.coordinator.writer, "accept_updates", broken)
    intake = h.coordinator.intake
    intake.open_ahead(batch)
    with pytest.raises(RuntimeError):
        h.coordinator.handle_updates(batch)
    assert intake._ahead == {}


def test_a_rounds_new_spool_directory_is_itself_made_durable_before_its_records(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first batch of a round creates spool/round-RRRRRR: fsyncing that directory makes the
    segments' names durable, but its own name lives in spool/, which must be fsynced too, or a
    power cut after the acknowledgement can lose the whole round's directory (POSIX; ext4's
    journal usually hides it)."""
    from coordinator import storage

    synced: list[Path] = []
    real = storage.durable.fsync_dir

    def recording(path: Path) -> None:
        synced.append(Path(path))
        real(path)

    monkeypatch.setattr(storage.durable, "fsync_dir", recording)
    spool = storage.Spool(tmp_path / "spool")
    spool.put_many(1, [("dev-a", b"x")])
    assert tmp_path / "spool" / "round-000001" in synced and tmp_path / "spool" in synced
    synced.clear()
    spool.put_many(1, [("dev-b", b"y")])  # the directory is there already: one fsync of it
    assert synced == [tmp_path / "spool" / "round-000001"]
    spool.close()


def test_a_damaged_spool_segment_stops_the_restart_with_a_storage_error_naming_it(tmp_path: Path) -> None:
    """A segment damaged on disk after an update was acknowledged (a flipped bit in an envelope):
    the restart must not accept junk nor lose the update silently, and the operator gets the
    storage refusal naming the device, round and spool (the daemon turns it into a clear 'state
    refused' exit), not a decryption traceback."""
    from coordinator.storage import StorageError

    h = Harness(tmp_path, RoundPolicy(min_clients=3, quorum=1, deadline_s=0))
    batch = [(TOPICS.update(d), h.update(d, 1, weights(1.0))) for d in ("dev-a", "dev-b")]
    assert [o.reason for o in h.coordinator.handle_updates(batch)] == ["accepted", "accepted"]
    segment = next((tmp_path / "spool" / "round-000001").glob("*.spool"))
    damaged = bytearray(segment.read_bytes())
    damaged[-40] ^= 1  # inside dev-b's envelope, the last entry: its ciphertext or tag
    segment.write_bytes(bytes(damaged))
    with pytest.raises(StorageError, match="dev-b for round 1 is damaged in the spool"):
        h.build(register=False)
