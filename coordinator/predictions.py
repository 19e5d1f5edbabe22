"""Paid predictions: admission of a client's request, the charge, the receipt and the reply.

No network here: the daemon hands in request and order payloads and publishes what this
service returns through ``publish(topic, payload)``; the clock is passed in. Accounting is the
pure fold of :mod:`federation.credits` over the ledger, kept in step with every record appended,
so a restart recomputes exactly the balances the ledger implies.

Order for an answered request (the commit point is the receipt):
checks -> prediction computed -> receipt block appended (fsync) -> reply published.
:meth:`PredictionService.handle_batch` answers several queued requests with one fsync (group
commit): their receipts are appended, synced together, and only then are the ledger blocks
announced and the replies published.
A crash before the receipt charges nothing and answers nothing; after it, the client can ask
again with the same request id and gets the receipt (never a second charge).

Checks, each refusal signed, counted, never charged and never recorded: size, envelope,
topic/fleet, registered client, signature, replay of a charged request id, freshness,
decryption, shape and row count, balance.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

from coordinator.inference import InputError, Predictor
from federation import credits
from federation import prediction_wire as wire
from federation.codec import TensorDict
from federation.envelope import EnvelopeError
from federation.keys import CoordinatorKeys, DeviceRegistry
from federation.topics import Topics

log = logging.getLogger(__name__)

# publish(topic, payload) and, for an answer to an MQTT 5 request that carried Correlation Data,
# publish(topic, payload, correlation): the daemon sets it as the reply's Correlation Data.
Publish = Callable[..., None]
MAX_CORRELATION_BYTES = 256  # longer Correlation Data is not echoed (the signed request id still matches)
Append = Callable[[dict[str, Any]], Any]  # appends a record (durably, unless in a group commit), returns the block
GroupCommit = Callable[[], AbstractContextManager[Any]]


class Delivery(Protocol):
    """A received request or order (federation.mqtt.Message is one): its topic and payload, and
    over MQTT 5 the Response Topic and Correlation Data the sender set (else None)."""

    @property
    def topic(self) -> str: ...
    @property
    def payload(self) -> bytes: ...
    @property
    def response_topic(self) -> str | None: ...
    @property
    def correlation(self) -> bytes | None: ...


@dataclass(frozen=True)
class CurrentModel:
    round: int
    sha256: bytes
    weights: TensorDict


@dataclass(frozen=True)
class PredictionSettings:
    fee: int = 1  # smallest unit, per request or per row
    fee_per: str = "request"  # "request" or "row"
    max_rows: int = 1024
    max_request_bytes: int = 1 << 20
    max_skew: float = 300.0  # seconds a request's 'created' may differ from our clock
    reply_cache: int = 4096  # answered replies kept to answer a replayed request id identically

    def __post_init__(self) -> None:
        if type(self.fee) is not int or self.fee < 0:
            raise ValueError(f"the prediction fee must be an integer >= 0 (smallest unit), not {self.fee!r}")
        if self.fee_per not in ("request", "row"):
            raise ValueError(f"fee per must be 'request' or 'row', not {self.fee_per!r}")
        if self.max_rows < 1 or self.max_request_bytes < 1024:
            raise ValueError("max rows must be >= 1 and max request bytes >= 1024")

    def fee_for(self, rows: int) -> int:
        return self.fee * rows if self.fee_per == "row" else self.fee


@dataclass(frozen=True)
class Outcome:
    status: str  # "ok", "duplicate" or a refusal reason
    client: str | None = None
    fee: int = 0


class PredictionService:
    def __init__(self, settings: PredictionSettings, keys: CoordinatorKeys, clients: DeviceRegistry,
                 accounts: credits.Accounts, *, append: Append, model: Callable[[], CurrentModel],
                 predictor: Predictor | None, publish: Publish, topics: Topics,
                 now: Callable[[], float] = time.time, group_commit: GroupCommit = contextlib.nullcontext,
                 announce: Callable[[Sequence[Any]], None] = lambda blocks: None,
                 block: Callable[[int], Any] | None = None) -> None:
        self.settings = settings
        self.keys = keys
        self.clients = clients
        # The balances are the ledger fold's (federation/fleet_state.py), which every append
        # updates: this service checks a record before appending it and never folds it itself.
        self.accounts = accounts
        self._append = append
        self._model = model
        self.predictor = predictor
        self._publish = publish
        self.topics = topics
        self._now = now
        self.rejections: Counter[str] = Counter()
        self.answered = 0
        self._replies: OrderedDict[tuple[str, bytes], bytes] = OrderedDict()
        self._group_commit = group_commit
        self._announce = announce  # tells followers of the ledger about blocks, once they are durable
        self._block = block  # a ledger block by index: a charged request's receipt, to answer it again
        self._held: list[tuple[str, bytes, bytes | None]] | None = None  # replies held until the group commit
        self._new_blocks: list[Any] = []
        self.foreign_response_topics = 0  # MQTT 5 requests naming a response topic not their client's

    def _send(self, topic: str, payload: bytes, correlation: bytes | None = None) -> None:
        if self._held is not None:
            self._held.append((topic, payload, correlation))
        else:
            self._put(topic, payload, correlation)

    def _put(self, topic: str, payload: bytes, correlation: bytes | None) -> None:
        if correlation is None:
            self._publish(topic, payload)
        else:
            self._publish(topic, payload, correlation)

    def _route(self, client: str, response_topic: str | None, correlation: bytes | None
               ) -> tuple[str, bytes | None]:
        """Where the answer to ``client``'s request goes, and the Correlation Data it carries.

        An MQTT 5 request names its Response Topic; the coordinator follows it only when it is
        the client's own reply topic. Any other would let a client direct the coordinator's
        signed messages onto topics it may not publish to itself (the broker's ACL gives each
        client only its own reply topic to read): such a request is answered on its client's
        reply topic. Over MQTT 3.1.1 (no properties) that fixed topic is the only one."""
        topic = wire.reply_topic(self.topics, client)
        if response_topic is not None and response_topic != topic:
            self.foreign_response_topics += 1
            log.warning("a request of %s names the response topic %r, not its own: answered on %s",
                        client, response_topic[:200], topic)
        if correlation is not None and len(correlation) > MAX_CORRELATION_BYTES:
            correlation = None
        return topic, correlation

    def _record(self, record: dict[str, Any]) -> Any:
        block = self._append(record)
        if self._held is not None:
            self._new_blocks.append(block)
        else:
            self._announce([block])
        return block

    def handle_batch(self, messages: Iterable[tuple[str, bytes] | Delivery]) -> list[Outcome | dict[str, Any]]:
        """Requests and orders (``(topic, payload)`` or received messages, which may carry an
        MQTT 5 response topic), answered in order with one fsync for all their records."""
        self._held, self._new_blocks = [], []
        held, blocks = self._held, self._new_blocks
        try:
            with self._group_commit():
                results: list[Outcome | dict[str, Any]] = []
                for message in messages:
                    if isinstance(message, tuple):
                        topic, payload = message
                        response_topic, correlation = None, None
                    else:
                        topic, payload = message.topic, message.payload
                        response_topic, correlation = message.response_topic, message.correlation
                    results.append(self.handle_order(payload) if topic == wire.order_topic(self.topics) else
                                   self.handle_request(topic, payload, response_topic=response_topic,
                                                       correlation=correlation))
        finally:
            self._held, self._new_blocks = None, []
        self._announce(blocks)  # durable now
        for topic, payload, correlation in held:
            self._put(topic, payload, correlation)
        return results

    # -- requests --------------------------------------------------------------------------------
    def handle_request(self, topic: str, payload: bytes, *, response_topic: str | None = None,
                       correlation: bytes | None = None) -> Outcome:
        """Answer one request (``response_topic``, ``correlation``: its MQTT 5 properties)."""
        client = wire.client_of(self.topics, topic)
        if client is None:
            return Outcome("not_a_request")
        route = self._route(client, response_topic, correlation)
        try:
            return self._handle_request(client, payload, route)
        except _Refusal as refusal:
            self.rejections[refusal.reason] += 1
            log.warning("refused a prediction request from %s: %s: %s", client, refusal.reason, refusal.detail)
            refused = wire.seal_refusal(self.keys, client, refusal.request_id, refusal.reason, refusal.detail,
                                        balance=refusal.balance, now=self._now())
            self._send(route[0], refused, route[1])
            return Outcome(refusal.reason, client)

    def _handle_request(self, client: str, payload: bytes, route: tuple[str, bytes | None]) -> Outcome:
        settings = self.settings
        if len(payload) > settings.max_request_bytes:
            raise _Refusal("oversized", f"{len(payload)} bytes exceeds {settings.max_request_bytes}")
        try:
            sealed = wire.parse_request(payload, max_bytes=settings.max_request_bytes)
        except EnvelopeError as exc:
            raise _Refusal(exc.reason, exc.detail) from None
        header = sealed.header
        request_id = header.request_id
        if header.client != client or header.fleet != self.keys.fleet:
            raise _Refusal("wrong_topic", f"request of {header.client!r} (fleet {header.fleet!r}) sent on the "
                                          f"topic of {client!r}", request_id)
        public_key = self.clients.public_key(client, header.key_id)
        if public_key is None:
            raise _Refusal("unknown_client", f"{client!r} key {header.key_id} is not a registered prediction "
                                             "client key", request_id)
        try:
            wire.verify_request(sealed, public_key)
        except EnvelopeError as exc:
            raise _Refusal(exc.reason, exc.detail, request_id) from None
        key = (client, request_id)
        if key in self.accounts.charged:
            self.rejections["duplicate"] += 1
            # The same answer again, with the same receipt, never a second charge: from the replies
            # kept, or (after a restart, when a crash may have lost the reply after its receipt was
            # durable) recomputed and sent only if it is exactly the answer the receipt records.
            reply = self._replies.get(key) or self._answer_again(client, sealed)
            self._send(route[0], reply, route[1])
            log.info("replayed request %s of %s: answered with its receipt, not charged again",
                     request_id.hex()[:8], client)
            return Outcome("duplicate", client)
        if self.predictor is None:
            raise _Refusal("unavailable", "this coordinator serves no predictions (task csv needs "
                                          "--predict-scaler)", request_id)
        if not math.isfinite(header.created) or abs(self._now() - header.created) > settings.max_skew:
            raise _Refusal("stale", f"request created {header.created:.0f}, our clock {self._now():.0f} "
                                    f"(at most {settings.max_skew:.0f}s apart)", request_id)
        try:
            inputs, reply_key = wire.decrypt_request(sealed, self.keys, max_bytes=settings.max_request_bytes)
        except EnvelopeError as exc:
            raise _Refusal(exc.reason, exc.detail, request_id) from None
        predictor = self.predictor
        try:
            predictor.check(inputs)
        except InputError as exc:
            raise _Refusal("wrong_shape", str(exc), request_id) from None
        rows = int(inputs.shape[0])
        if rows != header.rows or not 1 <= rows <= settings.max_rows:
            raise _Refusal("wrong_shape", f"{rows} rows (header says {header.rows}); 1 to {settings.max_rows} "
                                          "per request", request_id)
        fee = settings.fee_for(rows)
        balance = self.accounts.balance(client)
        if fee > balance:
            raise _Refusal("insufficient_balance", f"fee {fee} exceeds the balance {balance}", request_id,
                           balance=balance)
        model = self._model()
        predictions = predictor(model.sha256, model.weights, inputs)
        encoded = wire.encode_predictions(predictions)
        scaler = {"scaler_sha256": predictor.scaler_sha256} if predictor.scaler_sha256 is not None else {}
        record = credits.receipt(client, request_id, rows, fee, model.round, model.sha256, sealed.digest,
                                 _sha256(encoded), **scaler)
        self.accounts.check(record, fleet=self.keys.fleet)  # the ledger checks again on append
        block = self._record(record)  # durable before anyone sees the answer
        reply = wire.seal_answer(self.keys, client, request_id, reply_key, encoded, receipt=block,
                                 balance=self.accounts.balance(client), output=predictor.output, now=self._now())
        self._keep(client, request_id, reply)
        self.answered += 1
        self._send(route[0], reply, route[1])
        return Outcome("ok", client, fee)

    def _answer_again(self, client: str, sealed: wire.SealedRequest) -> bytes:
        """The reply to a charged request no longer kept: the predictions recomputed with the
        receipt's model, sent with the receipt if their digest is the one it records (the same
        request bytes, the same model, a deterministic model). Otherwise a ``duplicate`` refusal
        naming the receipt's block: the charge stands, the ledger proves what was answered."""
        request_id = sealed.header.request_id
        index = self.accounts.charged[(client, request_id)]
        refusal = _Refusal("duplicate", f"request already answered and charged, receipt in ledger block {index}",
                           request_id)
        block = self._block(index) if self._block is not None else None
        predictor = self.predictor
        if block is None or predictor is None or block.data.get("request_sha256") != sealed.digest \
                or block.data.get("scaler_sha256") != predictor.scaler_sha256 \
                or abs(self._now() - sealed.header.created) > self.settings.max_skew:
            raise refusal
        model = self._model()
        if model.sha256 != block.data["model_sha256"]:
            raise _Refusal("duplicate", f"{refusal.detail}; its model (round {block.data['round']}) is no longer "
                                        "the current one, so the answer cannot be sent again", request_id)
        try:
            inputs, reply_key = wire.decrypt_request(sealed, self.keys, max_bytes=self.settings.max_request_bytes)
            predictor.check(inputs)
        except (EnvelopeError, InputError):
            raise refusal from None
        encoded = wire.encode_predictions(predictor(model.sha256, model.weights, inputs))
        if _sha256(encoded) != block.data["reply_sha256"]:
            log.warning("request %s of %s: the recomputed answer differs from its receipt's digest; not sent",
                        request_id.hex()[:8], client)
            raise refusal
        reply = wire.seal_answer(self.keys, client, request_id, reply_key, encoded, receipt=block,
                                 balance=self.accounts.balance(client), output=predictor.output, now=self._now())
        self._keep(client, request_id, reply)
        return reply

    def _keep(self, client: str, request_id: bytes, reply: bytes) -> None:
        self._replies[(client, request_id)] = reply
        while len(self._replies) > self.settings.reply_cache:
            self._replies.popitem(last=False)

    # -- the owner's orders ----------------------------------------------------------------------
    def handle_order(self, payload: bytes) -> dict[str, Any]:
        """Record a signed deposit or withdrawal; publish and return the signed answer's body."""
        body: dict[str, Any] = {"fleet": self.keys.fleet}
        try:
            order, signature, fields = wire.open_order(payload, self.keys.public.sign_public, fleet=self.keys.fleet)
            body["order_id"] = fields["order_id"].hex()
            body["action"] = fields["action"]
            if not math.isfinite(float(fields.get("created", math.nan))) or \
                    abs(self._now() - float(fields["created"])) > self.settings.max_skew:
                raise ValueError("stale order: its time differs from the coordinator's clock")
            if fields["order_id"] in self.accounts.orders:  # a resend: confirm again, record nothing
                body.update(ok=True, duplicate=True, block_index=self.accounts.orders[fields["order_id"]],
                            held=self.accounts.held)
                if fields["action"] == "deposit":
                    body.update(client=fields["client"], balance=self.accounts.balance(fields["client"]))
                self._send(wire.order_reply_topic(self.topics), wire.seal_order_reply(self.keys, body))
                return body
            if fields["action"] == "deposit" and fields["client"] not in self.clients.devices:
                raise ValueError(f"{fields['client']!r} is not a registered prediction client")
            record = credits.owner_record(order, signature)
            self.accounts.check(record, fleet=self.keys.fleet)
        except (EnvelopeError, ValueError) as exc:
            reason = exc.reason if isinstance(exc, EnvelopeError) else "refused"
            self.rejections[f"order_{reason}"] += 1
            log.warning("refused an owner's order: %s", exc)
            body.update(ok=False, reason=str(exc))
        else:
            block = self._record(record)
            log.info("recorded %s of %d%s in ledger block %d", record["type"], record["amount"],
                     f" for {record['client']}" if "client" in record else "", block.index)
            body.update(ok=True, block_index=block.index, block_hash=block.hash.hex(), held=self.accounts.held)
            if "client" in record:
                body.update(client=record["client"], balance=self.accounts.balance(record["client"]))
        self._send(wire.order_reply_topic(self.topics), wire.seal_order_reply(self.keys, body))
        return body


class _Refusal(Exception):
    def __init__(self, reason: str, detail: str, request_id: bytes | None = None, *, balance: int | None = None):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail, self.request_id, self.balance = reason, detail, request_id, balance


def _sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()
