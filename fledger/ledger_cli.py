"""``fledger ledger``: verify, show, prove, consistency and follow (a live, independent monitor)."""

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
from federation.mqtt import BrokerConfig, MqttLink
from federation.topics import Topics
from ledger import Ledger, ProofError, Replica, ReplicaAlert, format_table, to_json, verify_file
from ledger.merkle import verify_consistency

log = logging.getLogger("fledger.ledger")
REPLAY_RETRY_S = 2.0  # a monitor behind asks again at most this often


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
    a.add_argument("--json", action="store_true", help="JSON for machines (bytes as hex)")
    a.add_argument("--from", dest="start", type=int, default=0, help="first block index (default 0)")
    a.add_argument("--to", dest="end", type=int, default=None, help="last block index, exclusive")

    a = ls.add_parser("prove", help="inclusion proof: a device's update went into round R's model",
                      description="Print (and check) the Merkle inclusion proof of DEVICE's update in round "
                                  "R's aggregate. Exit 1 if there is none.")
    a.add_argument("file", type=Path)
    a.add_argument("--round", type=int, required=True)
    a.add_argument("--device", required=True)
    a.add_argument("--json", action="store_true", help="print the proof as JSON")

    a = ls.add_parser("consistency", help="prove the chain at height NEW extends the chain at height OLD")
    a.add_argument("file", type=Path)
    a.add_argument("--old", type=int, required=True, help="height a monitor saw before")
    a.add_argument("--new", type=int, default=None, help="height to compare with (default: current)")
    a.add_argument("--old-root", default=None,
                   help="the chain root (hex) you recorded at height OLD: the proof is checked against it, "
                        "which is what detects a rewritten history; without it, against this file's own root")

    a = ls.add_parser("follow", help="subscribe to the ledger topic, keep a verified replica, alert on misbehaviour",
                      description="Independent monitor: replays the chain from the coordinator, verifies every "
                                  "block as it arrives, appends it to a replica file, and exits 2 on a fork, a "
                                  "rewrite, a bad signature or a gap that is never filled.")
    a.add_argument("--fleet", required=True, help="fleet name")
    a.add_argument("--replica", type=Path, default=None, help="file of verified blocks (msgpack frames, one "
                   "per line of length-prefixed bytes); resumed if present")
    a.add_argument("--coordinator-key", help=key_help)
    a.add_argument("--from-file", type=Path, default=None,
                   help="catch up from a copy of the ledger file first (verified block by block)")
    a.add_argument("--until-height", type=int, default=0, help="exit 0 once the replica has this many blocks")
    a.add_argument("--timeout", type=float, default=0.0, help="exit 3 after this many seconds (0: never)")
    a.add_argument("--client-id", default="", help="MQTT client id (default: fledger-monitor-<fleet>)")
    cfg.add_arguments(a, BrokerConfig)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    command = args.ledger_command
    if command == "verify":
        if not Path(args.file).is_file():  # nothing to verify is a usage error (2), not a failed check (1)
            raise FileNotFoundError(f"no ledger file {args.file}")
        report = verify_file(args.file, _trusted_key(args), signatures=args.signatures)
        print(report)
        return 0 if report.ok else 1
    if command == "show":
        with Ledger.open(args.file) as ledger:
            blocks = ledger.blocks(args.start, args.end)
        print(to_json(blocks) if args.json else format_table(blocks))
        return 0
    if command == "prove":
        with Ledger.open(args.file) as ledger:
            try:
                proof = ledger.inclusion_proof(args.round, args.device)
            except ProofError as exc:
                print(f"no proof: {exc}", file=sys.stderr)
                return 1
            aggregate = ledger.block(proof.aggregate_index)
            ok = proof.verify(aggregate, ledger.coordinator_key)
        if args.json:
            print(proof.to_json())
        else:
            print(f"device {proof.device}, round {proof.round}: leaf {proof.leaf_index} of {proof.tree_size}, "
                  f"update block {proof.update_index}, aggregate block {proof.aggregate_index}")
            print(f"merkle root {proof.root.hex()}")
            for i, node in enumerate(proof.path):
                print(f"  path[{i}] {node.hex()}")
            print("proof verified" if ok else "PROOF DOES NOT VERIFY")
        return 0 if ok else 1
    if command == "consistency":
        with Ledger.open(args.file) as ledger:
            new = ledger.height if args.new is None else args.new
            path = ledger.consistency_proof(args.old, new)
            old_root, new_root = ledger.chain_root(args.old), ledger.chain_root(new)
        recorded = bytes.fromhex(args.old_root) if args.old_root else old_root
        ok = verify_consistency(args.old, new, recorded, new_root, path)
        print(json.dumps({"old": args.old, "new": new, "old_root": recorded.hex(), "new_root": new_root.hex(),
                          "proof": [p.hex() for p in path], "verified": ok,
                          "checked_against": "the given --old-root" if args.old_root else
                          "this file's own root at OLD (give --old-root to detect a rewrite)"}, indent=2))
        return 0 if ok else 1
    if command == "follow":
        return follow(args)
    raise ValueError(f"unknown ledger action {command}")


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


def follow(args: argparse.Namespace) -> int:
    broker = cfg.load(BrokerConfig, args, section="monitor")
    topics = Topics(args.fleet, broker.topic_prefix)
    replica = Replica(_trusted_key(args))
    store = ReplicaFile(args.replica)
    try:
        for raw in store.load():
            replica.ingest(raw)
        # From here on, store each block as verified and applied (never the bytes that merely
        # arrived at its index: a forged candidate may have come first).
        replica.on_append = lambda block: store.append(block.to_bytes())
        if args.from_file:
            with Ledger.open(args.from_file) as copy:
                for block in copy.blocks(replica.height):
                    replica.ingest(block)
    except ReplicaAlert as alert:
        print(f"ALERT: {alert}", file=sys.stderr)
        return 2
    log.info("replica at height %d; following %s", replica.height, topics.ledger_blocks)
    link = MqttLink(broker, args.client_id or f"fledger-monitor-{args.fleet}",
                    subscriptions=[topics.ledger_blocks, topics.ledger_head])
    link.start(timeout=60)
    started = time.monotonic()
    last_request = 0.0  # of a request for more: the first one below does not hold them back

    def request_replay() -> None:
        link.publish(topics.ledger_replay, json.dumps({"from": replica.height}).encode())

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
                return 0
            if args.timeout and time.monotonic() - started > args.timeout:
                log.error("timeout at height %d", replica.height)
                return 3
            try:
                message = link.inbox.get(timeout=0.5)
            except queue.Empty:
                # Idle but still behind a block we hold (a replay is capped per request, and the
                # fleet may be quiet): ask for the rest rather than wait for the next new block.
                if replica.missing() is not None:
                    request_more()
                continue
            if message.topic not in (topics.ledger_blocks, topics.ledger_head):
                continue
            try:
                before = replica.height
                event = replica.ingest(message.payload)
            except (ReplicaAlert, ValueError) as alert:
                log.error("ALERT: %s", alert)
                print(f"ALERT: {alert}", file=sys.stderr)
                return 2
            if replica.height > before:
                log.info("block %d verified", replica.height - 1)
            if event.kind == "gap":
                request_more()
    finally:
        link.stop()
