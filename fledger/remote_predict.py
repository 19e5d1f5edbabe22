"""``fledger predict --remote``: buy predictions from the fleet's coordinator over MQTT.

The client signs and encrypts its rows (or images) to the coordinator, waits for the reply
matched by request id, checks the coordinator's signature and the receipt block (signed, in
the ledger, recording the fee and the digest of exactly these predictions), and prints the
predictions in the data's own units (or class probabilities).
"""

from __future__ import annotations

import argparse
import csv
import json
import queue
import secrets
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from federation import config as cfg
from federation import prediction_wire as wire
from federation.envelope import EnvelopeError
from federation.exit_codes import TIMEOUT, USAGE
from federation.mqtt import BrokerConfig, MqttLink
from federation.topics import Topics
from fledger.credits_cli import RESEND_S

REMOTE_HELP = """
With --remote the rows go to the fleet's coordinator, signed with the client bundle from
`fledger keys add-client` and encrypted to the coordinator; each answered request is charged
the configured fee from the balance the owner deposited (`fledger credits deposit`) and
recorded as a receipt in the ledger (`fledger credits receipt` proves it). Exit 0 when
answered, 2 when refused (the reason is printed), 3 on --timeout.
"""


def add_remote_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--remote", action="store_true", help="ask the coordinator over MQTT (paid per prediction)")
    p.add_argument("--bundle", type=Path, default=None, help="with --remote: the client bundle (client-NAME.json)")
    p.add_argument("--columns", default=None, help="with --remote: comma-separated feature columns in the model's "
                                                   "order (default: from --scaler, or California's)")
    p.add_argument("--timeout", type=float, default=60.0, help="with --remote: seconds to wait for the answer")
    cfg.add_arguments(p, BrokerConfig)


def _inputs(args: argparse.Namespace) -> np.ndarray:
    from fledger.predict import PredictError, read_rows

    if args.task == "mnist":
        try:
            images = np.load(args.data, allow_pickle=False)  # never unpickle a file
        except (OSError, ValueError) as exc:
            raise PredictError(f"{args.data}: not a .npy array of images ({exc})") from None
        return np.ascontiguousarray(images)
    if args.columns:
        columns = [c.strip() for c in str(args.columns).split(",") if c.strip()]
    elif args.scaler is not None:
        try:
            columns = list(json.loads(args.scaler.read_text())["feature_names"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise PredictError(f"{args.scaler}: no feature_names ({exc!r})") from None
    elif args.task == "california":
        from federation.datasets import CALIFORNIA_FEATURES  # not federation.tasks: a client needs no torch

        columns = list(CALIFORNIA_FEATURES)
    else:
        raise PredictError("task csv with --remote needs --columns or --scaler (for the feature columns)")
    values, _rows = read_rows(args.data, columns)
    return values


def predict_remote(args: argparse.Namespace) -> int:
    from fledger.predict import PredictError

    if args.bundle is None:
        raise PredictError("--remote needs --bundle (the client bundle from `fledger keys add-client`)")
    bundle = wire.ClientBundle.load(args.bundle)
    inputs = _inputs(args)
    broker = cfg.load(BrokerConfig, args, section="client")
    topics = Topics(bundle.fleet, broker.topic_prefix)
    pending = wire.seal_request(bundle, inputs)
    # A client id of its own per run: two runs of one client at once must not take over each
    # other's session (the broker would drop one, and its reply with it). A one-shot session.
    link = MqttLink(broker, f"fledger-client-{bundle.client_id}-{secrets.token_hex(4)}",
                    subscriptions=[wire.reply_topic(topics, bundle.client_id)], persistent=False)
    link.start(timeout=min(60.0, args.timeout))
    reply_topic = wire.reply_topic(topics, bundle.client_id)
    try:
        # Over MQTT 5 the request names its response topic and the request id as Correlation
        # Data (the coordinator echoes it); over 3.1.1 these are not sent and the reply comes on
        # the same fixed topic, matched by the request id in its signed header either way.
        reply = _wait(link, bundle, pending, args.timeout,
                      lambda: link.publish(wire.request_topic(topics, bundle.client_id), pending.payload,
                                           chunked=True, response_topic=reply_topic,
                                           correlation=pending.request_id))
    finally:
        link.stop()
    if reply is None:
        print(f"fledger predict: no reply from the coordinator within {args.timeout:.0f}s", file=sys.stderr)
        return TIMEOUT
    if reply.status != wire.OK or reply.predictions is None or reply.receipt is None:
        print(f"fledger predict: refused: {reply.reason}: {reply.detail}", file=sys.stderr)
        return USAGE
    _print(reply)
    receipt = reply.receipt
    scaler = f", scaler {reply.scaler_sha256.hex()[:16]}" if reply.scaler_sha256 else ""
    print(f"# {len(reply.predictions)} predictions, model of round {reply.round} ({reply.model_sha256.hex()[:16]}"
          f"{scaler}), fee {reply.fee}, balance {reply.balance}; request {pending.request_id.hex()}, receipt ledger "
          f"block {receipt.index} {receipt.hash.hex()[:16]}", file=sys.stderr)
    return 0


def _wait(link: MqttLink, bundle: wire.ClientBundle, pending: wire.PendingRequest, timeout: float,
          send: Callable[[], object]) -> wire.PredictionReply | None:
    """Send, and send again every RESEND_S until the reply comes: the same request id is charged
    once (a resend is answered with the same receipt), so a coordinator that was not yet
    subscribed, or a reply lost on the way, costs nothing."""
    deadline = time.monotonic() + timeout
    sent = 0.0
    while time.monotonic() < deadline:
        if time.monotonic() - sent > RESEND_S:
            sent = time.monotonic()
            send()
        try:
            message = link.inbox.get(timeout=0.5)
        except queue.Empty:
            continue
        if message.correlation is not None and message.correlation != pending.request_id:
            continue  # MQTT 5: the answer to another request of this client, no need to open it
        try:
            return wire.open_reply(message.payload, bundle, pending)
        except EnvelopeError as exc:
            if exc.reason != "wrong_request":  # a reply to an earlier request of ours is no news
                print(f"fledger predict: ignored a reply: {exc}", file=sys.stderr)
    return None


def _print(reply: Any) -> None:
    writer = csv.writer(sys.stdout)
    predictions = reply.predictions
    if reply.output == "probabilities":
        writer.writerow(["row", "class", *[f"p{i}" for i in range(predictions.shape[1])]])
        for i, probs in enumerate(predictions):
            writer.writerow([i, int(np.argmax(probs)), *[f"{float(p):.6g}" for p in probs]])
    else:
        writer.writerow(["row", "prediction"])
        for i, value in enumerate(predictions.reshape(-1)):
            writer.writerow([i, f"{float(value):.6g}"])
