"""Paid predictions on the wire: client bundles, requests, replies and the owner's orders.

Request (client -> coordinator, on ``<prefix>/<fleet>/predict/<client>/request``)::

    {"fmt": "fledger.predict.request", "v": 1, "hdr": <bytes>, "sig": <64 B>, "ct": <bytes>, "tag": <16 B>}

``hdr`` (msgpack map): fleet, client, key_id, request_id (16 random bytes), created, epk (a
fresh X25519 key), to (coordinator key id), iv, rows, inputs_sha256. ``sig`` is the client's
Ed25519 signature over REQUEST_CONTEXT + hdr. ``ct`` is the inputs (``federation.codec``
tensors, one tensor ``x``) under AES-256-GCM with a key from X25519(epk, coordinator) + HKDF
(salt: request_id), ``hdr`` as associated data: inputs are private and bound to the header.

Reply (coordinator -> client, on ``.../predict/<client>/reply``): ``fmt``
``fledger.predict.reply``, a header signed by the coordinator (REPLY_CONTEXT + hdr) naming the
request id, status (``ok`` or ``refused`` with a reason), and for ``ok`` the model round and
hash, fee, balance after it, the SHA-256 of the predictions and the receipt block; the
predictions are encrypted with a second key derived (HKDF) from the request's key (only the
requester can read them); ``block`` is the coordinator-signed ledger block of the receipt, which records
the same reply digest: the reply is bound to the receipt and the receipt to the chain.

Owner orders (``fledger credits deposit|withdraw``, on ``<prefix>/<fleet>/credits/order``):
``{"fmt": "fledger.credits.order", "v": 1, "order": <msgpack>, "sig": <64 B>}`` signed by the
coordinator's key (the owner key, ledger.credits.ORDER_CONTEXT); the coordinator records the
order verbatim and answers on ``.../credits/reply`` with a signed JSON body.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
from Crypto.Hash import SHA256
from Crypto.Protocol.KDF import HKDF

from federation import crypto
from federation.codec import CodecError, decode_tensors, encode_tensors
from federation.credits import ORDER_CONTEXT, RECEIPT, decode_order
from federation.envelope import (
    ENVELOPE_VERSION,
    EnvelopeError,
    _field,
    _header_map,
    _open_signed_json,
    _pack,
    _seal_signed_json,
    _unpack_outer,
)
from federation.keys import CoordinatorKeys, CoordinatorPublic, KeyFileError, _hex, read_json, write_secret_json
from federation.topics import Topics, check_name
from ledger import canonical
from ledger.block import Block

REQUEST_FORMAT = "fledger.predict.request"
REPLY_FORMAT = "fledger.predict.reply"
ORDER_FORMAT = "fledger.credits.order"
REQUEST_CONTEXT = b"fledger/predict-request/v1\n"
REPLY_CONTEXT = b"fledger/predict-reply/v1\n"
ORDER_REPLY_CONTEXT = b"fledger/credits-reply/v1\n"
REQUEST_KDF = b"fledger/predict-request/v1"
REPLY_KDF = b"fledger/predict-reply/v1"
OK = "ok"
REFUSED = "refused"
MAX_ORDER_BYTES = 1024


# --- topics -------------------------------------------------------------------------------------


def request_topic(topics: Topics, client: str) -> str:
    return f"{topics.base}/predict/{check_name('client id', client)}/request"


def reply_topic(topics: Topics, client: str) -> str:
    return f"{topics.base}/predict/{check_name('client id', client)}/reply"


def request_topics(topics: Topics) -> str:
    return f"{topics.base}/predict/+/request"


def order_topic(topics: Topics) -> str:
    return f"{topics.base}/credits/order"


def order_reply_topic(topics: Topics) -> str:
    return f"{topics.base}/credits/reply"


def client_of(topics: Topics, topic: str) -> str | None:
    """The client id in a request topic, or None if ``topic`` is not one (or the id is invalid)."""
    parts = topic.split("/")
    base = topics.base.split("/")
    if len(parts) != len(base) + 3 or parts[: len(base)] != base or parts[-3] != "predict" or parts[-1] != "request":
        return None
    try:
        return check_name("client id", parts[-2])
    except ValueError:
        return None


# --- client keys --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClientBundle:
    """A prediction client's identity and the coordinator's public keys; no fleet model key (a
    client buys predictions, it never sees the model). Written by `fledger keys add-client`."""

    fleet: str
    client_id: str
    sign_seed: bytes
    coordinator: CoordinatorPublic

    @property
    def key_id(self) -> str:
        """The id of the client's public key, as clients.json lists it."""
        return crypto.key_id_of(crypto.ed25519_public(self.sign_seed))

    def save(self, path: Path) -> None:
        write_secret_json(path, {"kind": "fledger.client-bundle", "fleet": self.fleet, "client_id": self.client_id,
                                 "sign_seed": self.sign_seed.hex(), "coordinator": self.coordinator.to_json()})

    @classmethod
    def load(cls, path: Path) -> ClientBundle:
        data = read_json(path)
        if data.get("kind") != "fledger.client-bundle":
            raise KeyFileError(f"{path} is not a prediction client bundle (`fledger keys add-client`)")
        coord = data.get("coordinator")
        if not isinstance(coord, dict):
            raise KeyFileError(f"{path}: coordinator section missing")
        return cls(str(data["fleet"]), str(data["client_id"]), _hex(data, "sign_seed", path),
                   CoordinatorPublic(_hex(coord, "sign_public", path), _hex(coord, "enc_public", path)))


# --- requests -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PendingRequest:
    """What the client keeps until the reply comes: the id and the key to read it."""

    request_id: bytes
    reply_key: bytes
    payload: bytes


@dataclass(frozen=True)
class RequestHeader:
    fleet: str
    client: str
    key_id: str
    request_id: bytes
    created: float
    epk: bytes
    to: str
    iv: bytes
    rows: int
    inputs_sha256: bytes


@dataclass(frozen=True)
class SealedRequest:
    header: RequestHeader
    header_bytes: bytes
    signature: bytes
    ciphertext: bytes
    tag: bytes

    @property
    def digest(self) -> bytes:
        """What the receipt records: SHA-256 of the signed header (which names the inputs' hash)."""
        return hashlib.sha256(self.header_bytes).digest()


def seal_request(bundle: ClientBundle, inputs: np.ndarray, *, now: float | None = None,
                 request_id: bytes | None = None) -> PendingRequest:
    request_id = request_id or crypto.random_bytes(16)
    eph_seed, eph_public = crypto.x25519_generate()
    plaintext = encode_tensors({"x": np.ascontiguousarray(inputs)})
    iv = crypto.random_bytes(crypto.GCM_NONCE_BYTES)
    header_bytes = _pack({
        "fleet": bundle.fleet, "client": bundle.client_id, "key_id": bundle.key_id, "request_id": request_id,
        "created": float(time.time() if now is None else now), "epk": eph_public,
        "to": bundle.coordinator.enc_key_id, "iv": iv, "rows": int(inputs.shape[0]) if inputs.ndim else 0,
        "inputs_sha256": hashlib.sha256(plaintext).digest(),
    })
    key = crypto.x25519_shared_key(eph_seed, bundle.coordinator.enc_public, request_id, REQUEST_KDF)
    ciphertext, tag = crypto.aes_gcm_encrypt(key, iv, plaintext, header_bytes)
    payload = _pack({"fmt": REQUEST_FORMAT, "v": ENVELOPE_VERSION, "hdr": header_bytes,
                     "sig": crypto.ed25519_sign(bundle.sign_seed, REQUEST_CONTEXT + header_bytes),
                     "ct": ciphertext, "tag": tag})
    return PendingRequest(request_id, _reply_key(key, request_id), payload)


def _reply_key(request_key: bytes, request_id: bytes) -> bytes:
    """The reply's AES key: HKDF-SHA256 of the request's key under another context (one X25519
    exchange per request, the costliest step of admission; two keys that cannot be confused)."""
    key = HKDF(request_key, crypto.KEY_BYTES, request_id, SHA256, context=REPLY_KDF)
    assert isinstance(key, bytes)
    return key


def parse_request(data: bytes, *, max_bytes: int) -> SealedRequest:
    """Parse the outer layer and header (bounded); nothing is trusted yet."""
    outer = _unpack_outer(data, REQUEST_FORMAT, max_bytes)
    if len(outer["hdr"]) > 1024:
        raise EnvelopeError("malformed", f"request header of {len(outer['hdr'])} bytes")
    hdr = _header_map(outer["hdr"], "request header", max_map_len=16, max_str_len=256)
    header = RequestHeader(
        fleet=_field(hdr, "fleet", str), client=_field(hdr, "client", str), key_id=_field(hdr, "key_id", str),
        request_id=_field(hdr, "request_id", bytes), created=_field(hdr, "created", float),
        epk=_field(hdr, "epk", bytes), to=_field(hdr, "to", str), iv=_field(hdr, "iv", bytes),
        rows=_field(hdr, "rows", int), inputs_sha256=_field(hdr, "inputs_sha256", bytes),
    )
    if len(header.request_id) != 16 or len(header.epk) != 32 or len(header.inputs_sha256) != 32:
        raise EnvelopeError("malformed", "request_id, epk or inputs_sha256 has the wrong length")
    if len(outer["sig"]) != 64:
        raise EnvelopeError("malformed", "signature must be 64 bytes")
    return SealedRequest(header, outer["hdr"], outer["sig"], outer["ct"], outer["tag"])


def verify_request(sealed: SealedRequest, client_public_key: bytes) -> None:
    if not crypto.ed25519_verify(client_public_key, REQUEST_CONTEXT + sealed.header_bytes, sealed.signature):
        raise EnvelopeError("bad_signature", f"request is not signed by client {sealed.header.client!r}")


def decrypt_request(sealed: SealedRequest, keys: CoordinatorKeys, *, max_bytes: int) -> tuple[np.ndarray, bytes]:
    """The inputs (tensor ``x``) and the key to encrypt the reply with."""
    header = sealed.header
    if header.to != keys.public.enc_key_id:
        raise EnvelopeError("wrong_key", f"request is encrypted to key {header.to}, not ours")
    try:
        key = crypto.x25519_shared_key(keys.enc_seed, header.epk, header.request_id, REQUEST_KDF)
        plaintext = crypto.aes_gcm_decrypt(key, header.iv, sealed.ciphertext, sealed.tag, sealed.header_bytes)
        reply_key = _reply_key(key, header.request_id)
    except crypto.CryptoError as exc:
        raise EnvelopeError("decrypt_failed", str(exc)) from exc
    if hashlib.sha256(plaintext).digest() != header.inputs_sha256:
        raise EnvelopeError("digest_mismatch", "SHA-256 of the inputs differs from the header")
    try:
        tensors = decode_tensors(plaintext, max_bytes=max_bytes)
    except CodecError as exc:
        raise EnvelopeError("malformed", f"inputs: {exc}") from exc
    if list(tensors) != ["x"]:
        raise EnvelopeError("wrong_shape", "inputs must be one tensor named 'x'")
    return tensors["x"], reply_key


# --- replies ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PredictionReply:
    client: str
    request_id: bytes
    status: str
    reason: str = ""
    detail: str = ""
    round: int = 0
    model_sha256: bytes = b""
    fee: int = 0
    balance: int = 0
    output: str = ""  # "values" (regression, original units) or "probabilities" (classification)
    scaler_sha256: bytes = b""  # regression: the standardisers the receipt names (empty: none)
    predictions: np.ndarray | None = None
    receipt: Block | None = None


def seal_refusal(keys: CoordinatorKeys, client: str, request_id: bytes | None, reason: str, detail: str, *,
                 balance: int | None = None, now: float | None = None) -> bytes:
    header = {"fleet": keys.fleet, "client": client, "request_id": request_id or b"", "status": REFUSED,
              "reason": reason, "detail": detail[:300], "created": float(time.time() if now is None else now)}
    if balance is not None:
        header["balance"] = int(balance)
    header_bytes = _pack(header)
    return _pack({"fmt": REPLY_FORMAT, "v": ENVELOPE_VERSION, "hdr": header_bytes,
                  "sig": keys.sign(REPLY_CONTEXT + header_bytes)})


def encode_predictions(predictions: np.ndarray) -> bytes:
    return encode_tensors({"y": np.ascontiguousarray(predictions, dtype=np.float32)})


def seal_answer(keys: CoordinatorKeys, client: str, request_id: bytes, reply_key: bytes, encoded_predictions: bytes,
                *, receipt: Block, balance: int, output: str, now: float | None = None) -> bytes:
    """An answered request: ``encoded_predictions`` (from :func:`encode_predictions`) whose
    digest the ``receipt`` block records."""
    data = receipt.data
    iv = crypto.random_bytes(crypto.GCM_NONCE_BYTES)
    scaler = {"scaler_sha256": data["scaler_sha256"]} if "scaler_sha256" in data else {}
    header_bytes = _pack({
        **scaler,
        "fleet": keys.fleet, "client": client, "request_id": request_id, "status": OK, "reason": "", "detail": "",
        "created": float(time.time() if now is None else now), "round": data["round"],
        "model_sha256": data["model_sha256"], "rows": data["rows"], "fee": data["fee"], "balance": int(balance),
        "output": output, "iv": iv, "reply_sha256": data["reply_sha256"], "receipt_index": receipt.index,
        "receipt_hash": receipt.hash,
    })
    ciphertext, tag = crypto.aes_gcm_encrypt(reply_key, iv, encoded_predictions, header_bytes)
    return _pack({"fmt": REPLY_FORMAT, "v": ENVELOPE_VERSION, "hdr": header_bytes,
                  "sig": keys.sign(REPLY_CONTEXT + header_bytes), "ct": ciphertext, "tag": tag,
                  "block": receipt.to_bytes()})


def _check_receipt(raw: Any, hdr: dict[str, Any], coordinator_sign_public: bytes) -> Block:
    """The receipt block must be genuine (hash, coordinator signature) and record this answer."""
    if not isinstance(raw, bytes):
        raise EnvelopeError("malformed", "answer carries no receipt block")
    try:
        block = Block.from_bytes(raw)
    except ValueError as exc:
        raise EnvelopeError("malformed", f"receipt block: {exc}") from exc
    if block.computed_hash() != block.hash or block.hash != hdr.get("receipt_hash") \
            or block.index != hdr.get("receipt_index"):
        raise EnvelopeError("receipt_mismatch", "the receipt block is not the one the reply names")
    if not crypto.ed25519_verify(coordinator_sign_public, block.hash, block.signature):
        raise EnvelopeError("bad_signature", f"receipt block {block.index} is not signed by the coordinator")
    data = block.data
    for name in ("client", "request_id", "fee", "round", "model_sha256", "reply_sha256", "rows", "scaler_sha256"):
        if data.get(name) != hdr.get(name):
            raise EnvelopeError("receipt_mismatch", f"receipt field {name!r} differs from the reply")
    if data.get("type") != RECEIPT:
        raise EnvelopeError("receipt_mismatch", "the block is not a prediction receipt")
    return block


def open_reply(data: bytes, bundle: ClientBundle, pending: PendingRequest, *, max_bytes: int = 64 << 20
               ) -> PredictionReply:
    """Verify (coordinator signature, request id, receipt) and decrypt a reply to ``pending``."""
    outer = _unpack_outer(data, REPLY_FORMAT, max_bytes, fields=("hdr", "sig"))
    if not crypto.ed25519_verify(bundle.coordinator.sign_public, REPLY_CONTEXT + outer["hdr"], outer["sig"]):
        raise EnvelopeError("bad_signature", "reply is not signed by the fleet's coordinator")
    hdr = msgpack.unpackb(outer["hdr"], raw=False)
    if not isinstance(hdr, dict):
        raise EnvelopeError("malformed", "reply header is not a map")
    if hdr.get("fleet") != bundle.fleet or hdr.get("client") != bundle.client_id:
        raise EnvelopeError("wrong_recipient", "reply for another fleet or client")
    if hdr.get("request_id") != pending.request_id:
        raise EnvelopeError("wrong_request", "reply to another request")
    status = _field(hdr, "status", str)
    if status != OK:
        return PredictionReply(bundle.client_id, pending.request_id, status, str(hdr.get("reason", "")),
                               str(hdr.get("detail", "")), balance=int(hdr.get("balance", 0)))
    receipt = _check_receipt(outer.get("block"), hdr, bundle.coordinator.sign_public)
    try:
        plaintext = crypto.aes_gcm_decrypt(pending.reply_key, _field(hdr, "iv", bytes), _field(outer, "ct", bytes),
                                           _field(outer, "tag", bytes), outer["hdr"])
    except crypto.CryptoError as exc:
        raise EnvelopeError("decrypt_failed", str(exc)) from exc
    if hashlib.sha256(plaintext).digest() != hdr["reply_sha256"]:
        raise EnvelopeError("digest_mismatch", "predictions differ from the digest the receipt records")
    predictions = decode_tensors(plaintext)["y"]
    return PredictionReply(bundle.client_id, pending.request_id, OK, round=_field(hdr, "round", int),
                           model_sha256=_field(hdr, "model_sha256", bytes), fee=_field(hdr, "fee", int),
                           balance=_field(hdr, "balance", int), output=_field(hdr, "output", str),
                           predictions=predictions, receipt=receipt, scaler_sha256=bytes(hdr.get("scaler_sha256", b"")))


# --- the owner's orders -------------------------------------------------------------------------


def seal_order(keys: CoordinatorKeys, action: str, amount: int, client: str | None = None, *,
               now: float | None = None) -> tuple[bytes, bytes]:
    """(order id, message) for a deposit to ``client`` or a withdrawal, signed with the owner key."""
    if type(amount) is not int or amount < 1:
        raise ValueError(f"amount must be a positive integer (smallest unit), not {amount!r}")
    order_id = crypto.random_bytes(16)
    fields: dict[str, Any] = {"fleet": keys.fleet, "action": action, "amount": amount, "order_id": order_id,
                              "created": float(time.time() if now is None else now)}
    if client is not None:
        fields["client"] = check_name("client id", client)
    order = canonical.encode(fields)
    decode_order(order)  # the same rules the coordinator and every verifier apply
    return order_id, _pack({"fmt": ORDER_FORMAT, "v": ENVELOPE_VERSION, "order": order,
                            "sig": keys.sign(ORDER_CONTEXT + order)})


def open_order(data: bytes, owner_public: bytes, *, fleet: str) -> tuple[bytes, bytes, dict[str, Any]]:
    """(order bytes, signature, fields) of an owner's order; EnvelopeError unless the owner signed it."""
    outer = _unpack_outer(data, ORDER_FORMAT, MAX_ORDER_BYTES, fields=("order", "sig"))
    try:
        fields = decode_order(outer["order"])
    except ValueError as exc:
        raise EnvelopeError("malformed", str(exc)) from exc
    if not crypto.ed25519_verify(owner_public, ORDER_CONTEXT + outer["order"], outer["sig"]):
        raise EnvelopeError("bad_signature", "the order is not signed by the owner key")
    if fields["fleet"] != fleet:
        raise EnvelopeError("wrong_fleet", f"order for fleet {fields['fleet']!r}")
    return outer["order"], outer["sig"], fields


def seal_order_reply(keys: CoordinatorKeys, body: dict[str, Any]) -> bytes:
    return _seal_signed_json(keys, ORDER_REPLY_CONTEXT, "credits", body)


def open_order_reply(data: bytes, coordinator_sign_public: bytes) -> dict[str, Any]:
    return _open_signed_json(data, coordinator_sign_public, ORDER_REPLY_CONTEXT, "credits")
