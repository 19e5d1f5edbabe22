"""``fledger status``: the fleet as the coordinator's signed status tells it.

The coordinator publishes a retained, signed JSON status on ``<prefix>/<fleet>/status``
whenever something changes (docs/protocol.md). This command reads it, checks the signature
against the coordinator's public key you give it, and prints it. Nothing unsigned is printed.
"""

from __future__ import annotations

import argparse
import json
import logging
import queue
import secrets
import sys
import time
from typing import Any

from federation import config as cfg
from federation import envelope
from federation.catch_up import CatchUpSchedule, request_body
from federation.crypto import key_id_of
from federation.envelope import EnvelopeError
from federation.exit_codes import TAMPERED, TIMEOUT
from federation.mqtt import BrokerConfig, MqttLink
from federation.topics import Topics
from fledger.ledger_cli import _trusted_key

log = logging.getLogger("fledger.status")


def add_parser(sub: Any) -> None:
    p = sub.add_parser("status", help="print the fleet's signed status: round, devices, rejections, ledger head",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fleet", required=True, help="fleet name")
    p.add_argument("--coordinator-key", required=True,
                   help="the coordinator's public signing key: hex, a device bundle, or the coordinator key file")
    p.add_argument("--json", action="store_true", help="print the verified status as JSON")
    p.add_argument("--watch", action="store_true", help="keep printing each new status until interrupted")
    p.add_argument("--timeout", type=float, default=10.0,
                   help="exit 3 if no status arrives within this many seconds (default: 10)")
    p.add_argument("--client-id", default="", help="MQTT client id (default: fledger-status-<fleet>-<random>)")
    cfg.add_arguments(p, BrokerConfig)
    p.set_defaults(func=main)


def _ago(seconds: float) -> str:
    if seconds < 0:
        return "in the future by the coordinator's clock"
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


def format_status(body: dict[str, Any], key_id: str, now: float) -> str:
    """The status as a few lines for a person."""
    state = body.get("state", "?")
    accepted = body.get("accepted") or []
    lines = [f"fleet {body.get('fleet')}: round {body.get('round')}, {state}"
             + (f" - {len(accepted)} of {body.get('min_clients')} updates in, waiting for {body.get('waiting_for')}"
                if state == "waiting" else "")]
    if body.get("halted"):
        lines.append(f"HALTED: {body['halted']}")
    when = body.get("time")
    if isinstance(when, (int, float)):
        stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(when))
        lines.append(f"  signed by coordinator key {key_id}, as of {stamp} ({_ago(now - when)})")
    lines.append(f"ledger: height {body.get('height')}, head {str(body.get('head', ''))[:16]}")
    presence: dict[str, str] = body.get("presence") or {}
    online = sorted(d for d, s in presence.items() if s == "online")
    devices = sorted(set(presence) | set(body.get("datasets") or {}))
    lines.append(f"devices: {len(online)} online of {len(devices)} known")
    for device in devices:
        note = " (update accepted in this round)" if device in accepted else ""
        lines.append(f"  {device:<24} {presence.get(device, 'no heartbeat yet')}{note}")
    lines.append(f"accepted updates since the coordinator started: {body.get('accepted_total', 0)}")
    rejections: dict[str, int] = body.get("rejections") or {}
    if rejections:
        listed = ", ".join(f"{reason} {count}" for reason, count in sorted(rejections.items(), key=lambda x: -x[1]))
        lines.append(f"rejections since the coordinator started: {listed}")
    else:
        lines.append("rejections since the coordinator started: none")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    broker = cfg.load(BrokerConfig, args, section="monitor")
    topics = Topics(args.fleet, broker.topic_prefix)
    key = _trusted_key(args)
    assert key is not None  # --coordinator-key is required
    key_id = key_id_of(key)
    # On a broker cluster the retained status may live on another node: ask for it if none comes.
    asker = broker.username or f"status-{secrets.token_hex(4)}"
    reply_topic = topics.catch_up_reply(asker, "status")
    link = MqttLink(broker, args.client_id or f"fledger-status-{args.fleet}-{secrets.token_hex(4)}",
                    subscriptions=[topics.status, topics.status_chunks, reply_topic], persistent=False)
    link.start(timeout=args.timeout or 30)
    catch_up = CatchUpSchedule(wait_s=1.0)
    deadline = time.monotonic() + args.timeout if args.timeout else None
    newest = float("-inf")
    try:
        while True:
            wait = 0.5 if deadline is None else deadline - time.monotonic()
            if catch_up.due(time.monotonic(), link.connect_count, lacking=newest == float("-inf")):
                link.publish(topics.catch_up(asker), request_body())
            if wait <= 0:
                print(f"no status on {topics.status} within {args.timeout:g}s: is the coordinator running, and may "
                      "this broker user read that topic?", file=sys.stderr)
                return TIMEOUT
            try:
                message = link.inbox.get(timeout=min(wait, 0.5))
            except queue.Empty:
                continue
            if message.topic not in (topics.status, reply_topic):
                continue  # amqtt hands out retained messages of other topics
            try:
                body = envelope.open_status(message.payload, key)
            except EnvelopeError as exc:
                print(f"status on {topics.status} refused: {exc} (key {key_id})", file=sys.stderr)
                if args.watch:
                    continue
                return TAMPERED
            if body.get("fleet") != args.fleet:
                print(f"status on {topics.status} is signed for fleet {body.get('fleet')!r}", file=sys.stderr)
                return TAMPERED
            stamp = body.get("time")
            when = float(stamp) if isinstance(stamp, (int, float)) else 0.0
            if when < newest:
                continue  # an older status (replayed): says nothing new
            newest = when
            if args.json:
                print(json.dumps({"topic": topics.status, "signed_by": key_id, "status": body}, sort_keys=True),
                      flush=True)
            else:
                print(format_status(body, key_id, time.time()), flush=True)
            if not args.watch:
                return 0
            deadline = None  # watching: wait for the next change as long as it takes
            if not args.json:
                print(flush=True)
    finally:
        link.stop()
