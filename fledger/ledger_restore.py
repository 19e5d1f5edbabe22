"""``fledger ledger restore``: rebuild a coordinator's lost or rolled-back ledger from a monitor's
verified replica (``fledger ledger follow --replica FILE``), and with ``--from-broker`` its latest
model from the broker's retained global model.

Every block of the replica is verified again against the coordinator's own key (its key file),
so a replica from any monitor will do: nobody but the coordinator can have signed it. The old
ledger.log, if any, is kept beside the new one; the restored chain must extend it (a different
history is refused). The coordinator resumes at the round the restored ledger names, with the
model of that round: the saved file if it matches the ledger's hash, else (``--from-broker``)
the retained model, opened with the coordinator's keys like a device opens it (its signature,
its ledger block, decryption, digest) and taken only if its SHA-256 is the one the restored
ledger names. Everything is checked before anything is written: a refusal leaves the state
directory as it was.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import logging
import os
import queue
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coordinator import restore, state_guard
from coordinator.state_check import StateRefused
from coordinator.storage import ModelFileError, ModelStore, Spool
from federation import config as cfg
from federation import durable, envelope, exit_codes
from federation.codec import CodecError, TensorDict, decode_tensors, encode_tensors
from federation.crypto import ed25519_public
from federation.fleet_state import FleetState
from federation.keys import CoordinatorKeys
from federation.mqtt import BrokerConfig, MqttLink
from federation.topics import Topics
from ledger import Block, LedgerError, Replica, ReplicaAlert, storage

log = logging.getLogger("fledger.ledger")

BROKER_WAIT_S = 10.0  # default: how long to wait for the retained global model


def add_parser(actions: Any) -> None:
    a = actions.add_parser(
        "restore", help="rebuild the coordinator's ledger (and, --from-broker, its latest model) from a monitor's "
                        "verified replica",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=_paragraphs(
                    "Rebuild STATE_DIR/ledger.log from a replica kept by `fledger ledger follow --replica`, "
                    "verified block by block against the coordinator's key. The old ledger.log is kept as "
                    "ledger.log.before-restore-<time>. Run it with the coordinator stopped; then start the "
                    "coordinator again.\n\n"
                    "The coordinator resumes with the model the restored ledger names last, so that model file "
                    "must be in STATE_DIR/models and match the ledger's SHA-256. When it is missing (the whole "
                    "state directory was lost) or does not match, --from-broker fetches the fleet's retained "
                    "global model from the broker (the broker options below, or --config, as the coordinator "
                    "connects), checks its signature against the key file, its ledger block, decrypts it with "
                    "the key file's fleet model key, and writes it only if its SHA-256 is the one the ledger "
                    "names (a mismatching file is kept aside). Nothing is written unless everything verifies.\n\n"
                    f"Exit codes: 0 restored; {exit_codes.TAMPERED} the replica, or the broker's retained model, "
                    f"does not verify against the key file (or the replica is a different history); "
                    f"{exit_codes.USAGE} usage (no replica file, another fleet's chain); {exit_codes.TIMEOUT} "
                    f"--from-broker: no retained model within --broker-wait; {exit_codes.UNREACHABLE} "
                    f"--from-broker: broker unreachable or login refused; {exit_codes.STATE} the state directory "
                    "is in use, the replica is behind it, or the latest model is missing or not the one the "
                    "ledger names (locally, or on the broker)."))
    a.add_argument("--replica", type=Path, required=True, help="replica file written by `ledger follow --replica`")
    a.add_argument("--config", type=Path, default=None,
                   help="the coordinator's TOML file: state_dir, keys and broker settings from its [coordinator] "
                        "and [broker] tables (flags win)")
    a.add_argument("--state-dir", type=Path, default=None, help="the coordinator's state directory (default: from "
                                                                "--config, FLEDGER_STATE_DIR, or state/coordinator)")
    a.add_argument("--keys", type=Path, default=None,
                   help="the coordinator's key file: the replica and the broker's model are checked against its "
                        "signing key, the model decrypted with its model key (default: from --config, "
                        "FLEDGER_KEYS, or keys/coordinator.json)")
    a.add_argument("--from-broker", action="store_true",
                   help="if the latest model file is missing or does not match the ledger, take the fleet's retained "
                        "global model from the broker, verified as above (the coordinator must be stopped: it "
                        "republishes the model when it runs)")
    a.add_argument("--broker-wait", type=float, default=BROKER_WAIT_S, metavar="SECONDS",
                   help=f"--from-broker: how long to wait for the retained model (default: {BROKER_WAIT_S:.0f})")
    cfg.add_arguments(a, BrokerConfig)


def _paragraphs(text: str) -> str:
    return "\n\n".join(textwrap.fill(paragraph, 100, break_on_hyphens=False) for paragraph in text.split("\n\n"))


class Refused(Exception):
    """Restore refused: one line for the operator and an exit code."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def _fail(code: int, message: str) -> int:
    print(f"fledger ledger restore: {message}", file=sys.stderr)
    return code


def main(args: argparse.Namespace) -> int:
    from coordinator.config import CoordinatorConfig

    settings = cfg.load(CoordinatorConfig, args, section="coordinator", config_file=args.config)
    keys_path = Path(settings.keys)
    keys = CoordinatorKeys.load(keys_path)
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
        return _fail(exit_codes.TAMPERED, f"{args.replica} does not verify against {keys_path}: {alert}")
    if not blocks or replica.missing() is not None:
        return _fail(exit_codes.TAMPERED, f"{args.replica} holds no complete chain from genesis")
    if blocks[0].data.get("fleet") != keys.fleet:
        return _fail(exit_codes.USAGE, f"{args.replica} is the chain of fleet {blocks[0].data.get('fleet')!r}, "
                                       f"not {keys.fleet!r}")
    broker = BrokerConfig(**{f.name: getattr(settings, f.name) for f in dataclasses.fields(BrokerConfig)}) \
        if args.from_broker else None
    state_dir = Path(settings.state_dir)
    try:
        lock = state_guard.lock_state_dir(state_dir)
    except StateRefused as exc:
        return _fail(exit_codes.STATE, str(exc))
    try:
        plan = _plan(state_dir, blocks, keys, broker, args.broker_wait)
        _write(state_dir, blocks, plan)
    except Refused as refused:
        return _fail(refused.code, str(refused))
    finally:
        os.close(lock)
    return exit_codes.OK


@dataclass
class Plan:
    """What the restore writes, decided (and verified) before anything is."""

    round: int | None  # the round the coordinator resumes at (None: no model named yet)
    model: TensorDict | None = None  # from the broker, to save as that round's model
    aside: Path | None = None  # a model file that does not match the ledger, to keep aside
    lost_updates: list[str] = dataclasses.field(default_factory=list)  # accepted in the open round, not spooled


def _plan(state_dir: Path, blocks: list[Block], keys: CoordinatorKeys, broker: BrokerConfig | None,
          broker_wait: float) -> Plan:
    path = state_dir / "ledger.log"
    old = _old_blocks(path)
    for i, payload in enumerate(old[:len(blocks)]):
        if Block.from_bytes(payload).hash != blocks[i].hash:
            raise Refused(exit_codes.TAMPERED, f"{path} block {i} differs from the replica's: a different history; "
                                               "move it away yourself if you mean to replace it")
    if len(old) > len(blocks):
        raise Refused(exit_codes.STATE, f"{path} has {len(old)} blocks, the replica only {len(blocks)}: nothing to "
                                        "restore from this replica")
    fleet = FleetState.of(blocks)
    round_number = fleet.model_round
    if round_number is None or fleet.model_block is None:
        return Plan(None)
    expected: bytes = fleet.model_block.data["model_sha256"]
    store = ModelStore(state_dir / "models")
    newer = [r for r in store.rounds() if r > round_number]
    if newer:
        raise Refused(exit_codes.STATE, f"{store.directory} holds models up to round {max(newer)}, beyond this "
                                        f"replica's round {round_number}: the replica is behind what was published; "
                                        "restore from a monitor that is up to date")
    info = fleet.rounds.get(round_number)
    spool = Spool(state_dir / "spool")
    lost = [str(r["device"]) for r in (info.updates if info is not None else [])
            if spool.get(round_number, str(r["device"])) is None]
    local = store.path(round_number)
    problem = _local_model_problem(local, expected, round_number)
    if problem is None:
        return Plan(round_number, lost_updates=lost)
    if broker is None:
        hint = "copy it back from a backup and rerun, or rerun with --from-broker to take the fleet's retained model" \
            if "missing" in problem else "rerun with --from-broker to take the fleet's retained model instead"
        raise Refused(exit_codes.STATE, f"{problem} (SHA-256 of its encoding {expected.hex()}): {hint}; the "
                                        "coordinator cannot resume without it")
    model = fetch_model(broker, keys, round_number, expected, broker_wait)
    return Plan(round_number, model, local if local.exists() else None, lost)


def _local_model_problem(path: Path, expected: bytes, round_number: int) -> str | None:
    """Why the saved model of ``round_number`` will not do, or None if it matches the ledger."""
    if not path.exists():
        return f"the latest model, {path}, is missing"
    try:
        model = ModelStore(path.parent).load(round_number)
    except ModelFileError as exc:
        return f"{exc}"
    if model is None or hashlib.sha256(encode_tensors(model)).digest() != expected:
        return f"{path} does not match the model hash the ledger records for round {round_number}"
    return None


def fetch_model(broker: BrokerConfig, keys: CoordinatorKeys, round_number: int, expected: bytes,
                wait: float) -> TensorDict:
    """The fleet's retained global model, if it is the one the ledger names (Refused otherwise).

    Read by a short-lived clean-session client (the broker keeps nothing for it), opened with the
    coordinator's keys: its signature, its ledger block, the fleet, decryption, its digest; then
    its SHA-256 must be ``expected``, the hash the restored ledger records for ``round_number``."""
    topics = Topics(keys.fleet, broker.topic_prefix)
    where = f"the broker {broker.broker_host}:{broker.broker_port}"
    link = MqttLink(broker, f"fledger-restore-{keys.fleet}-{os.getpid()}",
                    subscriptions=[topics.model, topics.model_chunks], persistent=False)
    try:
        link.start(timeout=min(60.0, max(wait, 1.0)))
    except ConnectionError as exc:
        raise Refused(exit_codes.UNREACHABLE, f"--from-broker: {exc}") from None
    try:
        payload = _first_model(link, topics, wait)
    finally:
        link.stop()
    if payload is None:
        raise Refused(exit_codes.TIMEOUT, f"{where} held no retained global model for fleet {keys.fleet} (waited "
                                          f"{wait:.0f}s; a broker restarted without persistence loses it): copy "
                                          f"the model of round {round_number} (SHA-256 {expected.hex()}) from a "
                                          "backup")
    try:
        header, weights = envelope.open_own_model(payload, keys, max_bytes=broker.max_message_bytes)
    except envelope.EnvelopeError as exc:
        raise Refused(exit_codes.TAMPERED, f"the retained global model on {where} does not verify against the "
                                           f"coordinator's keys: {exc}; nothing written") from None
    if header.model_sha256 != expected:
        behind = " (the replica is behind the broker: restore from a monitor that is up to date)" \
            if header.round > round_number else ""
        raise Refused(exit_codes.STATE, f"the retained global model on {where} is the coordinator's model of round "
                                        f"{header.round} (SHA-256 {header.model_sha256.hex()[:16]}), not the model "
                                        f"of round {round_number} the restored ledger names (SHA-256 "
                                        f"{expected.hex()[:16]}){behind}; nothing written")
    try:
        model = decode_tensors(weights)
    except CodecError as exc:  # signed by the coordinator and named by its ledger, yet not a model: a bug
        raise Refused(exit_codes.TAMPERED, f"the retained global model does not decode: {exc}") from None
    if hashlib.sha256(encode_tensors(model)).digest() != expected:  # what the coordinator checks at its start
        raise Refused(exit_codes.TAMPERED, "the retained global model does not encode back to the bytes the "
                                           "ledger names; nothing written")
    return model


def _first_model(link: MqttLink, topics: Topics, wait: float) -> bytes | None:
    deadline = time.monotonic() + wait
    while (left := deadline - time.monotonic()) > 0:
        if link.failed is not None:
            raise Refused(exit_codes.UNREACHABLE, f"--from-broker: the MQTT link gave up: {link.failed}")
        try:
            message = link.inbox.get(timeout=min(left, 0.5))
        except queue.Empty:
            continue
        if message.topic == topics.model:  # amqtt hands out other topics' retained messages too
            return message.payload
    return None


def _old_blocks(path: Path) -> list[bytes]:
    """The whole frames of the existing ledger.log (a damaged end is dropped: the replica replaces it)."""
    if not path.exists():
        return []
    try:
        return storage.read(path, strict=False).payloads
    except LedgerError:
        return []


def _write(state_dir: Path, blocks: list[Block], plan: Plan) -> None:
    path = state_dir / "ledger.log"
    stamp = int(time.time())
    if plan.model is not None and plan.round is not None:
        store = ModelStore(state_dir / "models")
        if plan.aside is not None:
            aside = plan.aside.with_name(f"{plan.aside.name}.mismatch-{stamp}")
            os.replace(plan.aside, aside)
            print(f"kept the model file that does not match the ledger as {aside}")
        try:
            saved = store.save(plan.round, plan.model)
            reread = store.load(plan.round)
        finally:
            store.close()
        if reread is None or encode_tensors(reread) != encode_tensors(plan.model):
            saved.unlink(missing_ok=True)
            raise Refused(exit_codes.STATE, f"{saved} did not read back as the model written; removed it, "
                                            "nothing else written")
        print(f"wrote the broker's model of round {plan.round} (verified against the ledger) to {saved}")
    if path.exists():
        aside = path.with_name(f"{path.name}.before-restore-{stamp}")
        os.replace(path, aside)
        print(f"kept the old ledger as {aside}")
    durable.atomic_write(path, b"".join(storage.frame(b.to_bytes()) for b in blocks))
    state_guard.write_checkpoint(state_dir, blocks[-1].to_bytes())
    print(f"restored {path}: height {len(blocks)}, head {blocks[-1].hash.hex()[:16]}, model of round {plan.round}")
    if plan.round is None:
        return
    if plan.lost_updates:
        # The spool held these updates' envelopes (encrypted to the coordinator; the devices dropped
        # them from their outboxes once accepted): the open round cannot be rebuilt without them, so
        # it is run again as the next round, from the same model (a restore request, applied at start).
        devices = ", ".join(plan.lost_updates)
        restore.write_request(state_dir, plan.round, f"accepted updates of {devices} were lost with the state "
                              f"directory; round {plan.round} runs again", lost_updates=tuple(plan.lost_updates))
        print(f"fledger ledger restore: warning: round {plan.round} is open with accepted updates of {devices} "
              f"whose envelopes were in the lost spool ({state_dir / 'spool'}); the coordinator will run that round "
              f"again as round {plan.round + 1} from the same model (a restore request is left in {state_dir}; "
              "see docs/reliability.md)", file=sys.stderr)
        return
    print(f"model file for round {plan.round} matches the ledger; start the coordinator to resume")
