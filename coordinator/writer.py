"""The ledger's one writer in the coordinator process: the durable order, and the halt.

Every record the process appends (the coordinator's, the prediction service's) goes through
:class:`LedgerWriter`, in this order, each step the commit point of the one before:

accept an update:  spool file (fsync) -> ledger "update" block -> fold (``ledger.state``).
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
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from coordinator.storage import ModelStore, Spool, StorageError
from federation import records
from federation.codec import TensorDict
from federation.fleet_state import FleetState

log = logging.getLogger(__name__)

Announce = Callable[[Any, str], None]  # (durable block, signed checkpoint of the chain ending with it)


class LedgerLike(Protocol):
    """The part of :class:`federation.fleet_state.FleetLedger` the coordinator uses."""

    def append(self, data: dict[str, Any]) -> Any: ...

    def __iter__(self) -> Any: ...

    def blocks(self, start: int = 0, end: int | None = None) -> list[Any]: ...

    @property
    def head(self) -> Any: ...

    def signed_checkpoint(self) -> str: ...

    @property
    def state(self) -> FleetState: ...


class LedgerWriter:
    def __init__(self, ledger: LedgerLike, spool: Spool, models: ModelStore, *, announce: Announce) -> None:
        self.ledger = ledger
        self.spool = spool
        self.models = models
        self._announce = announce
        self.halted: str | None = None  # why the process no longer accepts anything (storage failed, ...)

    @property
    def state(self) -> FleetState:
        """The fold of the chain up to the head."""
        return self.ledger.state

    def append(self, record: dict[str, Any], *, announce: bool = True) -> Any:
        """Append one record (durable on return unless in a group commit); halt if the ledger
        cannot be written. ``announce=False``: the caller announces it once it is durable."""
        try:
            block = self.ledger.append(record)
        except OSError as exc:
            self.halted = f"cannot write the ledger: {exc}"
            log.critical("%s; no longer accepting updates or requests", self.halted)
            raise StorageError(exc.errno or 5, self.halted) from exc
        if announce:
            self.announce(block)
        return block

    def announce(self, block: Any) -> None:
        """Tell the ledger's followers about a durable block (whoever appended it)."""
        self._announce(block, self.ledger.signed_checkpoint())

    def accept_update(self, round_number: int, device: str, payload: bytes, statement: bytes,
                      signature: bytes) -> Any:
        """An accepted update: its envelope into the spool (fsync), then its ledger record."""
        self.spool.put(round_number, device, payload)
        return self.append(records.update(statement, signature))

    def new_model(self, round_number: int, model: TensorDict, record: dict[str, Any], *,
                  closes: int | None = None) -> Any:
        """A global model for ``round_number``: its file (fsync), then the record naming it;
        then the spool of the round it ``closes`` (aggregated or abandoned) is removed."""
        self.models.save(round_number, model)
        block = self.append(record)
        if closes is not None:
            self.spool.drop_round(closes)
        return block

    @contextlib.contextmanager
    def group_commit(self) -> Iterator[None]:
        """Appends inside share one fsync at the end (when the ledger supports it)."""
        commit = getattr(self.ledger, "group_commit", contextlib.nullcontext)
        with commit():
            yield
