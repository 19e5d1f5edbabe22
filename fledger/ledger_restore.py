"""``fledger ledger restore``: rebuild a coordinator's lost or rolled-back ledger from a monitor's
verified replica (``fledger ledger follow --replica FILE``).

Every block of the replica is verified again against the coordinator's own key (its key file),
so a replica from any monitor will do: nobody but the coordinator can have signed it. The old
ledger.log, if any, is kept beside the new one; the restored chain must extend it (a different
history is refused). Afterwards the coordinator resumes at the round the restored ledger names,
with the saved model files checked against the hashes the ledger records.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from coordinator import state_guard
from coordinator.state_check import StateRefused, model_round_of
from coordinator.storage import ModelStore
from federation import durable, exit_codes
from federation.codec import encode_tensors
from federation.crypto import ed25519_public
from federation.fleet_state import FleetState
from federation.keys import CoordinatorKeys
from ledger import Block, LedgerError, Replica, ReplicaAlert, storage

log = logging.getLogger("fledger.ledger")


def add_parser(actions: Any) -> None:
    a = actions.add_parser(
        "restore", help="rebuild the coordinator's ledger from a monitor's verified replica",
        description="Rebuild STATE_DIR/ledger.log from a replica kept by `fledger ledger follow --replica`, "
                    "verified block by block against the coordinator's key. The old ledger.log is kept as "
                    "ledger.log.before-restore-<time>. Run it with the coordinator stopped; then start the "
                    f"coordinator again. Exit {exit_codes.TAMPERED} if the replica does not verify or is a "
                    f"different history, {exit_codes.STATE} if the state directory is in use or the latest "
                    "model file is missing or does not match the ledger.")
    a.add_argument("--replica", type=Path, required=True, help="replica file written by `ledger follow --replica`")
    a.add_argument("--state-dir", type=Path, required=True, help="the coordinator's state directory")
    a.add_argument("--keys", type=Path, required=True, help="the coordinator's key file (its signing key is "
                                                            "what the replica is checked against)")


def _fail(code: int, message: str) -> int:
    print(f"fledger ledger restore: {message}", file=sys.stderr)
    return code


def main(args: argparse.Namespace) -> int:
    keys = CoordinatorKeys.load(args.keys)
    from fledger.ledger_cli import ReplicaFile

    if not args.replica.is_file():
        return _fail(exit_codes.USAGE, f"replica {args.replica} not found")
    replica = Replica(ed25519_public(keys.sign_seed), rules=FleetState)
    blocks: list[Block] = []
    replica.on_append = blocks.append
    try:
        for raw in ReplicaFile(args.replica).load():
            replica.ingest(raw)
    except ReplicaAlert as alert:
        return _fail(exit_codes.TAMPERED, f"{args.replica} does not verify against {args.keys}: {alert}")
    if not blocks or replica.missing() is not None:
        return _fail(exit_codes.TAMPERED, f"{args.replica} holds no complete chain from genesis")
    if blocks[0].data.get("fleet") != keys.fleet:
        return _fail(exit_codes.USAGE, f"{args.replica} is the chain of fleet {blocks[0].data.get('fleet')!r}, "
                                       f"not {keys.fleet!r}")
    state_dir = Path(args.state_dir)
    try:
        lock = state_guard.lock_state_dir(state_dir)
    except StateRefused as exc:
        return _fail(exit_codes.STATE, str(exc))
    try:
        return _restore(state_dir, blocks)
    finally:
        os.close(lock)


def _restore(state_dir: Path, blocks: list[Block]) -> int:
    path = state_dir / "ledger.log"
    old = _old_blocks(path)
    for i, payload in enumerate(old[:len(blocks)]):
        if Block.from_bytes(payload).hash != blocks[i].hash:
            return _fail(exit_codes.TAMPERED, f"{path} block {i} differs from the replica's: a different history; "
                                              "move it away yourself if you mean to replace it")
    if len(old) > len(blocks):
        return _fail(exit_codes.STATE, f"{path} has {len(old)} blocks, the replica only {len(blocks)}: nothing to "
                                       "restore from this replica")
    if path.exists():
        aside = path.with_name(f"{path.name}.before-restore-{int(time.time())}")
        os.replace(path, aside)
        print(f"kept the old ledger as {aside}")
    durable.atomic_write(path, b"".join(storage.frame(b.to_bytes()) for b in blocks))
    state_guard.write_checkpoint(state_dir, blocks[-1].to_bytes())
    round_number = model_round_of(b.data for b in blocks)
    print(f"restored {path}: height {len(blocks)}, head {blocks[-1].hash.hex()[:16]}, model of round {round_number}")
    return _check_models(state_dir, blocks, round_number)


def _old_blocks(path: Path) -> list[bytes]:
    """The whole frames of the existing ledger.log (a damaged end is dropped: the replica replaces it)."""
    if not path.exists():
        return []
    try:
        return storage.read(path, strict=False).payloads
    except LedgerError:
        return []


def _check_models(state_dir: Path, blocks: list[Block], round_number: int | None) -> int:
    """The coordinator resumes with the model of ``round_number``: its file must match the ledger."""
    if round_number is None:
        return exit_codes.OK
    expected = next(b.data["model_sha256"] for b in reversed(blocks)
                    if (b.data.get("type") == "aggregate" and b.data["round"] + 1 == round_number)
                    or (b.data.get("type") == "model.published" and b.data.get("initial")))
    store = ModelStore(state_dir / "models")
    newer = [r for r in store.rounds() if r > round_number]
    if newer:
        return _fail(exit_codes.STATE, f"{store.directory} holds models up to round {max(newer)}, beyond this "
                                       f"replica's round {round_number}: the replica is behind what was published; "
                                       "restore from a monitor that is up to date")
    model = store.load(round_number)
    if model is None:
        return _fail(exit_codes.STATE, f"the latest model, {store.path(round_number)}, is missing: copy it back from a "
                                       f"backup (SHA-256 of its encoding {expected.hex()}); the coordinator cannot "
                                       "resume without it")
    if hashlib.sha256(encode_tensors(model)).digest() != expected:
        return _fail(exit_codes.STATE, f"{store.path(round_number)} does not match the model hash the ledger records "
                                       f"for round {round_number}")
    print(f"model file for round {round_number} matches the ledger; start the coordinator to resume")
    return exit_codes.OK
