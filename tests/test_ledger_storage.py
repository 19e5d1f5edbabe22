"""Crash safety and tamper evidence of the ledger file: torn tails, single-byte flips, SIGKILL."""

from __future__ import annotations

import errno
import functools
import hashlib
import logging
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from federation import records
from federation.fleet_state import FleetLedger, verify_file
from ledger import Ed25519Signer, LedgerCorrupt, storage

REPO = Path(__file__).resolve().parent.parent
COORD = Ed25519Signer(bytes(range(32)))
DEV = Ed25519Signer(bytes([7] * 32))


def _fill(ledger: FleetLedger, rounds: int = 2) -> None:
    ledger.append(records.device_key("dev1", DEV.public_key))
    ledger.append(records.dataset("dev1", bytes(32), 10, "csv"))
    for r in range(1, rounds + 1):
        ledger.append(records.round_opened(r))
        stmt = records.statement("f", "dev1", r, DEV.key_id, b"m" * 16, bytes(32), 5, {"loss": 0.1})
        ledger.append(records.update(stmt, DEV.sign(stmt)))
        ledger.append(records.aggregate(r, ["dev1"], hashlib.sha256(b"%d" % r).digest(), "fedavg", {},
                                        merkle_root=ledger.state.merkle_root_for(r)))


@functools.lru_cache(maxsize=1)
def sample_file() -> tuple[bytes, tuple[int, ...]]:
    """Bytes of a small ledger file and the offsets of its frames."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "ledger.log"
        t = iter(range(1, 1000))
        ledger = FleetLedger.open(path, signer=COORD, fleet="f", now=lambda: float(next(t)))
        _fill(ledger)
        ledger.close()
        data = path.read_bytes()
    scanned = storage.scan(data)
    assert scanned.torn is None and len(scanned.payloads) == 9
    return data, tuple(scanned.offsets)


def frame_of(offsets: tuple[int, ...], position: int) -> int:
    return max(i for i, off in enumerate(offsets) if off <= position)


def check_flip(tmp: Path, position: int, xor: int, signatures: str = "all") -> None:
    """The rule: damage in frame k < last -> LedgerCorrupt(k); damage in the last frame -> either
    LedgerCorrupt(last) or (if it looks like a torn write) truncation of just that frame."""
    data, offsets = sample_file()
    n = len(offsets)
    k = frame_of(offsets, position)
    damaged = bytearray(data)
    damaged[position] ^= xor
    path = tmp / f"flip-{position}-{xor}.log"
    path.write_bytes(bytes(damaged))

    report = verify_file(path, signatures=signatures)
    if k < n - 1:
        assert not report.ok and report.bad_index == k, (position, k, report)
    else:
        assert (not report.ok and report.bad_index == k) or (report.ok and report.height == n - 1 and
                                                             report.warnings), (position, report)
    try:
        ledger = FleetLedger.open(path, signer=COORD, verify=signatures)
    except LedgerCorrupt as exc:
        assert exc.index == k, (position, k, str(exc))
        assert f"block {k}" in str(exc)
        assert path.read_bytes() == bytes(damaged)  # refused, not repaired
    else:
        assert k == n - 1, f"flip at {position} (block {k}) went unnoticed"
        assert ledger.height == n - 1
        ledger.close()
        assert path.read_bytes() == data[: offsets[-1]]
        assert path.with_name(f"{path.name}.torn-{offsets[-1]}").read_bytes() == bytes(damaged[offsets[-1]:])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(where=st.floats(0, 1, exclude_max=True), xor=st.integers(1, 255))
def test_any_single_byte_flip_is_detected(tmp_path: Path, where: float, xor: int) -> None:
    data, _ = sample_file()
    check_flip(tmp_path, int(where * len(data)), xor)


def test_every_byte_position_flipped(tmp_path: Path) -> None:
    data, _ = sample_file()
    for position in range(len(data)):
        check_flip(tmp_path, position, 0x01 if position % 2 else 0x80, signatures="head")
        for p in tmp_path.iterdir():
            p.unlink()


def test_torn_tail_truncated_at_every_length(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data, offsets = sample_file()
    n = len(offsets)
    for cut in range(offsets[-1] + 1, len(data)):
        path = tmp_path / f"cut-{cut}.log"
        path.write_bytes(data[:cut])
        report = verify_file(path, signatures="none")
        assert report.ok and report.height == n - 1 and "torn tail" in report.warnings[0]
        ro = FleetLedger.open(path)  # a reader does not truncate
        assert ro.height == n - 1 and path.stat().st_size == cut
        with caplog.at_level(logging.WARNING, logger="ledger.storage"):
            ledger = FleetLedger.open(path, signer=COORD)
        assert ledger.height == n - 1
        assert any("torn tail" in r.getMessage() for r in caplog.records)
        caplog.clear()
        ledger.append({"type": "note", "after": "recovery"})  # appends continue cleanly
        ledger.close()
        again = verify_file(path, signatures="head")
        assert again.ok and again.height == n and not again.warnings


def test_zero_filled_tail_is_torn_but_garbage_is_not(tmp_path: Path) -> None:
    data, offsets = sample_file()
    path = tmp_path / "zeros.log"
    path.write_bytes(data + bytes(300))
    ledger = FleetLedger.open(path, signer=COORD)
    assert ledger.height == len(offsets)
    ledger.close()
    assert path.read_bytes() == data
    path.write_bytes(data + b"not a frame at all")
    with pytest.raises(LedgerCorrupt, match=rf"block {len(offsets)}.*magic"):
        FleetLedger.open(path, signer=COORD)
    # a damaged frame in the middle is never mistaken for a torn tail, even if its length runs off the end
    damaged = bytearray(data)
    damaged[offsets[3] + 4:offsets[3] + 8] = (10**6).to_bytes(4, "big")
    path.write_bytes(bytes(damaged))
    with pytest.raises(LedgerCorrupt, match=r"block 3.*not a torn tail"):
        FleetLedger.open(path, signer=COORD)


def _utf8_frame(tag: str) -> str:
    """A whole, valid frame whose bytes are valid UTF-8, so a device can put it in a schema string."""
    for x in range(100_000):
        try:
            return storage.frame(f"{tag}{x}".encode()).decode()
        except UnicodeDecodeError:
            pass
    raise AssertionError("no UTF-8 frame found")


def _assert_torn_and_recovered(path: Path, keep: bytes, height: int, caplog: pytest.LogCaptureFixture) -> None:
    """``path`` ends in a torn tail after the whole frames ``keep`` (``height`` blocks): reported, then truncated."""
    damaged = path.read_bytes()
    report = verify_file(path, signatures="none")
    assert report.ok and report.height == height and "torn tail" in report.warnings[0], report
    assert FleetLedger.open(path).height == height and path.read_bytes() == damaged  # a reader does not truncate
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ledger.storage"):
        ledger = FleetLedger.open(path, signer=COORD)
    assert ledger.height == height
    assert any("torn tail" in r.getMessage() for r in caplog.records)
    ledger.close()
    assert path.read_bytes() == keep
    assert path.with_name(f"{path.name}.torn-{len(keep)}").read_bytes() == damaged[len(keep):]


def test_torn_frame_whose_payload_embeds_whole_frames_is_torn(tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    # A device's dataset schema holds a run of whole, valid frames, and binary metadata holds the
    # exact frame of a real, signed earlier block: when the crash tears the block recording it,
    # those frames sit inside the torn frame and must not make the tail look like damage.
    base = tmp_path / "base.log"
    t = iter(range(1, 1000))
    ledger = FleetLedger.open(base, signer=COORD, fleet="f", now=lambda: float(next(t)))
    _fill(ledger, rounds=1)
    real = storage.frame(ledger.block(2).to_bytes())
    run = "".join(_utf8_frame(tag) for tag in ("a", "bb", "ccc"))
    ledger.append(records.dataset("dev1", bytes(32), 10, {"csv": run}, replay=real))
    ledger.close()
    data = base.read_bytes()
    scanned = storage.scan(data)
    last, n = scanned.offsets[-1], len(scanned.offsets)
    inner = [data.find(run.encode(), last), data.find(real, last)]
    assert -1 not in inner
    ends = {inner[0] + len(run.encode()[:i]) for i in range(1, len(run.encode()) + 1)
            if storage.scan(run.encode()[:i]).torn is None} | {inner[1] + len(real)}
    assert len(ends) == 4  # the cuts where the embedded frames run exactly to the end of the file
    cuts = sorted(ends | set(range(min(ends), len(data), 7)))
    for cut in cuts:
        path = tmp_path / f"cut-{cut}.log"
        path.write_bytes(data[:cut])
        _assert_torn_and_recovered(path, data[:last], n - 1, caplog)
    # the recovered ledger carries on
    ledger = FleetLedger.open(path, signer=COORD)
    ledger.append({"type": "note"})
    ledger.close()
    assert verify_file(path).ok


def test_zero_filled_partial_header_is_torn(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # The file grew by a whole frame, but only its first k header bytes reached the disk (the rest
    # reads as zeros): k = 1..3 a prefix of the magic, 4 the magic, 5..7 part of the length field
    # (read as zero, or as a shorter length), 8..11 part of the checksum.
    data, offsets = sample_file()
    small = storage.frame(b"s" * 193)  # length field 00 00 00 c1
    big = storage.frame(b"b" * 0x010203)  # length field 00 01 02 03: partly written, it reads shorter
    for fr in (small, big):
        for k in range(1, storage.HEADER.size):
            path = tmp_path / f"zeros-{len(fr)}-{k}.log"
            path.write_bytes(data + fr[:k] + bytes(len(fr) - k))
            _assert_torn_and_recovered(path, data, len(offsets), caplog)
    # what no header prefix looks like is still damage
    for tail in (b"FX" + bytes(20), b"FLB1\x7f" + bytes(20), b"\x00FLB1" + bytes(20), b"FLB1" + bytes(8) + b"x"):
        path = tmp_path / "garbage.log"
        path.write_bytes(data + tail)
        with pytest.raises(LedgerCorrupt, match=rf"block {len(offsets)} at byte {len(data)}"):
            FleetLedger.open(path, signer=COORD)
        assert path.read_bytes() == data + tail


def test_damaged_length_field_is_refused_not_torn(tmp_path: Path) -> None:
    # A length field raised past the end of the file is a whole frame's damage, not a torn tail: the
    # frame's checksum names its true length, also when the file's last frame is torn as well.
    data, offsets = sample_file()
    n = len(offsets)
    for k in range(n):
        for cut in (len(data), (offsets[-1] + len(data)) // 2):
            if k == n - 1 and cut != len(data):
                continue
            for length in (len(data), 10**6, storage.MAX_FRAME):
                damaged = bytearray(data[:cut])
                damaged[offsets[k] + 4:offsets[k] + 8] = length.to_bytes(4, "big")
                path = tmp_path / f"len-{k}-{cut}-{length}.log"
                path.write_bytes(bytes(damaged))
                true_length = (offsets[k + 1] if k + 1 < n else len(data)) - offsets[k] - storage.HEADER.size
                with pytest.raises(LedgerCorrupt, match=rf"block {k} at byte {offsets[k]}: frame length field "
                                   rf"damaged: it says {length} bytes.* matches {true_length} bytes.*not a torn tail"):
                    FleetLedger.open(path, signer=COORD)
                assert path.read_bytes() == bytes(damaged)
                report = verify_file(path, signatures="none")
                assert not report.ok and report.bad_index == k


def test_true_length_search_matches_brute_force() -> None:
    rng = random.Random(7)
    hsize = storage.HEADER.size
    for _ in range(300):
        frames = [storage.frame(rng.randbytes(rng.randrange(1, 400))) for _ in range(rng.randrange(1, 5))]
        buf = bytearray(b"".join(frames))
        if rng.random() < 0.5:
            buf = buf[:rng.randrange(hsize, len(buf))]
        buf[4:8] = rng.randrange(1, 1 << 24).to_bytes(4, "big")
        stored, want = int.from_bytes(buf[8:12], "big"), None
        for q in range(hsize + 1, len(buf) + 1):  # each later magic (cut short only by the end) and the end
            length = (q - hsize).to_bytes(4, "big")
            at_magic = buf[q:q + 4] == storage.MAGIC[:len(buf) - q]
            if at_magic and zlib.crc32(bytes(buf[hsize:q]), zlib.crc32(length)) == stored:
                want = q - hsize
                break
        assert storage._true_length(bytes(buf), 0) == want
        if len(buf) >= len(frames[0]):  # the frame is whole: its true length is found
            assert want == len(frames[0]) - hsize


def test_failed_write_leaves_no_partial_frame(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "l.log"
    ledger = FleetLedger.open(path, signer=COORD, fleet="f")
    size = path.stat().st_size
    real_write = os.write

    def half_then_enospc(fd: int, data: Any) -> int:
        if len(data) > 10:
            return real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(storage.os, "write", half_then_enospc)
    with pytest.raises(OSError):
        ledger.append({"type": "note"})
    monkeypatch.setattr(storage.os, "write", real_write)
    assert path.stat().st_size == size and ledger.height == 1
    ledger.append({"type": "note"})
    ledger.close()
    assert verify_file(path).height == 2


def test_batched_fsync(tmp_path: Path) -> None:
    path = tmp_path / "l.log"
    ledger = FleetLedger.open(path, signer=COORD, fleet="f", sync_every=0)
    for i in range(20):
        ledger.append({"type": "note", "i": i})
    ledger.sync()
    ledger.close()
    assert verify_file(path).height == 21


WRITER = textwrap.dedent("""
    import os, sys, time
    from federation.fleet_state import FleetLedger
    from ledger import Ed25519Signer, storage
    # Short, slow writes (as a busy disk may do): a kill then often lands inside a frame.
    real_write = os.write
    def slow_write(fd, data):
        time.sleep(0.0002)
        return real_write(fd, bytes(data[:4096]))
    storage.os.write = slow_write
    path, seed = sys.argv[1], bytes(range(32))
    ledger = FleetLedger.open(path, signer=Ed25519Signer(seed), fleet="crash")
    print("open", ledger.height, flush=True)
    i = 0
    while True:
        i += 1
        # some big records so a kill can land inside a write
        blob = os.urandom(200_000 if i % 7 == 0 else 64)
        block = ledger.append({"type": "note", "i": i, "blob": blob})
        print(block.index, flush=True)
""")


def test_sigkill_during_appends_loses_nothing_acknowledged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="ledger.storage")
    path = tmp_path / "crash.log"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    rng = random.Random(1234)
    acknowledged: set[int] = set()
    for _ in range(6):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, env=env,
                                cwd=REPO)
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first.startswith(b"open"), first
        time.sleep(rng.uniform(0.05, 0.6))
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate(timeout=30)
        acknowledged |= {int(line) for line in out.split()}
        ledger = FleetLedger.open(path, signer=COORD)  # recovers (truncating a torn tail)
        assert ledger.height > max(acknowledged, default=0)
        seen = {b.index for b in ledger}
        assert acknowledged <= seen
        ledger.close()
    report = verify_file(path, trusted_coordinator_key=COORD.public_key)
    assert report.ok and not report.warnings, report
    assert len(acknowledged) > 20
    torn = sum("torn tail" in r.getMessage() for r in caplog.records)
    print(f"{len(acknowledged)} acknowledged blocks over 6 kills; {torn} torn tails truncated")


def test_bit_flip_in_last_block_is_corruption_not_a_torn_tail(tmp_path: Path) -> None:
    # A complete last frame whose checksum fails was written (and maybe published and acknowledged):
    # it is refused by block index, never truncated as if a crash had torn it.
    data, offsets = sample_file()
    last = len(offsets) - 1
    for position in (offsets[-1] + 20, len(data) - 1):
        damaged = bytearray(data)
        damaged[position] ^= 0x04
        path = tmp_path / f"flip-{position}.log"
        path.write_bytes(bytes(damaged))
        with pytest.raises(LedgerCorrupt, match=rf"block {last}\b.*checksum"):
            FleetLedger.open(path, signer=COORD)
        assert path.read_bytes() == bytes(damaged)
    # whereas a last frame whose end never reached the disk (zeros) is torn and truncated
    torn = bytearray(data)
    torn[-UNWRITTEN:] = bytes(UNWRITTEN)
    path = tmp_path / "unwritten.log"
    path.write_bytes(bytes(torn))
    ledger = FleetLedger.open(path, signer=COORD)
    assert ledger.height == last
    ledger.close()
    assert path.read_bytes() == data[:offsets[-1]]


def test_group_commit_syncs_once_at_the_end(tmp_path: Path) -> None:
    from federation.fleet_state import FleetLedger
    from ledger import Ed25519Signer

    ledger = FleetLedger.open(tmp_path / "l.log", signer=Ed25519Signer(bytes(32)), fleet="f")
    file = ledger._file
    assert file is not None
    syncs: list[int] = []
    original = file.sync
    file.sync = lambda: (syncs.append(file._unsynced), original())  # type: ignore[method-assign]
    with ledger.group_commit():
        for i in range(3):
            ledger.append({"type": "note", "i": i})
        assert not syncs
    assert syncs == [3] and file.sync_every == 1
    ledger.append({"type": "note", "i": 3})
    assert syncs == [3, 1]


UNWRITTEN = storage.UNWRITTEN_END + 5
