"""``fledger ledger``: verify, show, prove, consistency, checkpoint and follow (a live, independent monitor)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import queue
import sys
import time
from pathlib import Path
from typing import Any

from federation import config as cfg
from federation import exit_codes, records
from federation.fleet_state import FleetLedger, FleetState, verify_file
from federation.mqtt import BrokerConfig, MqttLink
from federation.topics import Topics
from fledger.ledger_format import format_table, to_json
from ledger import Event, ProofError, Replica, ReplicaAlert
from ledger.checkpoint import (
    Checkpoint,
    CheckpointWatch,
    NoteError,
    SplitView,
    open_checkpoint,
    origin_of,
    sign_checkpoint,
)
from ledger.keys import Ed25519Signer
from ledger.merkle import HASH_SIZE, check_consistency

log = logging.getLogger("fledger.ledger")
REPLAY_RETRY_S = 2.0  # a monitor behind asks again at most this often
GAP_TIMEOUT_S = 120.0  # default: a gap the coordinator's replays have not filled by then is an alert


def _trusted_key(args: argparse.Namespace) -> bytes | None:
    """The coordinator's public signing key to pin, from --coordinator-key HEX or a key file."""
    if getattr(args, "coordinator_key", None):
        text = str(args.coordinator_key)
        if Path(text).exists():
            try:
                data = json.loads(Path(text).read_text())
                if "coordinator" in data:  # a device bundle
                    return bytes.fromhex(data["coordinator"]["sign_public"])
            except (ValueError, TypeError, KeyError) as exc:
                raise ValueError(f"{text}: not a key file with a coordinator signing key ({exc!r})") from None
            if "sign_seed" in data:  # the coordinator's own key file
                from federation.crypto import ed25519_public

                return ed25519_public(bytes.fromhex(data["sign_seed"]))
            raise ValueError(f"{text}: no coordinator key in this file")
        return bytes.fromhex(text)
    return None


def add_parser(sub: Any) -> None:
    p = sub.add_parser("ledger", help="verify, show, prove or follow a ledger",
                       description="Inspect and check the fleet's ledger, from a file or live over MQTT.")
    ls = p.add_subparsers(dest="ledger_command", required=True, metavar="ACTION")
    key_help = ("pin the coordinator's signing key: hex, a device bundle, or the coordinator key file "
                "(default: trust the key in the genesis block)")

    a = ls.add_parser("verify", help="check hashes, links, signatures, proofs of work and Merkle roots",
                      description="Verify a ledger file; exit 1 naming the first bad block.")
    a.add_argument("file", type=Path)
    a.add_argument("--coordinator-key", help=key_help)
    a.add_argument("--signatures", choices=["all", "head", "none"], default="all",
                   help="all: every coordinator and device signature (~0.07 ms each); head: the last block's "
                        "coordinator signature, which covers all history through the hash links (fast on "
                        "long chains); none (default: all)")

    a = ls.add_parser("show", help="print the blocks as a table (or JSON)")
    a.add_argument("file", type=Path)
    a.add_argument("--json", action="store_true",
                   help="JSON for machines: decoded fields with bytes as hex, plus each block's exact encodings "
                        "body_hex (what its hash is SHA-256 of) and wire_hex (as on the topic and in the file)")
    a.add_argument("--from", dest="start", type=int, default=0, help="first block index (default 0)")
    a.add_argument("--to", dest="end", type=int, default=None, help="last block index, exclusive")

    a = ls.add_parser("prove", help="inclusion proof: a device's update went into round R's model",
                      description="Print (and check) the Merkle inclusion proof of DEVICE's update in round "
                                  "R's aggregate. Exit 1 if there is none.")
    a.add_argument("file", type=Path)
    a.add_argument("--round", type=int, required=True)
    a.add_argument("--device", required=True)
    a.add_argument("--json", action="store_true", help="print the proof as JSON")

    a = ls.add_parser("dataset", help="check a device's opening of its data set commitment against the ledger",
                      description="Devices register a salted commitment SHA-256(salt || data SHA-256), not the "
                                  "bare hash (docs/security.md). Given the device's opening (its state directory's "
                                  "dataset.json: salt and SHA-256), check that it opens DEVICE's latest dataset "
                                  "record in FILE and print the data set's SHA-256. Exit 1 if it does not.")
    a.add_argument("file", type=Path)
    a.add_argument("--device", required=True)
    a.add_argument("--opening", type=Path, required=True, help="the device's dataset.json")

    a = ls.add_parser("consistency", help="prove the chain at height NEW extends the chain at height OLD",
                      description="Print (JSON, fields in docs/ledger.md) and check the RFC 6962 consistency proof "
                                  "that the chain at NEW extends the chain at OLD. Give what you recorded before "
                                  "(--old-root, or the coordinator's signed --old-checkpoint) to detect a rewritten "
                                  "history. Exit 1 if it does not verify, 2 for a bad request.")
    a.add_argument("file", type=Path)
    old = a.add_mutually_exclusive_group(required=True)
    old.add_argument("--old", type=int, help="height a monitor saw before (>= 1)")
    old.add_argument("--old-checkpoint", type=Path, metavar="NOTE",
                     help="a signed checkpoint note you kept (from the ledger/checkpoint topic or `ledger "
                          "checkpoint`): its size and root are OLD and the root to check against")
    a.add_argument("--new", type=int, default=None, help="height to compare with (default: current)")
    a.add_argument("--new-checkpoint", type=Path, metavar="NOTE",
                   help="a later signed checkpoint note: its size and root are NEW (so two checkpoints the "
                        "coordinator published can be checked against each other)")
    a.add_argument("--old-root", default=None,
                   help="the chain root (64 hex digits) you recorded at height OLD: the proof is checked against "
                        "it, which is what detects a rewritten history; without it, against this file's own root")
    a.add_argument("--coordinator-key", help=key_help)

    a = ls.add_parser("checkpoint", help="the chain's signed tree head as a C2SP tlog-checkpoint note",
                      description="Print the checkpoint (origin, tree size, root) of the chain in FILE: signed with "
                                  "--key, the note the coordinator publishes on ledger/checkpoint. --verify checks a "
                                  "published note against this file; --verifier-key prints the key that standard "
                                  "note tooling needs to check the notes. Exit 1 if a note does not verify.")
    a.add_argument("file", type=Path)
    a.add_argument("--size", type=int, default=None, help="tree size (blocks) of the checkpoint (default: all)")
    a.add_argument("--key", type=Path, default=None,
                   help="the coordinator's key file (keys/coordinator.json), to sign the note; without it the "
                        "unsigned checkpoint text is printed")
    action = a.add_mutually_exclusive_group()
    action.add_argument("--verify", type=Path, metavar="NOTE", help="check this checkpoint note against the file")
    action.add_argument("--verifier-key", action="store_true",
                        help="print the note verifier key <origin>+<key id>+<base64 key> and exit")
    a.add_argument("--coordinator-key", help=key_help)

    a = ls.add_parser("follow", help="subscribe to the ledger topic, keep a verified replica, alert on misbehaviour",
                      description="Independent monitor: has the chain replayed by the coordinator, verifies every "
                                  "block as it arrives against the PINNED coordinator key, appends it to a replica "
                                  "file, and exits 1 (ALERT) only when the coordinator itself signed a "
                                  "contradiction: a fork, a rewrite, an invalid block, or a gap its replays do not "
                                  "fill. Anything not signed by that key (junk, another key's blocks) is counted, "
                                  "logged and ignored. Pin with --coordinator-key or --genesis; a resumed --replica "
                                  "pins its own genesis; --trust-on-first-use takes the first self-signed genesis "
                                  "(unsafe where others can publish). Exit codes: 0 --until-height reached, 1 alert, "
                                  "2 usage, 3 --timeout, 4 broker unreachable, 5 replica file does not verify. It "
                                  "also checks the coordinator's signed checkpoints (ledger/checkpoint) against the "
                                  "replica and exits 1 if one gives another root for the same height (a split view).",
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    a.add_argument("--fleet", required=True, help="fleet name")
    a.add_argument("--replica", type=Path, default=None, help="file of verified blocks (msgpack frames, one "
                   "per line of length-prefixed bytes); resumed if present")
    a.add_argument("--coordinator-key", help="pin the coordinator's signing key: hex, a device bundle, or the "
                                             "coordinator key file")
    a.add_argument("--genesis", default=None, help="pin the chain by its genesis block hash (hex, 64 digits): the "
                                                   "coordinator key is the one that genesis names")
    a.add_argument("--trust-on-first-use", action="store_true",
                   help="with nothing pinned, trust the first genesis that signs itself (anyone able to publish "
                        "on the ledger topic first can then impersonate the coordinator)")
    a.add_argument("--gap-timeout", type=float, default=GAP_TIMEOUT_S,
                   help=f"seconds a gap may stay unfilled while asking for replays before it is an alert "
                        f"(default: {GAP_TIMEOUT_S:.0f})")
    a.add_argument("--from-file", type=Path, default=None,
                   help="catch up from a copy of the ledger file first (verified block by block)")
    a.add_argument("--until-height", type=int, default=0, help="exit 0 once the replica has this many blocks")
    a.add_argument("--timeout", type=float, default=0.0, help="exit 3 after this many seconds (0: never)")
    a.add_argument("--client-id", default="", help="MQTT client id (default: fledger-monitor-<fleet>)")
    cfg.add_arguments(a, BrokerConfig)
    from fledger import ledger_restore

    ledger_restore.add_parser(ls)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    command = args.ledger_command
    if command == "verify":
        if not Path(args.file).is_file():  # nothing to verify is a usage error (2), not a failed check (1)
            raise FileNotFoundError(f"no ledger file {args.file}")
        report = verify_file(args.file, _trusted_key(args), signatures=args.signatures)
        print(report)
        return exit_codes.OK if report.ok else exit_codes.TAMPERED
    if command == "show":
        with FleetLedger.open(args.file) as ledger:
            blocks = ledger.blocks(args.start, args.end)
        print(to_json(blocks) if args.json else format_table(blocks))
        return 0
    if command == "prove":
        with FleetLedger.open(args.file) as ledger:
            try:
                proof = ledger.inclusion_proof(args.round, args.device)
            except ProofError as exc:
                print(f"no proof: {exc}", file=sys.stderr)
                return exit_codes.TAMPERED
            aggregate = ledger.block(proof.aggregate_index)
            # a sealed aggregate is proven by the chain Ledger.open checked, up to its group's signed block
            ok = proof.verify(aggregate, None if aggregate.unsigned else ledger.coordinator_key)
        if args.json:
            print(proof.to_json())
        else:
            print(f"device {proof.device}, round {proof.round}: leaf {proof.leaf_index} of {proof.tree_size}, "
                  f"update block {proof.update_index}, aggregate block {proof.aggregate_index}")
            print(f"merkle root {proof.root.hex()}")
            for i, node in enumerate(proof.path):
                print(f"  path[{i}] {node.hex()}")
            print("proof verified" if ok else "PROOF DOES NOT VERIFY")
        return exit_codes.OK if ok else exit_codes.TAMPERED
    if command == "dataset":
        return _check_dataset_opening(args)
    if command == "consistency":
        return consistency(args)
    if command == "checkpoint":
        return checkpoint(args)
    if command == "follow":
        return follow(args)
    if command == "restore":
        from fledger import ledger_restore

        return ledger_restore.main(args)
    raise ValueError(f"unknown ledger action {command}")


def _root_hex(text: str) -> bytes | None:
    """A recorded root given in hex: exactly 32 bytes, else None."""
    try:
        root = bytes.fromhex(text)
    except ValueError:
        return None
    return root if len(root) == HASH_SIZE else None


def _open_ledger(args: argparse.Namespace) -> FleetLedger:
    return FleetLedger.open(args.file, trusted_coordinator_key=_trusted_key(args))


def _read_checkpoint(ledger: FleetLedger, path: Path) -> Checkpoint:
    """A checkpoint note from a file, verified with this ledger's origin and coordinator key."""
    return open_checkpoint(path.read_bytes(), ledger.origin, ledger.coordinator_key)


def _usage(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return exit_codes.USAGE


def consistency(args: argparse.Namespace) -> int:
    """``ledger consistency``: the proof from this file, checked against recorded roots or signed checkpoints."""
    if args.old_checkpoint and args.old_root is not None:
        return _usage("give --old-root or --old-checkpoint (which carries its root), not both")
    recorded = None if args.old_root is None else _root_hex(args.old_root)
    if args.old_root is not None and recorded is None:
        return _usage(f"--old-root {args.old_root[:80]!r} is not a root: expected {2 * HASH_SIZE} hex digits")
    with _open_ledger(args) as ledger:
        try:
            old_cp = _read_checkpoint(ledger, args.old_checkpoint) if args.old_checkpoint else None
            new_cp = _read_checkpoint(ledger, args.new_checkpoint) if args.new_checkpoint else None
        except NoteError as exc:
            print(f"CHECKPOINT DOES NOT VERIFY: {exc}", file=sys.stderr)
            return exit_codes.TAMPERED
        old = old_cp.size if old_cp else int(args.old)
        new = new_cp.size if new_cp else ledger.height if args.new is None else args.new
        if old == 0:
            return _usage("no consistency proof from height 0: every chain extends the empty one, so there is "
                          "nothing to prove (RFC 6962 §2.1.2); verify the whole file instead")
        if not 0 < old <= new <= ledger.height:
            return _usage(f"need 0 < old ({old}) <= new ({new}) <= this file's height ({ledger.height})")
        path = ledger.consistency_proof(old, new)
        file_old_root, file_new_root = ledger.chain_root(old), ledger.chain_root(new)
    old_root = old_cp.root if old_cp else recorded if recorded is not None else file_old_root
    new_root = new_cp.root if new_cp else file_new_root
    try:
        check_consistency(old, new, old_root, new_root, path)
        reason = None
    except ProofError as exc:
        reason = str(exc)
    against = ("the signed --old-checkpoint" if old_cp else "the given --old-root" if recorded is not None
               else "this file's own root at OLD (give --old-root or --old-checkpoint to detect a rewrite)")
    print(json.dumps({"old": old, "new": new, "old_root": old_root.hex(), "new_root": new_root.hex(),
                      "proof": [p.hex() for p in path], "verified": reason is None, "reason": reason,
                      "checked_against": against, "file_matches_old": file_old_root == old_root,
                      "file_matches_new": file_new_root == new_root}, indent=2))
    return exit_codes.OK if reason is None else exit_codes.TAMPERED


def checkpoint(args: argparse.Namespace) -> int:
    """``ledger checkpoint``: print (signed with --key), verify, or name the key of the chain's checkpoints."""
    with _open_ledger(args) as ledger:
        if args.verifier_key:
            print(ledger.verifier_key())
            return exit_codes.OK
        if args.verify:
            try:
                cp = _read_checkpoint(ledger, args.verify)
            except NoteError as exc:
                print(f"CHECKPOINT DOES NOT VERIFY: {exc}", file=sys.stderr)
                return exit_codes.TAMPERED
            if cp.size > ledger.height:
                print(f"checkpoint verified, but it is at size {cp.size} and this file has only {ledger.height} "
                      "blocks: fetch a newer copy to compare", file=sys.stderr)
                return exit_codes.STATE
            mine = ledger.chain_root(cp.size)
            if mine != cp.root:
                print(f"DIFFERENT HISTORIES: the signed checkpoint's root at size {cp.size} is {cp.root.hex()}, "
                      f"this file's is {mine.hex()}", file=sys.stderr)
                return exit_codes.TAMPERED
            print(f"checkpoint verified: {cp.origin}, size {cp.size}, root {cp.root.hex()} matches this file")
            return exit_codes.OK
        size = ledger.height if args.size is None else args.size
        if not 0 < size <= ledger.height:
            return _usage(f"--size must be 1..{ledger.height}")
        cp = ledger.checkpoint(size)
        if args.key is None:
            print(cp.text(), end="")
            print("(unsigned: give --key with the coordinator's key file to sign it)", file=sys.stderr)
            return exit_codes.OK
        from federation.keys import CoordinatorKeys

        signer = Ed25519Signer(CoordinatorKeys.load(args.key).sign_seed)
        if signer.public_key != ledger.coordinator_key:
            return _usage(f"{args.key} is not this ledger's coordinator key")
        print(sign_checkpoint(cp, signer), end="")
        return exit_codes.OK


class FollowedCheckpoints:
    """``follow``'s check of the coordinator's signed checkpoints (ledger/checkpoint) against the
    replica's verified blocks: a note not signed by the coordinator is ignored (anyone may publish
    on a broker without ACLs); a signed one whose root is not the replica's raises SplitView."""

    def __init__(self, replica: Replica) -> None:
        self.replica = replica
        self.watch: CheckpointWatch | None = None
        self.early: bytes | None = None  # the newest note that came before the genesis block

    def _ready(self) -> CheckpointWatch | None:
        if self.watch is None and self.replica.height:
            state = self.replica.state
            self.watch = CheckpointWatch(origin_of(state.fleet, self.replica.hashes[0]),
                                         state.keyring[state.coordinator_key_id])
        return self.watch

    def note(self, raw: bytes) -> None:
        watch = self._ready()
        if watch is None:
            self.early = raw
            return
        try:
            checkpoint = watch.note(raw, self.replica.hashes)
        except NoteError as exc:
            # Counted with the replica's other ignored messages, and logged like them (the 1st,
            # 2nd, 4th... time): a flood of junk notes must not flood the log either.
            self.replica.ignored["checkpoint_not_signed"] += 1
            count = self.replica.ignored["checkpoint_not_signed"]
            if count & (count - 1) == 0:
                log.warning("ignored a checkpoint not signed by the coordinator: %s (ignored so far: %s)",
                            exc, dict(self.replica.ignored))
            return
        log.debug("checkpoint at size %d received", checkpoint.size)

    def blocks(self) -> None:
        watch = self._ready()
        if watch is None:
            return
        if self.early is not None:
            raw, self.early = self.early, None
            self.note(raw)
        for checkpoint in watch.blocks(self.replica.hashes):
            log.info("checkpoint at size %d matches the replica", checkpoint.size)


def _check_dataset_opening(args: argparse.Namespace) -> int:
    from edge_agent.registration import opening_matches

    opening = json.loads(args.opening.read_text())
    if not isinstance(opening, dict):
        raise ValueError(f"{args.opening} is not a device's dataset.json")
    with FleetLedger.open(args.file) as ledger:
        registered = [b for b in ledger
                      if b.data.get("type") == records.DATASET and b.data.get("device") == args.device]
    if not registered:
        print(f"no dataset record of {args.device} in {args.file}", file=sys.stderr)
        return exit_codes.TAMPERED
    block = registered[-1]
    if not opening_matches(opening, block.data["sha256"]):
        print(f"the opening does NOT match {args.device}'s data set commitment in block {block.index}")
        return exit_codes.TAMPERED
    print(f"{args.device}: block {block.index} commits to data set SHA-256 {opening['sha256']} "
          f"({block.data.get('size')} bytes)")
    return exit_codes.OK


class ReplicaFile:
    """Verified blocks, appended as [4-byte length][block bytes]; re-verified when resumed."""

    def __init__(self, path: Path | None) -> None:
        self.path = path

    def load(self) -> list[bytes]:
        if self.path is None or not self.path.exists():
            return []
        data = self.path.read_bytes()
        out, pos = [], 0
        while pos + 4 <= len(data):
            size = int.from_bytes(data[pos:pos + 4], "big")
            if pos + 4 + size > len(data):
                break
            out.append(data[pos + 4:pos + 4 + size])
            pos += 4 + size
        if pos < len(data):
            # A torn tail from a crash mid-write: cut it off (the block is fetched again), or the
            # next append would land after garbage.
            log.warning("%s: cut a torn tail of %d bytes", self.path, len(data) - pos)
            os.truncate(self.path, pos)
        return out

    def append(self, raw: bytes) -> None:
        if self.path is None:
            return
        with open(self.path, "ab") as handle:
            handle.write(len(raw).to_bytes(4, "big") + raw)
            handle.flush()
            os.fsync(handle.fileno())


def _pins(args: argparse.Namespace) -> tuple[bytes | None, bytes | None]:
    """(coordinator key, genesis hash) from the command line; ValueError on a bad value."""
    genesis = None
    if args.genesis:
        try:
            genesis = bytes.fromhex(args.genesis)
        except ValueError:
            genesis = b""
        if len(genesis) != 32:
            raise ValueError(f"--genesis {args.genesis!r} is not a 64-digit hex SHA-256")
    return _trusted_key(args), genesis


class IgnoredLog:
    """Warn about messages the replica ignored, with running counts, without one line per
    message under a flood (the 1st, 2nd, 4th, 8th... of each reason)."""

    def __init__(self, replica: Replica) -> None:
        self.replica = replica

    def note(self, topic: str, event: Event) -> None:
        reason = event.message.split(":", 1)[0]
        count = self.replica.ignored[reason]
        if count & (count - 1) == 0:
            log.warning("ignored a message on %s that the coordinator did not sign: %s (ignored so far: %s)",
                        topic, event.message, dict(self.replica.ignored))


def follow(args: argparse.Namespace) -> int:
    broker = cfg.load(BrokerConfig, args, section="monitor")
    topics = Topics(args.fleet, broker.topic_prefix)
    key, genesis = _pins(args)
    store = ReplicaFile(args.replica)
    stored = store.load()
    if key is None and genesis is None and not stored and not args.trust_on_first_use:
        raise ValueError("pin the coordinator: --coordinator-key (hex, a device bundle or coordinator.json), "
                         "--genesis HASH, a --replica that holds the chain, or --trust-on-first-use")
    replica = Replica(key, genesis_hash=genesis, trust_on_first_use=args.trust_on_first_use, rules=FleetState)
    checkpoints = FollowedCheckpoints(replica)
    try:
        for raw in stored:  # our own file, verified when written: it pins the chain if nothing else does
            replica.ingest(raw)
        if genesis is not None and replica.hashes and replica.hashes[0] != genesis:
            raise ReplicaAlert("rewrite", 0, f"the replica's genesis is {replica.hashes[0].hex()[:16]}, "
                                             f"not the pinned {genesis.hex()[:16]}")
    except ReplicaAlert as alert:
        log.error("replica %s does not verify against the pinned coordinator: %s", args.replica, alert)
        return exit_codes.STATE
    # From here on, store each block as verified and applied (never the bytes that merely
    # arrived at its index: a forged candidate may have come first).
    replica.on_append = lambda block: store.append(block.to_bytes())
    try:
        if args.from_file:
            with FleetLedger.open(args.from_file) as copy:
                for block in copy.blocks(replica.height):
                    replica.offer(block.to_bytes())
    except ReplicaAlert as alert:
        print(f"ALERT: {alert}", file=sys.stderr)
        return exit_codes.TAMPERED
    log.info("replica at height %d; following %s", replica.height, topics.ledger_blocks)
    client_id = args.client_id or f"fledger-monitor-{args.fleet}"
    link = MqttLink(broker, client_id, subscriptions=[topics.ledger_blocks, topics.ledger_head,
                                                       topics.ledger_head_chunks, topics.ledger_checkpoint])
    link.start(timeout=min(60.0, args.timeout) if args.timeout else 60.0)  # ConnectionError: exit 4
    # The ACL lets each monitor account ask on its own topic only; the coordinator limits each.
    replay_topic = topics.ledger_replay(broker.username or client_id)
    started = time.monotonic()
    last_request = 0.0  # of a request for more: the first one below does not hold them back
    ignored = IgnoredLog(replica)
    gap_since: tuple[int, float] | None = None  # (first missing index, since when)

    def request_replay() -> None:
        link.publish(replay_topic, json.dumps({"from": replica.height}).encode())

    def request_more() -> None:
        """Ask again from our height, at most every REPLAY_RETRY_S (the coordinator ignores more)."""
        nonlocal last_request
        if time.monotonic() - last_request > REPLAY_RETRY_S:
            last_request = time.monotonic()
            request_replay()

    try:
        request_replay()
        while True:
            if args.until_height and replica.height >= args.until_height:
                head = replica.head.hash.hex()[:16] if replica.head else "-"
                print(f"replica verified to height {replica.height}, head {head}")
                return exit_codes.OK
            if link.failed is not None:
                log.error("stopped: the MQTT link gave up (see above)")
                return exit_codes.UNREACHABLE
            if args.timeout and time.monotonic() - started > args.timeout:
                log.error("timeout at height %d (ignored messages: %s)", replica.height, dict(replica.ignored))
                return exit_codes.TIMEOUT
            missing = replica.missing()
            if missing is None:
                gap_since = None
            elif gap_since is None or gap_since[0] != missing[0]:
                gap_since = (missing[0], time.monotonic())
            elif time.monotonic() - gap_since[1] > args.gap_timeout:
                gap = ReplicaAlert("gap", missing[0], f"blocks {missing[0]}..{missing[1]} still missing after "
                                                        f"{args.gap_timeout:.0f}s of replay requests, while the "
                                                        "coordinator signed later blocks")
                log.error("ALERT: %s", gap)
                print(f"ALERT: {gap}", file=sys.stderr)
                return exit_codes.TAMPERED
            try:
                message = link.inbox.get(timeout=0.5)
            except queue.Empty:
                # Idle but still behind a block we hold (a replay is capped per request, and the
                # fleet may be quiet), holding unsigned blocks whose signed block has not come,
                # or still without the genesis that tells us the key: ask.
                if missing is not None or replica.waiting_for_seal or (replica.height == 0 and replica.ignored):
                    request_more()
                continue
            if message.topic not in (topics.ledger_blocks, topics.ledger_head, topics.ledger_checkpoint):
                continue
            try:
                before = replica.height
                if message.topic == topics.ledger_checkpoint:
                    checkpoints.note(message.payload)
                    continue
                event = replica.offer(message.payload)
                checkpoints.blocks()
            except SplitView as alert:
                log.error("ALERT: split view: %s", alert)
                print(f"ALERT: split view: {alert}", file=sys.stderr)
                return exit_codes.TAMPERED
            except ReplicaAlert as alert:  # the coordinator's own signed contradiction
                log.error("ALERT: %s", alert)
                print(f"ALERT: {alert}", file=sys.stderr)
                return exit_codes.TAMPERED
            if replica.height > before:
                log.info("block %d verified", replica.height - 1)
            if event.kind == "ignored":
                ignored.note(message.topic, event)
            elif event.kind == "gap":
                request_more()
    finally:
        link.stop()
