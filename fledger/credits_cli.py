"""``fledger credits``: the owner's deposits and withdrawals, balances and receipts.

Deposits and withdrawals are orders signed with the owner key (the coordinator's key file from
`fledger keys init`), sent over MQTT to the coordinator, which checks and records them in the
ledger and confirms with a signed reply. Balances and receipts come from the ledger file alone.
"""

from __future__ import annotations

import argparse
import json
import queue
import sys
import time
from pathlib import Path
from typing import Any

from federation import config as cfg
from federation import prediction_wire as wire
from federation.envelope import EnvelopeError
from federation.exit_codes import TAMPERED, TIMEOUT, USAGE
from federation.fleet_state import FleetLedger
from federation.keys import CoordinatorKeys
from federation.mqtt import BrokerConfig, MqttLink
from federation.topics import Topics
from ledger import merkle

RESEND_S = 3.0  # an unanswered order or request is sent again (same id) this often


def add_parser(sub: Any) -> None:
    p = sub.add_parser("credits", help="pay-per-prediction: deposit, withdraw, balance, receipt",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cs = p.add_subparsers(dest="credits_command", required=True, metavar="ACTION")
    for name, text in (("deposit", "credit a prediction client (owner only)"),
                       ("withdraw", "withdraw collected fees, never more than held (owner only)")):
        a = cs.add_parser(name, help=text, description=text[0].upper() + text[1:] + ". The order is signed with "
                          "the owner key and recorded by the coordinator in the ledger; exit 0 once it confirms.")
        if name == "deposit":
            a.add_argument("client", help="client id (from `fledger keys add-client`)")
        a.add_argument("amount", type=int, help="integer amount in the smallest unit")
        a.add_argument("--keys", type=Path, default=Path("keys/coordinator.json"),
                       help="the owner key: the coordinator key file (default: keys/coordinator.json)")
        a.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the confirmation (exit 3)")
        cfg.add_arguments(a, BrokerConfig)
    a = cs.add_parser("balance", help="balances, fees collected and withdrawn, recomputed from the ledger file",
                      description="Fold the ledger's deposits, receipts and withdrawals into balances (no network).")
    a.add_argument("ledger", type=Path, help="ledger file (state/coordinator/ledger.log or a replica copy)")
    a.add_argument("--client", default=None, help="print only this client's balance")
    a.add_argument("--json", action="store_true", help="JSON for machines")
    a = cs.add_parser("receipt", help="a request's receipt and its Merkle proof of inclusion in the chain",
                      description="Find the receipt of CLIENT's request REQUEST_ID and prove the receipt block is in "
                                  "the chain (RFC 6962 inclusion of its hash under the chain root at the ledger's "
                                  "height). Exit 1 if there is none or it does not verify.")
    a.add_argument("ledger", type=Path)
    a.add_argument("--client", required=True)
    a.add_argument("--request-id", required=True, help="hex, as `fledger predict --remote` prints it")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    command = args.credits_command
    if command in ("deposit", "withdraw"):
        return send_order(args)
    if command == "balance":
        with FleetLedger.open(args.ledger) as ledger:  # the fold checks every credits record
            accounts = ledger.state.accounts
        summary = accounts.summary()
        if args.client is not None:
            print(accounts.balance(args.client))
        elif args.json:
            print(json.dumps(summary, indent=2, sort_keys=True))
        else:
            print("client\tdeposited\tspent\tbalance\trequests")
            for client, row in summary["clients"].items():
                print(f"{client}\t{row['deposited']}\t{row['spent']}\t{row['balance']}\t{row['requests']}")
            print(f"fees collected {summary['collected']}, withdrawn {summary['withdrawn']}, held {summary['held']}")
        return 0
    return prove_receipt(args)


def prove_receipt(args: argparse.Namespace) -> int:
    request_id = bytes.fromhex(args.request_id)
    with FleetLedger.open(args.ledger) as ledger:
        index = ledger.state.accounts.charged.get((args.client, request_id))
        if index is None:
            print(f"no receipt for request {args.request_id} of {args.client}", file=sys.stderr)
            return TAMPERED
        block = ledger.block(index)
        size = ledger.height
        leaves = [merkle.leaf_hash(b.hash) for b in ledger.blocks(0, size)]
        root = ledger.chain_root(size)
        ok = block.computed_hash() == block.hash and ledger.coordinator_key is not None
    path = merkle.inclusion_proof(leaves, index)
    ok = ok and merkle.verify_inclusion(merkle.leaf_hash(block.hash), index, size, path, root)
    data = block.data
    scaler = {"scaler_sha256": data["scaler_sha256"].hex()} if "scaler_sha256" in data else {}
    print(json.dumps({**scaler, "client": data["client"], "request_id": data["request_id"].hex(), "rows": data["rows"],
                      "fee": data["fee"], "round": data["round"], "model_sha256": data["model_sha256"].hex(),
                      "reply_sha256": data["reply_sha256"].hex(), "block_index": index, "block_hash": block.hash.hex(),
                      "tree_size": size, "chain_root": root.hex(), "path": [p.hex() for p in path], "verified": ok},
                     indent=2))
    return 0 if ok else TAMPERED


def send_order(args: argparse.Namespace) -> int:
    keys = CoordinatorKeys.load(args.keys)
    broker = cfg.load(BrokerConfig, args, section="owner")
    topics = Topics(keys.fleet, broker.topic_prefix)
    order_id, message = wire.seal_order(keys, "deposit" if args.credits_command == "deposit" else "withdraw",
                                        args.amount, getattr(args, "client", None))
    link = MqttLink(broker, f"fledger-owner-{keys.fleet}", subscriptions=[wire.order_reply_topic(topics)])
    link.start(timeout=min(60.0, args.timeout))
    try:
        deadline = time.monotonic() + args.timeout
        sent = 0.0
        while time.monotonic() < deadline:
            if time.monotonic() - sent > RESEND_S:  # the coordinator may not be subscribed yet;
                sent = time.monotonic()            # a resent order is recorded once
                link.publish(wire.order_topic(topics), message)
            try:
                reply = link.inbox.get(timeout=0.5)
            except queue.Empty:
                continue
            try:
                body = wire.open_order_reply(reply.payload, keys.public.sign_public)
            except EnvelopeError:
                continue
            if body.get("order_id") != order_id.hex():
                continue
            if not body.get("ok"):
                print(f"fledger credits: refused: {body.get('reason')}", file=sys.stderr)
                return TAMPERED if "signed" in str(body.get("reason")) else USAGE
            what = f"deposit of {args.amount} to {body['client']} (balance {body['balance']})" \
                if "client" in body else f"withdrawal of {args.amount} (fees still held {body['held']})"
            print(f"{what} recorded in ledger block {body['block_index']} {body['block_hash'][:16]}")
            return 0
        print(f"fledger credits: no confirmation from the coordinator within {args.timeout:.0f}s", file=sys.stderr)
        return TIMEOUT
    finally:
        link.stop()
