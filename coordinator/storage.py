"""What the coordinator keeps on disk besides the ledger.

- ``models/global-RRRRRR.safetensors``: the global model that round R trains from
  (safetensors: no pickle, so loading can never run code). Written atomically.
- ``spool/round-RRRRRR/``: each accepted update's envelope, written and fsynced *before* its
  ledger block, so after a crash the open round's running sum can be rebuilt from the ledger's
  accepted records. A batch of updates goes into segment files ``batch-SSSSSSSSSSSS-JJJJ.spool``
  of about :data:`SEGMENT_BYTES` each (a msgpack stream of ``[device, envelope]`` arrays),
  written and fsynced side by side, then one fsync of the directory (:meth:`Spool.put_many`):
  one fsync per ~1 MiB, not per update (256 small updates cost 256 fsyncs before). A single
  update (:meth:`Spool.put`) and spools of earlier versions are ``<device>.update`` files. An
  entry without a ledger record (a crash came in between) is never read and goes with its
  round; a device's latest entry is the one read. Removed once the round is aggregated.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import msgpack
import numpy as np
from safetensors.numpy import load_file, save_file

from federation import durable
from federation.codec import TensorDict

log = logging.getLogger(__name__)

MAX_ENTRY_BYTES = (1 << 32) - 1  # a spool entry read back (msgpack bin 32: an envelope below 4 GiB)
SEGMENT_BYTES = 1 << 20  # envelopes per spool segment file (one fsync each); a larger envelope goes alone


class StorageError(OSError):
    """The coordinator cannot persist what it must; it stops accepting rather than lie."""


class SyncThreads:
    """Threads for file system waits (fsyncs, removals), owned by one store: created by its
    first wait, ended by :meth:`close`."""

    def __init__(self, threads: int = 16) -> None:
        self._threads = threads
        self._pool: ThreadPoolExecutor | None = None

    def pool(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self._threads, thread_name_prefix="storage")
        return self._pool

    def close(self) -> None:
        """Wait for what was handed to the threads (a background removal) and end them."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def sync_together(paths: list[Path], threads: SyncThreads) -> None:
    """fsync files already in place and their directories, all at once: concurrent fsyncs share
    the file system's journal commits (ext4: one commit covers a new file, its data and its
    directory entry), so N files cost about one fsync's wait, not 2N. Raises OSError."""
    targets = [*paths, *dict.fromkeys(path.parent for path in paths)]
    fds: list[int] = []
    try:
        for target in targets:
            fds.append(os.open(target, os.O_RDONLY))
        list(threads.pool().map(os.fsync, fds))
    finally:
        for fd in fds:
            os.close(fd)


def write_synced(path: Path, *parts: bytes) -> None:
    """Write ``parts`` beside ``path``, fsync them and rename the file into place; the rename is durable
    once the directory is fsynced (:meth:`Spool.put_many` does that once for a batch). Meant to
    run on a storage thread: it holds the GIL only between its system calls."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        for part in parts:
            view = memoryview(part)
            while view:
                view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def atomic_write(path: Path, data: bytes) -> None:
    """Durable write-then-rename; a failure becomes a StorageError naming the file."""
    try:
        durable.atomic_write(path, data)
    except OSError as exc:
        raise StorageError(exc.errno, f"cannot write {path}: {exc.strerror or exc}") from exc


class ModelStore:
    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.threads = SyncThreads()

    def close(self) -> None:
        self.threads.close()

    def path(self, round_number: int) -> Path:
        return self.directory / f"global-{round_number:06d}.safetensors"

    def save(self, round_number: int, tensors: TensorDict) -> Path:
        path = self.path(round_number)
        order = list(tensors)
        tmp = path.with_name(path.name + ".tmp")
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            save_file(
                # np.require, not ascontiguousarray: that turns 0-d tensors into 1-d ones.
                {k: np.require(v, requirements="C") for k, v in tensors.items()}, str(tmp),
                metadata={"fledger.round": str(round_number), "fledger.order": json.dumps(order)},
            )
            # The record naming it is appended after this returns: file and directory are
            # fsynced together (one wait), and a crash before leaves a file no record names.
            os.replace(tmp, path)
            sync_together([path], self.threads)
        except OSError as exc:
            raise StorageError(exc.errno, f"cannot save model {path}: {exc.strerror or exc}") from exc
        return path

    def rounds(self) -> list[int]:
        """Rounds with a saved model, ascending."""
        if not self.directory.is_dir():
            return []
        found = []
        for path in self.directory.glob("global-*.safetensors"):
            try:
                found.append(int(path.name.removeprefix("global-").removesuffix(".safetensors")))
            except ValueError:
                continue
        return sorted(found)

    def prune(self, keep_last: int, keep_rounds: set[int]) -> list[int]:
        """Delete model files except the newest ``keep_last`` (0: keep all) and ``keep_rounds``
        (models the ledger marks as restore targets); returns the rounds deleted. The ledger
        keeps every model's hash, so a deleted model can still be recognised if brought back."""
        if keep_last <= 0:
            return []
        saved = self.rounds()
        doomed = [r for r in saved[:-keep_last] if r not in keep_rounds]
        for round_number in doomed:
            self.path(round_number).unlink(missing_ok=True)
        return doomed

    def load(self, round_number: int) -> TensorDict | None:
        path = self.path(round_number)
        return read_model_file(path) if path.exists() else None


def read_model_file(path: Path) -> TensorDict:
    """A model saved by :meth:`ModelStore.save`, in its original tensor order (safetensors:
    loading never runs code)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as handle:
            metadata = handle.metadata() or {}
        loaded = load_file(str(path))
        order = json.loads(metadata.get("fledger.order", "[]")) or sorted(loaded)
        return {name: loaded[name] for name in order}
    except (SafetensorError, ValueError, KeyError, TypeError) as exc:
        raise ModelFileError(f"{path} is not a model file saved by fledger (damaged?): {exc}") from None


def _write_segment(segment: tuple[Path, list[tuple[str, bytes]]]) -> dict[str, tuple[Path, int, int]]:
    """Write one spool segment (on a storage thread: the entries are packed there too); returns
    where each envelope is in it."""
    path, envelopes = segment
    entries = [msgpack.packb([device, data], use_bin_type=True) for device, data in envelopes]
    where, offset = {}, 0
    for (device, data), entry in zip(envelopes, entries, strict=True):
        offset += len(entry)
        where[device] = (path, offset - len(data), len(data))  # the envelope ends its entry
    write_synced(path, *entries)
    return where


class ModelFileError(ValueError):
    """A model file that cannot be read back (truncated, damaged, not a fledger model)."""


DROPPED = ".dropped-"  # prefix of a closed round's spool being deleted


class Spool:
    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.threads = SyncThreads()
        # Per round: where each device's latest spooled envelope is (segment, offset, length),
        # and the next segment number; kept as segments are written, read from them after a restart.
        self._index: dict[int, dict[str, tuple[Path, int, int]]] = {}
        self._next_segment: dict[int, int] = {}
        self._named: set[int] = set()  # rounds whose directory's entry in the spool was fsynced

    def close(self) -> None:
        self.threads.close()

    def _round_dir(self, round_number: int) -> Path:
        return self.directory / f"round-{round_number:06d}"

    def put(self, round_number: int, device: str, envelope: bytes) -> None:
        atomic_write(self._round_dir(round_number) / f"{device}.update", envelope)
        self._round_index(round_number).pop(device, None)  # its latest envelope is now this file

    def put_many(self, round_number: int, envelopes: list[tuple[str, bytes]]) -> None:
        """Several devices' envelopes, all durable on return: in segment files of about
        :data:`SEGMENT_BYTES`, each written, fsynced and renamed into place on the storage threads
        side by side (:func:`write_synced`), then the directory fsynced once. Their ledger records
        come after, so a crash before leaves entries no record names."""
        directory = self._round_dir(round_number)
        try:
            directory.mkdir(parents=True, exist_ok=True)
            index = self._round_index(round_number)
            number = self._next_segment.get(round_number, 0)
            segments: list[tuple[Path, list[tuple[str, bytes]]]] = []
            size = SEGMENT_BYTES
            for device, data in envelopes:
                if size + len(data) > SEGMENT_BYTES and size > 0:
                    segments.append((directory / f"batch-{number:012d}-{len(segments):04d}.spool", []))
                    size = 0
                segments[-1][1].append((device, data))
                size += len(data)
            self._next_segment[round_number] = number + 1
            for written in self.threads.pool().map(_write_segment, segments):
                index.update(written)
            durable.fsync_dir(directory)
            if round_number not in self._named:  # the round's directory is named in the spool's: that
                durable.fsync_dir(self.directory)  # entry too, once per process (made before a crash?)
                self._named.add(round_number)
        except OSError as exc:
            self._index.pop(round_number, None)  # read again from what is on disk
            raise StorageError(exc.errno, f"cannot write the spool in {directory}: {exc.strerror or exc}") from exc

    def get(self, round_number: int, device: str) -> bytes | None:
        """The device's latest envelope in the round's spool, or None."""
        where = self._round_index(round_number).get(device)
        if where is not None:
            path, offset, length = where
            with open(path, "rb") as handle:
                data = os.pread(handle.fileno(), length, offset)
            if len(data) == length:
                return data
        path = self._round_dir(round_number) / f"{device}.update"
        return path.read_bytes() if path.exists() else None

    def _round_index(self, round_number: int) -> dict[str, tuple[Path, int, int]]:
        """The round's index, read from its segment files (in the order written) the first time."""
        index = self._index.get(round_number)
        if index is not None:
            return index
        index = self._index[round_number] = {}
        directory = self._round_dir(round_number)
        segments = sorted(directory.glob("batch-*.spool")) if directory.is_dir() else []
        for path in segments:
            try:
                with open(path, "rb") as handle:
                    # max_buffer_size: an entry is buffered whole, and msgpack's default (100 MiB)
                    # is below what --max-update-bytes allows (BufferFull: a sound segment unread).
                    unpacker = msgpack.Unpacker(handle, raw=False, max_buffer_size=MAX_ENTRY_BYTES,
                                                max_bin_len=MAX_ENTRY_BYTES - 2048, max_str_len=1024,
                                                max_array_len=2, max_map_len=0)
                    for entry in unpacker:
                        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)
                                and isinstance(entry[1], bytes)):
                            raise ValueError("not a [device, envelope] entry")
                        index[entry[0]] = (path, unpacker.tell() - len(entry[1]), len(entry[1]))
            except (ValueError, msgpack.UnpackException) as exc:  # renamed only once complete: a damaged disk
                log.error("spool segment %s is damaged after %d entries: %s: %s", path, len(index),
                          type(exc).__name__, exc)
        if segments:
            self._next_segment[round_number] = max(
                self._next_segment.get(round_number, 0), int(segments[-1].name.split("-")[1]) + 1)
        return index

    def drop_round(self, round_number: int) -> None:
        """Remove a closed round's spool. One rename takes it out of the spool at once; its files
        (N of them: seconds at N = 1,000 on a busy disk) are deleted by a background thread, or,
        after a crash, by the next :meth:`drop_before`."""
        directory = self._round_dir(round_number)
        self._index.pop(round_number, None)
        self._next_segment.pop(round_number, None)
        self._named.discard(round_number)
        doomed = self.directory / f"{DROPPED}{directory.name}-{os.urandom(4).hex()}"
        try:
            os.rename(directory, doomed)
        except FileNotFoundError:
            return
        except OSError:
            shutil.rmtree(directory, ignore_errors=True)
            return
        self.threads.pool().submit(shutil.rmtree, doomed, ignore_errors=True)

    def drop_before(self, round_number: int) -> list[int]:
        """Remove the spools of rounds before ``round_number`` (closed rounds whose removal a
        crash interrupted); returns their numbers."""
        for path in self.directory.glob(f"{DROPPED}*"):
            shutil.rmtree(path, ignore_errors=True)  # a removal a crash or exit interrupted
        dropped = []
        for path in sorted(self.directory.glob("round-*")):
            try:
                number = int(path.name.removeprefix("round-"))
            except ValueError:
                continue
            if number < round_number:
                self.drop_round(number)
                dropped.append(number)
        return dropped

    def check_writable(self) -> None:
        """Fail early (at start) if the spool cannot be written."""
        atomic_write(self.directory / ".probe", b"ok")
