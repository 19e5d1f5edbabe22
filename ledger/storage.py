"""Append-only ledger file: one frame per block, fsync'd, checked at open.

Frame = magic ``b"FLB1"`` (4) | payload length u32 BE (4) | CRC-32 of (length field || payload) u32 BE (4)
| payload (``Block.to_bytes()``).

At open, a *torn tail* is truncated with a logging WARNING (the bytes are saved to
``<file>.torn-<offset>`` first). A tail, from the first bad frame to the end of the file, is torn
when it has the shape a crash in the middle of one append leaves -- a prefix of one frame, the
rest of the file reading as zeros -- which is one of: fewer bytes than a frame header; a header
whose length runs past the end of the file; a frame whose CRC fails, whose payload ends in zero
bytes (the part never written) and which is followed only by zero bytes (if any); or the first
bytes of a header (a prefix of the magic, then maybe part of the length)
followed only by zeros, down to no header byte at all (a file extended by the filesystem but
never written). Bytes inside the bad frame, even if they look like whole frames, prove nothing:
a block's data is partly chosen by devices. The one thing that does is the bad frame's own CRC,
which covers the length field: if it matches with the frame ending where a later frame header
(or the end of the file) starts, the frame is whole and its length field was damaged -- not torn.
A whole last frame whose checksum fails (one flipped bit) is not torn: that block was written
and perhaps published, so it is never cut off.
Anything else raises :class:`LedgerCorrupt` naming the block index, the byte offset and the problem.
History is never rewritten: the only write besides appending is that truncation.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

MAGIC = b"FLB1"
HEADER = struct.Struct(">4sII")
MAX_FRAME = 64 * 1024 * 1024


class LedgerError(Exception):
    """Base class of ledger failures."""


class LedgerCorrupt(LedgerError):
    """The ledger file is damaged somewhere other than a torn tail; never repaired automatically."""

    def __init__(self, index: int, reason: str, offset: int | None = None, path: str | os.PathLike[str] | None = None):
        where = f" at byte {offset}" if offset is not None else ""
        name = f"{path}: " if path is not None else ""
        super().__init__(f"{name}block {index}{where}: {reason}")
        self.index = index
        self.reason = reason
        self.offset = offset
        self.path = path


@dataclass(frozen=True)
class TornTail:
    offset: int  # where the torn bytes start (= size after truncation)
    length: int
    reason: str


@dataclass(frozen=True)
class ScanResult:
    payloads: list[bytes]
    offsets: list[int]
    end: int  # offset just after the last whole frame
    torn: TornTail | None
    error: LedgerCorrupt | None = None  # set instead of raised when scan(..., strict=False)


def frame(payload: bytes) -> bytes:
    if not 0 < len(payload) <= MAX_FRAME:
        raise ValueError(f"frame payload of {len(payload)} bytes not in 1..{MAX_FRAME}")
    length = struct.pack(">I", len(payload))
    return MAGIC + length + struct.pack(">I", zlib.crc32(payload, zlib.crc32(length))) + payload


def _check_frame(buf: bytes | memoryview, pos: int) -> tuple[int, str, str]:
    """(end, kind, reason): kind '' means a whole, valid frame ending at ``end``."""
    n = len(buf)
    if n - pos < HEADER.size:
        return -1, "short", f"{n - pos} bytes, less than a frame header"
    magic, length, crc = HEADER.unpack_from(buf, pos)
    if magic != MAGIC:
        return -1, "magic", f"bad frame magic {bytes(magic)!r}"
    if not 0 < length <= MAX_FRAME:
        return -1, "length", f"impossible frame length {length}"
    end = pos + HEADER.size + length
    if end > n:
        return -1, "past_eof", f"frame of {length} bytes runs {end - n} bytes past the end of the file"
    if zlib.crc32(buf[pos + HEADER.size:end], zlib.crc32(buf[pos + 4:pos + 8])) != crc:
        return end, "crc", "checksum mismatch (frame damaged)"
    return end, "", ""


_POLY = 0xEDB88320  # CRC-32 polynomial, bit-reflected as zlib uses it
_ZEROS = memoryview(bytes(1 << 16))


def _crc_of_zeros(count: int, value: int) -> int:
    """``zlib.crc32(bytes(count), value)`` without allocating ``count`` bytes."""
    while count:
        step = min(count, len(_ZEROS))
        value = zlib.crc32(_ZEROS[:step], value)
        count -= step
    return value


def _multmodp(a: int, b: int) -> int:
    """a * b modulo the CRC-32 polynomial, in zlib's reflected representation (x**0 = 1 << 31)."""
    m, p = 1 << 31, 0
    while a:
        if a & m:
            p ^= b
            a ^= m
        m >>= 1
        b = (b >> 1) ^ _POLY if b & 1 else b >> 1
    return p


def _true_length(buf: bytes, pos: int) -> int | None:
    """The payload length with which the frame at ``pos`` passes its CRC, if its length field is the
    only damage: tried with the frame ending at each later frame magic (also one cut short by the end
    of the file) and at the end of the file.

    Found in one pass, not one CRC per candidate: with c0 = crc32(4 zero bytes) and m the payload
    length, crc32(len(m) || p[:m]) = crc32(p[:m], c0) ^ (crc32(len(m)) ^ c0) * x**(8m) (CRC-32 is
    affine; crc32(bytes(k), v) ^ crc32(bytes(k), 0) = v * x**(8k)), and both crc32(p[:m], c0) and
    x**(8m) are carried forward from one candidate to the next."""
    n, hsize = len(buf), HEADER.size
    stored = HEADER.unpack_from(buf, pos)[2]
    first, last = pos + hsize + 1, min(n, pos + hsize + MAX_FRAME)
    candidates: list[int] = []
    at = buf.find(MAGIC, first, last + len(MAGIC))
    while at != -1:
        candidates.append(at)
        at = buf.find(MAGIC, at + 1, last + len(MAGIC))
    for cut in range(len(MAGIC) - 1, -1, -1):  # a magic cut short by the end of the file, or the end itself
        if first <= n - cut <= last and buf.endswith(MAGIC[:cut]) and (not candidates or candidates[-1] < n - cut):
            candidates.append(n - cut)
    view = memoryview(buf)
    c0 = zlib.crc32(bytes(4))
    running, shift, done = c0, 1 << 31, pos + hsize  # crc32(payload[:m], c0), x**(8m), pos + hsize + m
    for q in candidates:
        running = zlib.crc32(view[done:q], running)
        shift = _crc_of_zeros(q - done, shift) ^ _crc_of_zeros(q - done, 0)  # shift * x**(8 (q - done))
        done = q
        length = q - pos - hsize
        if running ^ _multmodp(shift, zlib.crc32(struct.pack(">I", length)) ^ c0) == stored:
            return length
    return None


def _zero_filled_header(buf: bytes, pos: int) -> str:
    """Why the tail from ``pos`` is the start of a frame header followed only by zeros ('' if not):
    what a crash leaves when the file grew but only the first bytes of a header reached the disk."""
    n, hsize = len(buf), HEADER.size
    if n - pos < hsize or buf.count(0, pos + hsize) != n - pos - hsize:
        return ""
    written = len(buf[pos:pos + hsize].rstrip(b"\0"))
    if written == hsize or buf[pos:pos + min(written, 4)] != MAGIC[:written]:
        return ""
    if written > 4:
        length = int.from_bytes(buf[pos + 4:pos + 8], "big")  # unwritten low bytes read as zero
        if length > MAX_FRAME or (written >= 8 and not length):
            return ""
    if not written:
        return f"{n - pos} zero bytes"
    return f"{written} bytes of a frame header, then {n - pos - written} zero bytes"


UNWRITTEN_END = 16  # zero bytes ending a frame's payload that mark it as never fully written


def _unwritten_end(buf: bytes, pos: int, end: int) -> bool:
    """Whether the frame at ``pos`` ends in zero bytes: a block ends with its 32-byte hash and the
    coordinator's signature (or, in a sealed group, the 3 bytes of an empty key id and signature),
    which never do (a chance of 2**-104 at most), so a frame whose CRC fails but whose end
    is not zeros was written whole and damaged later."""
    start = max(pos + HEADER.size, end - UNWRITTEN_END)
    return end - start == UNWRITTEN_END and buf.count(0, start, end) == UNWRITTEN_END


def scan(buf: bytes, path: str | os.PathLike[str] | None = None, *, strict: bool = True) -> ScanResult:
    """Split file contents into frame payloads; classify a bad tail as torn or raise LedgerCorrupt
    (with ``strict=False`` the error is returned with the whole frames before it)."""
    payloads: list[bytes] = []
    offsets: list[int] = []
    pos, n = 0, len(buf)
    view = memoryview(buf)
    unpack = HEADER.unpack_from
    crc32 = zlib.crc32
    hsize = HEADER.size
    while pos < n:
        # fast path for the common case
        if n - pos >= hsize:
            magic, length, crc = unpack(buf, pos)
            end = pos + hsize + length
            if (magic == MAGIC and 0 < length <= MAX_FRAME and end <= n
                    and crc32(view[pos + hsize:end], crc32(view[pos + 4:pos + 8])) == crc):
                payloads.append(buf[pos + hsize:end])
                offsets.append(pos)
                pos = end
                continue
        end, kind, reason = _check_frame(buf, pos)
        index = len(payloads)
        # A torn tail is a prefix of the frame the last append was writing, the rest reading as zeros.
        zeros = _zero_filled_header(buf, pos)
        # A whole frame whose checksum fails is damage (a flipped bit), not a torn write, unless its
        # payload ends in zeros: the part of the last append that never reached the disk.
        torn = bool(zeros) or kind in ("short", "past_eof") or (
            kind == "crc" and buf.count(0, end) == n - end and _unwritten_end(buf, pos, end))
        if torn and kind in ("past_eof", "crc"):
            # Frame-shaped bytes after ``pos`` may be device-chosen data inside the torn frame, so
            # they do not count as later frames. The frame's own CRC (over the length field and
            # the payload, which ends with the coordinator's signature) does: if it matches a
            # length ending at a later frame header or at the end of the file, this frame is
            # whole and its length field is damaged (a chance of 2**-32 for a torn frame). A length
            # field damaged together with the CRC or payload of the same frame still reads as torn.
            true_length = _true_length(buf, pos)
            if true_length is not None:
                torn = False
                reason = (f"frame length field damaged: it says {HEADER.unpack_from(buf, pos)[1]} bytes, but "
                          f"the frame's checksum matches {true_length} bytes, ending at byte "
                          f"{pos + HEADER.size + true_length} (so this is not a torn tail)")
        if torn:
            return ScanResult(payloads, offsets, pos, TornTail(pos, n - pos, zeros or reason))
        error = LedgerCorrupt(index, reason, pos, path)
        if strict:
            raise error
        return ScanResult(payloads, offsets, pos, None, error)
    return ScanResult(payloads, offsets, pos, None)


def read(path: str | os.PathLike[str], *, strict: bool = True) -> ScanResult:
    with open(path, "rb") as handle:
        return scan(handle.read(), path, strict=strict)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _side_path(path: Path, offset: int) -> Path:
    return path.with_name(f"{path.name}.torn-{offset}")


def _cut(fd: int, path: Path, buf: bytes, offset: int) -> None:
    """Save the bytes from ``offset`` to ``<file>.torn-<offset>``, then truncate the file there."""
    with open(_side_path(path, offset), "wb") as keep:
        keep.write(buf[offset:])
        keep.flush()
        os.fsync(keep.fileno())
    os.ftruncate(fd, offset)
    os.fsync(fd)


class LedgerFile:
    """The writer's handle: exclusive lock, append + fsync, truncation of a torn tail at open."""

    def __init__(self, path: Path, fd: int, size: int, *, sync_every: int = 1) -> None:
        self.path = path
        self._fd = fd
        self.size = size
        self.sync_every = max(0, sync_every)  # 0: never fsync automatically
        self._unsynced = 0
        self._broken: str | None = None

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, sync_every: int = 1) -> tuple[LedgerFile, ScanResult]:
        """Open (creating if needed) for appending; truncates a torn tail. Returns the file and its frames."""
        path = Path(path)
        created = not path.exists()
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise LedgerError(f"{path} is locked by another writer") from exc
                raise
            if created:
                _fsync_dir(path.parent if str(path.parent) else Path("."))
            with open(fd, "rb", closefd=False) as handle:
                handle.seek(0)
                buf = handle.read()
            result = scan(buf, path)
            if result.torn is not None:
                torn = result.torn
                _cut(fd, path, buf, torn.offset)
                log.warning("%s: torn tail of %d bytes at byte %d after block %d (%s); truncated, bytes saved "
                            "to %s", path, torn.length, torn.offset, len(result.payloads) - 1, torn.reason,
                            _side_path(path, torn.offset))
            os.lseek(fd, result.end, os.SEEK_SET)
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, result.end, sync_every=sync_every), result

    def append(self, payload: bytes) -> int:
        """Write one frame at the end; fsync per ``sync_every``. Returns the frame's offset.

        If the write fails half-way, the partial frame is cut off again before the error is
        raised, so later appends never land after garbage."""
        return self.append_many([payload])[0]

    def append_many(self, payloads: list[bytes], *, sync: bool = True) -> list[int]:
        """Write several frames with one ``write`` (a commit group); counts as that many appends
        for ``sync_every`` (``sync=False``: no fsync here, the caller calls :meth:`sync`).
        Returns their offsets. A failed write is cut off as by :meth:`append`."""
        if self._broken:
            raise LedgerError(f"{self.path}: writer disabled after an earlier failure: {self._broken}")
        frames = [frame(payload) for payload in payloads]
        start = self.size
        offsets, end = [], start
        for one in frames:
            offsets.append(end)
            end += len(one)
        data = b"".join(frames)
        try:
            view = memoryview(data)
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
            self._unsynced += len(frames)
            if sync and self.sync_every and self._unsynced >= self.sync_every:
                self.sync()
        except OSError as exc:
            try:
                os.ftruncate(self._fd, start)
                os.lseek(self._fd, start, os.SEEK_SET)
            except OSError as exc2:
                self._broken = f"could not cut a partial frame at byte {start}: {exc2}"
            raise exc
        self.size = start + len(data)
        return offsets

    def disable(self, reason: str) -> None:
        """Refuse every later append (the caller's view of the file can no longer be trusted)."""
        self._broken = reason

    def cut_tail(self, offset: int) -> None:
        """Save everything from ``offset`` to ``<file>.torn-<offset>`` and truncate there (at open
        only: for a tail of blocks written by a commit group whose sealing block never made it)."""
        with open(self._fd, "rb", closefd=False) as handle:
            handle.seek(0)
            buf = handle.read()
        _cut(self._fd, self.path, buf, offset)
        os.lseek(self._fd, offset, os.SEEK_SET)
        self.size = offset

    def sync(self) -> None:
        if self._unsynced:
            os.fsync(self._fd)
            self._unsynced = 0

    def close(self) -> None:
        if self._fd >= 0:
            try:
                self.sync()
            finally:
                os.close(self._fd)
                self._fd = -1
