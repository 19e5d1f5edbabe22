"""Start-up check: is the local ledger behind (or beside) a history this coordinator published?

Pure: the daemon gathers the evidence (the local ledger's head, the checkpoint file, the
coordinator's own signed retained head on the broker, the saved model files) and this module
decides. A coordinator that resumed from a ledger restored from an old backup, truncated at a
block boundary, or lost with its state directory would re-run rounds it already published: a
fork of public history that devices and monitors cannot reconcile. So it refuses, with one
line that says what happened and how to fix it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from ledger import Block, BlockFormatError, Verifier

RESTORE_HINT = ("restore it from a monitor's replica (`fledger ledger restore --replica FILE --state-dir DIR "
                "--keys KEYS`)")
NEW_CHAIN_HINT = "or, to really start a new chain, pass --new-chain (every agent must then accept the reset)"


class StateRefused(Exception):
    """The coordinator must not start on this state (exit code 5, STATE)."""


@dataclass(frozen=True)
class Head:
    """A signed head seen somewhere: the chain's height (blocks) and its last block's hash."""

    height: int
    hash: bytes
    source: str  # where it was seen, for the message: "the broker's retained head", "checkpoint FILE"
    timestamp: float = 0.0  # the signed time of that last block (seconds since the epoch)


@dataclass(frozen=True)
class Evidence:
    local_height: int  # blocks in ledger.log (0: empty or missing)
    local_hash_at: Callable[[int], bytes]  # hash of the local block at an index < local_height
    model_round: int | None  # round of the latest model the local ledger names (None: no ledger)
    heads: tuple[Head, ...] = ()  # checkpoint, broker head: what we know we published
    model_files: tuple[int, ...] = ()  # rounds of the model files in the state directory
    models_dir: str = "models"


def signed_head(raw: bytes, coordinator_key: bytes, source: str) -> Head | None:
    """The head in a block this coordinator signed (the retained ledger/head message, the
    checkpoint file); None if it is not one (malformed, or signed by another key)."""
    try:
        block = Block.from_bytes(raw)
    except BlockFormatError:
        return None
    if block.computed_hash() != block.hash or not Verifier().verify(coordinator_key, block.hash, block.signature):
        return None
    return Head(block.index + 1, block.hash, source, block.timestamp)


def model_round_of(records: Iterable[dict[str, Any]]) -> int | None:
    """The round whose model the ledger names last (the one the coordinator resumes with)."""
    latest = None
    for data in records:
        kind = data.get("type")
        if kind == "aggregate":
            latest = int(data["round"]) + 1
        elif kind == "model.published" and data.get("initial"):
            latest = int(data["round"])
    return latest


def check(evidence: Evidence, *, new_chain: bool = False) -> str | None:
    """Raise :class:`StateRefused` if the local ledger is behind or beside what was published;
    else return a note for the log (None when there was nothing to compare with)."""
    height = evidence.local_height
    if new_chain and not height:  # with a ledger it means nothing: that chain continues, checked as usual
        if evidence.model_files:
            raise StateRefused(f"--new-chain, but {evidence.models_dir} still holds models of the old chain "
                               f"(rounds up to {max(evidence.model_files)}): move the state directory away first")
        return "starting a new chain (--new-chain)" + (
            f"; the old one reached height {max(h.height for h in evidence.heads)}" if evidence.heads else "")
    for head in evidence.heads:
        if head.height > height:
            what = "is empty" if not height else f"has {height} blocks"
            raise StateRefused(
                f"ledger.log {what} but {head.source} shows height {head.height} (block {head.height - 1} "
                f"{head.hash.hex()[:16]}) was published: the ledger was lost or rolled back and resuming would "
                f"fork published history; {RESTORE_HINT}" + ("" if height else f", {NEW_CHAIN_HINT}"))
        if head.height and evidence.local_hash_at(head.height - 1) != head.hash:
            raise StateRefused(
                f"ledger.log block {head.height - 1} is {evidence.local_hash_at(head.height - 1).hex()[:16]} but "
                f"{head.source} shows {head.hash.hex()[:16]}: this ledger is a different history from the one "
                f"published; {RESTORE_HINT}")
    orphan = None
    if evidence.model_files:
        newest = max(evidence.model_files)
        if (evidence.heads and evidence.model_round is not None and newest == evidence.model_round + 1
                and not [r for r in evidence.model_files if evidence.model_round < r < newest]):
            # A crash between the next model's file (written first) and its ledger records: that
            # model was never published (publishing follows the records), and what was published
            # (the heads, checked above) is no further than this ledger. Closing the round again
            # rewrites the file. Only this one file: two ahead, or ahead without heads, is refused.
            orphan = newest
        elif evidence.model_round is None or newest > evidence.model_round:
            where = ("the ledger is empty" if evidence.model_round is None
                     else f"the ledger only reaches round {evidence.model_round}")
            raise StateRefused(
                f"{evidence.models_dir} holds the model for round {newest} but {where}: the ledger was lost or "
                f"rolled back and resuming would overwrite published models; {RESTORE_HINT}"
                + ("" if height else f", {NEW_CHAIN_HINT}"))
    if not evidence.heads:
        return None
    note = "ledger matches " + ", ".join(f"{h.source} (height {h.height})" for h in evidence.heads)
    if orphan is not None:
        note += (f"; {evidence.models_dir} holds the model for round {orphan}, which the ledger does not name "
                 "(written just before a crash, never published): round "
                 f"{evidence.model_round} closes again and replaces it")
    return note
