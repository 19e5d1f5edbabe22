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
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ledger import Ed25519Signer, Ledger, LedgerCorrupt, records, storage, verify_file

REPO = Path(__file__).resolve().parent.parent
COORD = Ed25519Signer(bytes(range(32)))
DEV = Ed25519Signer(bytes([7] * 32))


def _fill(ledger: Ledger, rounds: int = 2) -> None:
    ledger.append(records.device_key("dev1", DEV.public_key))
    ledger.append(records.dataset("dev1", bytes(32), 10, "csv"))
    for r in range(1, rounds + 1):
        ledger.append(records.round_opened(r))
        stmt = records.statement("f", "dev1", r, DEV.key_id, b"m" * 16, bytes(32), 5, {"loss": 0.1})
        ledger.append(records.update(stmt, DEV.sign(stmt)))
        ledger.append(records.aggregate(r, ["dev1"], hashlib.sha256(b"%d" % r).digest(), "fedavg", {}))


@functools.lru_cache(maxsize=1)
def sample_file() -> tuple[bytes, tuple[int, ...]]:
    """Bytes of a small ledger file and the offsets of its frames."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "ledger.log"
        t = iter(range(1, 1000))
        ledger = Ledger.open(path, signer=COORD, fleet="f", now=lambda: float(next(t)))
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
        ledger = Ledger.open(path, signer=COORD, verify=signatures)
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
        ro = Ledger.open(path)  # a reader does not truncate
        assert ro.height == n - 1 and path.stat().st_size == cut
        with caplog.at_level(logging.WARNING, logger="ledger.storage"):
            ledger = Ledger.open(path, signer=COORD)
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
    ledger = Ledger.open(path, signer=COORD)
    assert ledger.height == len(offsets)
    ledger.close()
    assert path.read_bytes() == data
    path.write_bytes(data + b"not a frame at all")
    with pytest.raises(LedgerCorrupt, match=rf"block {len(offsets)}.*magic"):
        Ledger.open(path, signer=COORD)
    # a damaged frame in the middle is never mistaken for a torn tail, even if its length runs off the end
    damaged = bytearray(data)
    damaged[offsets[3] + 4:offsets[3] + 8] = (10**6).to_bytes(4, "big")
    path.write_bytes(bytes(damaged))
    with pytest.raises(LedgerCorrupt, match=r"block 3.*not a torn tail"):
        Ledger.open(path, signer=COORD)


def test_failed_write_leaves_no_partial_frame(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "l.log"
    ledger = Ledger.open(path, signer=COORD, fleet="f")
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
    ledger = Ledger.open(path, signer=COORD, fleet="f", sync_every=0)
    for i in range(20):
        ledger.append({"type": "note", "i": i})
    ledger.sync()
    ledger.close()
    assert verify_file(path).height == 21


WRITER = textwrap.dedent("""
    import os, sys, time
    from ledger import Ed25519Signer, Ledger, storage
    # Short, slow writes (as a busy disk may do): a kill then often lands inside a frame.
    real_write = os.write
    def slow_write(fd, data):
        time.sleep(0.0002)
        return real_write(fd, bytes(data[:4096]))
    storage.os.write = slow_write
    path, seed = sys.argv[1], bytes(range(32))
    ledger = Ledger.open(path, signer=Ed25519Signer(seed), fleet="crash")
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
        ledger = Ledger.open(path, signer=COORD)  # recovers (truncating a torn tail)
        assert ledger.height > max(acknowledged, default=0)
        seen = {b.index for b in ledger}
        assert acknowledged <= seen
        ledger.close()
    report = verify_file(path, trusted_coordinator_key=COORD.public_key)
    assert report.ok and not report.warnings, report
    assert len(acknowledged) > 20
    torn = sum("torn tail" in r.getMessage() for r in caplog.records)
    print(f"{len(acknowledged)} acknowledged blocks over 6 kills; {torn} torn tails truncated")
