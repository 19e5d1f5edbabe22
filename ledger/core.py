"""The :class:`Ledger`: a signed, append-only chain of blocks in one file."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Self

from ledger import checkpoint as checkpoints
from ledger import merkle, storage
from ledger.block import Block, BlockFormatError, make_block, sign_block
from ledger.genesis import genesis
from ledger.keys import Keyring, Signer
from ledger.merkle import ProofError
from ledger.storage import LedgerCorrupt, LedgerError, LedgerFile
from ledger.verify import ChainState, RecordRules, Rules, Signatures, VerifyError, sealed_length, unsealed_text

log = logging.getLogger(__name__)

# A commit group is written (with its last block signed) whenever it holds this many blocks or
# bytes, even before it ends: a monitor never holds more than this unsigned, and a replay of one
# request (1 MiB) always reaches the signed block that proves them. Also the largest unsealed
# tail a writer cuts off at open by itself.
MAX_GROUP_BLOCKS = 1000
MAX_GROUP_BYTES = 512 * 1024


class Ledger:
    """A signed, append-only hash chain stored in one file.

    Use :meth:`open`. Thread-safe: appends are serialised, readers get snapshots."""

    def __init__(self, path: Path, file: LedgerFile | None, blocks: list[Block], state: ChainState,
                 signer: Signer | None, now: Callable[[], float]) -> None:
        self.path = path
        self._file = file
        self._blocks = blocks
        self._state = state
        self._signer = signer
        self._now = now
        self._lock = threading.RLock()
        self._group: list[Block] | None = None  # the open commit group's blocks, not yet written
        self._group_bytes = 0
        self._committed: list[Block] = []  # the open group's blocks already written, as written
        self._chain_leaves = [merkle.leaf_hash(b.hash) for b in blocks]
        self._frontier = merkle.Frontier()  # the chain root in O(log n) per append, for checkpoints
        for leaf in self._chain_leaves:
            self._frontier.append(leaf)

    @classmethod
    def open(cls, path: str | Path, signer: Signer | None = None, keyring: Keyring | None = None,
             fleet: str | None = None, difficulty: int = 0, now: Callable[[], float] = time.time, *,
             read_only: bool | None = None, sync_every: int = 1, trusted_coordinator_key: bytes | None = None,
             verify: Signatures | str = Signatures.HEAD, genesis_extra: dict[str, Any] | None = None,
             rules: Rules | None = None) -> Ledger:
        """Open a ledger file, creating it with a genesis block if it is new (needs ``signer`` and ``fleet``).

        An existing file is checked block by block (hashes, links, proofs of work, and ``rules``:
        what the records mean, checked and folded by a fresh ``rules()``, see :attr:`rules`) and
        its signatures per ``verify`` (default: the head's coordinator signature,
        which commits to the whole chain; ``"all"`` checks every signature, at ~0.07 ms each).
        Without a signer the ledger is read-only (never truncated, never created). A torn last
        frame is truncated with a WARNING by a writer; other damage raises :class:`LedgerCorrupt`.
        ``sync_every``: fsync after this many appends (1: every append; 0: only on :meth:`sync`/close)."""
        path = Path(path)
        read_only = signer is None if read_only is None else read_only
        if not read_only and signer is None:
            raise LedgerError("a writable ledger needs a signer")
        file: LedgerFile | None = None
        if read_only:
            scanned = storage.read(path)
            if scanned.torn is not None:
                log.warning("%s: torn tail of %d bytes at byte %d ignored (read-only): %s", path,
                            scanned.torn.length, scanned.torn.offset, scanned.torn.reason)
        else:
            file, scanned = LedgerFile.open(path, sync_every=sync_every)
        mode = Signatures(verify)
        state = ChainState(trusted_coordinator_key=trusted_coordinator_key, keyring=keyring,
                           coordinator_signatures=mode is Signatures.ALL, device_signatures=mode is Signatures.ALL,
                           rules=rules() if rules is not None else None)
        blocks: list[Block] = []
        try:
            sealed = sealed_length(scanned.payloads)
            if sealed < len(scanned.payloads):
                _set_aside_unsealed(path, file, scanned, sealed)
            for i, payload in enumerate(scanned.payloads[:sealed]):
                offset = scanned.offsets[i]
                try:
                    block = Block.from_bytes(payload)
                    state.add(block)
                except BlockFormatError as exc:
                    raise LedgerCorrupt(i, str(exc), offset, path) from None
                except VerifyError as exc:
                    raise LedgerCorrupt(i, exc.reason, offset, path) from None
                blocks.append(block)
            if blocks and mode is Signatures.HEAD:
                try:
                    state.check_signature(blocks[-1])
                except VerifyError as exc:
                    raise LedgerCorrupt(exc.index, exc.reason, scanned.offsets[-1], path) from None
            state.device_signatures = True  # new update records are always checked
            ledger = cls(path, file, blocks, state, signer, now)
            if not blocks:
                if file is None or signer is None:
                    raise LedgerError(f"{path}: empty ledger (no genesis block)")
                if not fleet:
                    raise LedgerError(f"{path}: a new ledger needs a fleet name")
                state.keyring.setdefault(signer.key_id, signer.public_key)
                ledger._append_locked(genesis(fleet, signer.public_key, difficulty, **(genesis_extra or {})))
                log.info("%s: new ledger for fleet %r, coordinator key %s", path, fleet, signer.key_id)
            else:
                if fleet and fleet != state.fleet:
                    raise LedgerError(f"{path} is the ledger of fleet {state.fleet!r}, not {fleet!r}")
                if signer is not None and not read_only and (signer.key_id != state.coordinator_key_id or
                                                            signer.public_key != state.keyring.get(signer.key_id)):
                    raise LedgerError(f"{path}: signer key {signer.key_id} is not this ledger's coordinator key "
                                      f"{state.coordinator_key_id}")
                if difficulty and difficulty != state.difficulty:
                    log.warning("%s: difficulty %d requested but the genesis block fixes %d; using %d", path,
                                difficulty, state.difficulty, state.difficulty)
        except BaseException:
            if file is not None:
                file.close()
            raise
        return ledger

    # -- writing ------------------------------------------------------------------------------------
    def append(self, data: dict[str, Any], *, sign: bool = True) -> Block:
        """Append a record (a dict with a str ``"type"``): mine, sign, check, write, fsync.

        Outside :meth:`group_commit` the block is signed and durable when this returns. Inside,
        it is written and fsync'd when the group ends; with ``sign=False`` it carries no signature
        of its own unless it is the group's last block: the coordinator's signature on that one
        covers it through the hash chain (keep ``sign=True`` for a block that travels alone, e.g.
        inside a model message or a receipt). The durable blocks are in the list the group yields.

        The record is stored as given (the log fills nothing in). Raises ``ValueError``
        (:class:`VerifyError`, ``CanonicalError``) for a record the chain rules refuse, ``OSError``
        if the file cannot be written."""
        with self._lock:
            return self._append_locked(data, sign=sign)

    def append_many(self, entries: list[dict[str, Any]]) -> list[Block]:
        """Append records as one commit group: one fsync for all, one signature (on the last
        block; see :meth:`group_commit`). Returns the durable blocks. A record the chain rules
        refuse raises after the ones before it are committed."""
        with self.group_commit() as committed:
            for data in entries:
                self.append(data, sign=False)
        return committed

    def _append_locked(self, data: dict[str, Any], *, sign: bool = True) -> Block:
        if self._file is None or self._signer is None:
            raise LedgerError(f"{self.path} is open read-only")
        if not isinstance(data, dict) or not isinstance(data.get("type"), str):
            raise ValueError('a record is a dict with a str "type"')
        difficulty = self._state.difficulty if self._blocks else int(data.get("difficulty", 0))
        group = self._group
        signed = sign or group is None or not self._blocks
        block = make_block(self._state.height, float(self._now()), data, self._state.head_hash,
                           signer=self._signer if signed else None, difficulty=difficulty)
        self._state.check(block, signature=not self._blocks)
        if group is None:
            self._file.append(block.to_bytes())
        self._state.apply(block)
        self._blocks.append(block)
        self._chain_leaves.append(merkle.leaf_hash(block.hash))
        self._frontier.append(self._chain_leaves[-1])
        if group is not None:
            group.append(block)
            self._group_bytes += len(block.body)
            if len(group) >= MAX_GROUP_BLOCKS or self._group_bytes >= MAX_GROUP_BYTES:
                self._write_group()
        return block

    def _write_group(self) -> None:
        """Write the open group's blocks with one ``write``, its last block signed (no fsync yet)."""
        group, file, signer = self._group, self._file, self._signer
        if not group or file is None or signer is None:
            return
        if group[-1].unsigned:  # the seal: its signature covers every block before it
            group[-1] = self._blocks[-1] = sign_block(group[-1], signer)
            self._state.unsealed_from = None
        try:
            file.append_many([b.to_bytes() for b in group], sync=False)
        except OSError as exc:
            # The blocks are in memory but not in the file: forget them and refuse further appends
            # (the chain state cannot be rolled back); reopening the ledger reads the file again.
            file.disable(f"a commit group of {len(group)} blocks could not be written: {exc}")
            del self._blocks[len(self._blocks) - len(group):]
            del self._chain_leaves[len(self._blocks):]
            self._frontier = merkle.Frontier()
            for leaf in self._chain_leaves:
                self._frontier.append(leaf)
            group.clear()
            raise
        self._committed.extend(group)
        group.clear()
        self._group_bytes = 0

    @contextlib.contextmanager
    def group_commit(self) -> Iterator[list[Block]]:
        """Appends made inside share one ``write`` and one fsync when the block ends (group
        commit): none of them is durable before that, so publish and acknowledge nothing about
        them until the block has exited. Yields a list that then holds the group's durable blocks,
        as written (with ``append(..., sign=False)``, only the last of them, and any block
        appended with ``sign=True``, carries a signature). Nested groups join the outer one."""
        with self._lock:
            if self._file is None:
                raise LedgerError(f"{self.path} is open read-only")
            if self._group is not None:
                yield self._committed
                return
            self._group, self._group_bytes, self._committed = [], 0, []
            committed = self._committed
            try:
                yield committed
            finally:
                try:
                    self._write_group()
                    self._file.sync()
                finally:
                    self._group = None

    def sync(self) -> None:
        with self._lock:
            if self._file is not None:
                self._write_group()
                self._file.sync()

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._write_group()
                self._file.close()
                self._file = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading ------------------------------------------------------------------------------------
    @property
    def head(self) -> Block:
        return self._blocks[-1]

    @property
    def height(self) -> int:
        return len(self._blocks)

    @property
    def fleet(self) -> str:
        return self._state.fleet

    @property
    def difficulty(self) -> int:
        return self._state.difficulty

    @property
    def coordinator_key(self) -> bytes:
        return self._state.keyring[self._state.coordinator_key_id]

    def __len__(self) -> int:
        return len(self._blocks)

    def __iter__(self) -> Iterator[Block]:
        return iter(self._blocks[:])

    def blocks(self, start: int = 0, end: int | None = None) -> list[Block]:
        return self._blocks[start:end]

    def block(self, index: int) -> Block:
        if not 0 <= index < len(self._blocks):
            raise IndexError(f"no block {index} (height {len(self._blocks)})")
        return self._blocks[index]

    @property
    def rules(self) -> RecordRules | None:
        """The record rules this ledger was opened with, holding their fold up to the head."""
        return self._state.rules

    # -- proofs -------------------------------------------------------------------------------------
    def chain_root(self, size: int | None = None) -> bytes:
        """RFC 6962 root over the hashes of the first ``size`` blocks (default: all)."""
        with self._lock:
            if size is None or size == self._frontier.size:
                return self._frontier.root()
            if not 0 <= size <= len(self._chain_leaves):
                raise ValueError(f"size {size} not in 0..{len(self._chain_leaves)}")
            return merkle.root(self._chain_leaves[:size])

    def consistency_proof(self, old_size: int, new_size: int | None = None) -> list[bytes]:
        """RFC 6962 proof that the chain at height ``new_size`` extends the chain at ``old_size``
        (0 < old_size <= new_size <= height; :class:`ProofError` otherwise)."""
        with self._lock:
            new_size = len(self._chain_leaves) if new_size is None else new_size
            if not 0 < old_size <= new_size <= len(self._chain_leaves):
                raise ProofError(f"need 0 < old {old_size} <= new {new_size} <= height {len(self._chain_leaves)}")
            return merkle.consistency_proof(self._chain_leaves[:new_size], old_size)

    # -- checkpoints (C2SP tlog-checkpoint signed notes) ----------------------------------------------
    @property
    def origin(self) -> str:
        """The log's name in its checkpoints: ``fledger/<fleet>/<first 8 bytes of the genesis hash, hex>``."""
        return checkpoints.origin_of(self.fleet, self._blocks[0].hash)

    def checkpoint(self, size: int | None = None) -> checkpoints.Checkpoint:
        """The (unsigned) tree head of the chain at height ``size`` (default: now)."""
        with self._lock:
            size = len(self._blocks) if size is None else size
            return checkpoints.Checkpoint(self.origin, size, self.chain_root(size))

    def vouch(self, public_key: bytes, message: bytes, signature: bytes) -> None:
        """The caller has just verified this signature (e.g. a device's, on a record it is about
        to append): the append's check of these very bytes does not verify it again
        (:meth:`ledger.keys.Verifier.vouch`). Reading or verifying the ledger checks it as ever."""
        self._state.verifier.vouch(public_key, message, signature)

    def signed_checkpoint(self) -> str:
        """The current tree head as a signed note, signed by the writer's coordinator key."""
        if self._signer is None:
            raise LedgerError(f"{self.path} is open read-only: no key to sign a checkpoint")
        return checkpoints.sign_checkpoint(self.checkpoint(), self._signer)

    def verifier_key(self) -> str:
        """The note verifier key (``<origin>+<key id>+<base64 key>``) that checks this ledger's checkpoints."""
        return checkpoints.verifier_key(self.origin, self.coordinator_key)

def _set_aside_unsealed(path: Path, file: LedgerFile | None, scanned: storage.ScanResult, sealed: int) -> None:
    """An unsealed tail at open: a writer cuts it (saved to ``<file>.torn-<offset>``), a reader ignores it."""
    count = len(scanned.payloads) - sealed
    reason = unsealed_text(sealed, len(scanned.payloads))
    if file is None:
        log.warning("%s: %s; ignored (read-only)", path, reason)
        return
    if count > MAX_GROUP_BLOCKS:  # no commit group leaves that many: not a crash's residue
        raise LedgerCorrupt(sealed, f"{reason}, more than one commit group ({count} blocks): not cut automatically",
                            scanned.offsets[sealed], path)
    offset = scanned.offsets[sealed]
    file.cut_tail(offset)
    log.warning("%s: %s; truncated at byte %d, bytes saved to %s.torn-%d", path, reason, offset, path.name, offset)


def chain_root_of(blocks: list[Block]) -> bytes:
    """Chain-level tree root over block hashes (what :meth:`Ledger.chain_root` computes)."""
    return merkle.root([merkle.leaf_hash(b.hash) for b in blocks])
