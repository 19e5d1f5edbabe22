"""The ledger's one writer in the coordinator process: the durable order, and the halt.

Every record the process appends (the coordinator's, the prediction service's) goes through
:class:`LedgerWriter`, in this order, each step the commit point of the one before:

accept an update:  spool file (fsync) -> ledger "update" block -> fold (``ledger.state``).
a batch of them:   all their spool files (fsyncs, one directory fsync) -> their "update"
                   blocks in one commit group (one fsync) -> fold.
a new model:       model file (fsync) -> ledger "aggregate"/"model.published" block -> fold,
                   then the spool of the round it closes is removed.

The fold (:class:`federation.fleet_state.FleetState`) is updated by the ledger's append itself,
after the block is written, so it never runs ahead of the file. If the ledger cannot be
written the writer halts (``halted`` says why) and raises :class:`StorageError`: nothing is
accepted that the ledger does not hold. A block is announced (block, retained head, signed
checkpoint) once it is durable: at once, or after a group commit's fsync.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NoReturn, Protocol

from coordinator.storage import ModelStore, Spool, StorageError
from federation import records
from federation.codec import TensorDict
from federation.fleet_state import FleetState

log = logging.getLogger(__name__)

# (durable blocks in chain order, signed checkpoint of the chain ending with the last of them)
Announce = Callable[[Sequence[Any], str], None]


class LedgerLike(Protocol):
    """The part of :class:`federation.fleet_state.FleetLedger` the coordinator uses."""

    def append(self, data: dict[str, Any], *, sign: bool = True) -> Any: ...

    def group_commit(self) -> contextlib.AbstractContextManager[list[Any]]: ...

    def __iter__(self) -> Any: ...

    def blocks(self, start: int = 0, end: int | None = None) -> list[Any]: ...

    def block(self, index: int) -> Any: ...

    @property
    def head(self) -> Any: ...

    def signed_checkpoint(self) -> str: ...

    def vouch(self, public_key: bytes, message: bytes, signature: bytes) -> None: ...

    @property
    def state(self) -> FleetState: ...


class LedgerWriter:
    def __init__(self, ledger: LedgerLike, spool: Spool, models: ModelStore, *, announce: Announce) -> None:
        self.ledger = ledger
        self.spool = spool
        self.models = models
        self._announce = announce
        self.halted: str | None = None  # why the process no longer accepts anything (storage failed, ...)
        self._in_group = False  # appends are announced by the group's caller once it is durable
        self._after_group: list[Callable[[], None]] = []  # steps that wait for the group's fsync

    @property
    def state(self) -> FleetState:
        """The fold of the chain up to the head."""
        return self.ledger.state

    def append(self, record: dict[str, Any], *, announce: bool = True, sign: bool = True) -> Any:
        """Append one record (durable on return unless in a group commit); halt if the ledger
        cannot be written. ``announce=False``: the caller announces it once it is durable (inside
        a group it always does). ``sign=False`` inside a group: the group's signed last block
        covers it through the hash chain."""
        try:
            block = self.ledger.append(record, sign=sign)
        except OSError as exc:
            self._halt(exc)
        if announce and not self._in_group:
            self.announce([block])
        return block

    def _halt(self, exc: OSError) -> NoReturn:
        self.halted = f"cannot write the ledger: {exc}"
        log.critical("%s; no longer accepting updates or requests", self.halted)
        raise StorageError(exc.errno or 5, self.halted) from exc

    def announce(self, blocks: Sequence[Any]) -> None:
        """Tell the ledger's followers about durable blocks (whoever appended them): each block,
        then one retained head and one signed checkpoint at the last."""
        if blocks:
            self._announce(blocks, self.ledger.signed_checkpoint())

    def accept_updates(self, round_number: int,
                       updates: Sequence[tuple[str, bytes, bytes, bytes, dict[str, Any]]]) -> list[Any]:
        """Accepted updates ``(device, envelope, statement, signature, extra)``: every envelope into
        the spool (durable before any of their blocks is written), then their ledger records in one
        commit group (``extra``: asynchronous mode's version, staleness and weight). Returns the
        durable blocks; the caller acknowledges and announces them."""
        if not updates:
            return []
        self.spool.put_many(round_number, [(device, payload) for device, payload, _, _, _ in updates])
        with self.group_commit() as committed:
            for _, _, statement, signature, extra in updates:
                self.append(records.update(statement, signature, **extra), sign=False)
        return committed

    def new_model(self, round_number: int, model: TensorDict, record: dict[str, Any], *,
                  closes: int | None = None) -> Any:
        """A global model for ``round_number``: its file (fsync), then the record naming it;
        then the spool of the round it ``closes`` (aggregated or abandoned) is removed."""
        self.models.save(round_number, model)
        block = self.append(record)
        if closes is not None:
            self._once_durable(lambda: self.spool.drop_round(closes))
        return block

    def _once_durable(self, step: Callable[[], None]) -> None:
        """Run ``step`` now, or, inside a group commit, once the group is durable."""
        if self._in_group:
            self._after_group.append(step)
        else:
            step()

    @contextlib.contextmanager
    def group_commit(self) -> Iterator[list[Any]]:
        """Appends inside share one write and one fsync (the ledger's group commit); the yielded
        list then holds their durable blocks, which the caller announces: nothing is published
        before it is durable. An exception after the commit still announces what it made durable."""
        committed: list[Any] = []
        self._in_group = True
        try:
            with self.ledger.group_commit() as committed:
                yield committed
        except OSError as exc:
            self._halt(exc)
        except BaseException:
            self.announce(committed)
            raise
        finally:
            self._in_group = False
            after, self._after_group = self._after_group, []
        for step in after:  # reached only when the group is durable
            step()
