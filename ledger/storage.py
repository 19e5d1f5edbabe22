"""Append-only ledger file: one frame per block, fsync'd, checked at open.

Frame = magic ``b"FLB1"`` (4) | payload length u32 BE (4) | CRC-32 of (length field || payload) u32 BE (4)
| payload (``Block.to_bytes()``).

At open, a *torn tail* is truncated with a logging WARNING (the bytes are saved to
``<file>.torn-<offset>`` first). A tail is torn when it is the last thing in the file and
no whole frame follows it, and it is one of: fewer bytes than a frame header; a header whose
length runs past the end of the file; a frame reaching exactly the end of the file whose CRC
fails; or only zero bytes (a file extended by the filesystem but never written). Anything
else raises :class:`LedgerCorrupt` naming the block index, the byte offset and the problem.
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


def _whole_frame_after(buf: bytes, pos: int) -> int | None:
    at = buf.find(MAGIC, pos + 1)
    while at != -1:
        if _check_frame(buf, at)[1] == "":
            return at
        at = buf.find(MAGIC, at + 1)
    return None


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
        later = _whole_frame_after(buf, pos)
        torn = later is None and (
            kind in ("short", "past_eof")
            or (kind == "crc" and end == n)
            or (kind == "magic" and buf.count(0, pos) == n - pos)
        )
        if torn:
            return ScanResult(payloads, offsets, pos, TornTail(pos, n - pos, reason))
        if later is not None:
            reason += f" (a whole frame follows at byte {later}, so this is not a torn tail)"
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
                side = path.with_name(f"{path.name}.torn-{torn.offset}")
                with open(side, "wb") as keep:
                    keep.write(buf[torn.offset:])
                    keep.flush()
                    os.fsync(keep.fileno())
                os.ftruncate(fd, torn.offset)
                os.fsync(fd)
                log.warning("%s: torn tail of %d bytes at byte %d after block %d (%s); truncated, bytes saved "
                            "to %s", path, torn.length, torn.offset, len(result.payloads) - 1, torn.reason, side)
            os.lseek(fd, result.end, os.SEEK_SET)
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, result.end, sync_every=sync_every), result

    def append(self, payload: bytes) -> int:
        """Write one frame at the end; fsync per ``sync_every``. Returns the frame's offset.

        If the write fails half-way, the partial frame is cut off again before the error is
        raised, so later appends never land after garbage."""
        if self._broken:
            raise LedgerError(f"{self.path}: writer disabled after an earlier failure: {self._broken}")
        data = frame(payload)
        offset = self.size
        try:
            view = memoryview(data)
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
            self._unsynced += 1
            if self.sync_every and self._unsynced >= self.sync_every:
                self.sync()
        except OSError as exc:
            try:
                os.ftruncate(self._fd, offset)
                os.lseek(self._fd, offset, os.SEEK_SET)
            except OSError as exc2:
                self._broken = f"could not cut a partial frame at byte {offset}: {exc2}"
            raise exc
        self.size = offset + len(data)
        return offset

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
