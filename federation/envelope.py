"""Signed, encrypted envelopes: device updates (v2) and global models (v1); docs/protocol.md.

Update (device -> coordinator), msgpack map::

    {"fmt": "fledger.update", "v": 2, "hdr": <bytes>, "sig": <64 B>, "ct": <bytes>, "tag": <16 B>}

``hdr`` is a msgpack map (the *statement*): fleet, device, round (the model version the update
trains from), key_id, msg_id (16 random bytes), epk (the device's ephemeral X25519 public key),
to (coordinator key id), iv, weights_sha256 (of the encoded delta), num_samples, metrics, codec,
created, dataset_sha256, base_sha256 (the model the delta is against). The ciphertext is the
delta ``local - base`` (:mod:`federation.deltas`). ``sig`` is the device's Ed25519
signature over ``hdr``; the AES-256-GCM key comes from X25519(epk, coordinator) + HKDF with
msg_id as salt, and ``hdr`` is the associated data, so no header field can be swapped.

Global model (coordinator -> devices, retained): the same shape with ``fmt`` =
``fledger.model``, the header naming fleet, round, model_sha256, block_hash, block_index,
done, and the fleet model key id; encrypted with the fleet model key, signed by the coordinator.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass, field
from typing import Any

import msgpack

from federation import crypto
from federation.fleet_state import model_named_by
from federation.keys import CoordinatorKeys, DeviceBundle
from ledger import canonical
from ledger.block import Block  # the ledger is a pure library: devices check model blocks with it

ENVELOPE_VERSION = 1  # models, registrations, presence
UPDATE_VERSION = 2  # v2: the ciphertext is a delta against the model named by ``base_sha256``
READABLE_UPDATE_VERSIONS = (1, UPDATE_VERSION)  # v1 is parsed only to refuse it by name
UPDATE_FORMAT = "fledger.update"
MODEL_FORMAT = "fledger.model"
UPDATE_KDF_CONTEXT = b"fledger/update/v1"


class EnvelopeError(ValueError):
    """An envelope is malformed, forged, tampered with or not for us.

    ``reason`` is a short stable label used for counting rejections."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class UpdateHeader:
    fleet: str
    device: str
    round: int
    key_id: str
    msg_id: bytes
    epk: bytes
    to: str
    iv: bytes
    weights_sha256: bytes
    num_samples: int
    metrics: dict[str, float]
    codec: int
    created: float
    dataset_sha256: bytes
    base_sha256: bytes = b""  # v2: SHA-256 of the model (of version ``round``) the delta is against


@dataclass(frozen=True)
class SealedUpdate:
    """An update whose outer layer was parsed but not yet verified or decrypted."""

    header: UpdateHeader
    header_bytes: bytes  # the signed statement, recorded in the ledger verbatim
    signature: bytes
    ciphertext: bytes
    tag: bytes
    version: int = UPDATE_VERSION  # of the envelope: only v2 is accepted (a v1 one is refused by name)


@dataclass(frozen=True)
class ModelHeader:
    fleet: str
    round: int
    model_sha256: bytes
    block_hash: bytes
    block_index: int
    done: bool
    key_id: str
    model_key_id: str
    iv: bytes
    created: float
    info: dict[str, Any]
    # The verified ledger block the model travels with (an aggregate names who was left out and why).
    block_data: dict[str, Any] = field(default_factory=dict)


MAX_HEADER_BYTES = 4096


def _pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def _unpack_outer(data: bytes, fmt: str, max_bytes: int,
                  fields: tuple[str, ...] = ("hdr", "sig", "ct", "tag"),
                  versions: tuple[int, ...] = (ENVELOPE_VERSION,)) -> dict[str, Any]:
    if len(data) > max_bytes:
        raise EnvelopeError("oversized", f"{len(data)} bytes exceeds the limit of {max_bytes}")
    try:
        outer = msgpack.unpackb(data, raw=False, max_map_len=16, max_str_len=256)
    except Exception as exc:
        raise EnvelopeError("malformed", f"not msgpack: {type(exc).__name__}") from exc
    if not isinstance(outer, dict) or outer.get("fmt") != fmt:
        raise EnvelopeError("malformed", f"not a {fmt} envelope")
    if outer.get("v") not in versions or isinstance(outer.get("v"), bool):
        raise EnvelopeError("unsupported_version", f"{fmt} envelope version {outer.get('v')!r}; this peer "
                                                   f"reads {', '.join(map(str, versions))}")
    for name in fields:
        if not isinstance(outer.get(name), bytes):
            raise EnvelopeError("malformed", f"field {name!r} missing or not bytes")
    return outer


def _header_map(header_bytes: bytes, what: str, **limits: int) -> dict[str, Any]:
    """A header's msgpack map (``limits`` bound what unpacking may allocate), or a ``malformed``
    EnvelopeError naming ``what``."""
    try:
        hdr = msgpack.unpackb(header_bytes, raw=False, **limits)
    except Exception as exc:
        raise EnvelopeError("malformed", f"{what} is not msgpack: {type(exc).__name__}") from exc
    if not isinstance(hdr, dict):
        raise EnvelopeError("malformed", f"{what} is not a map")
    return hdr


def _field(hdr: dict[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    value = hdr.get(name)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise EnvelopeError("malformed", f"header field {name!r} missing or of the wrong type")
    return value


METRIC_LIMIT = 1e30
"""Largest magnitude of a metric in an update: the coordinator refuses larger or non-finite ones
(sums and weighted means of them must stay finite in the ledger); an agent whose own metrics
exceed it treats its training as diverged and skips the round instead of sending."""


def seal_update(
    bundle: DeviceBundle, round_number: int, delta: bytes, num_samples: int,
    metrics: dict[str, float], *, dataset_sha256: bytes, base_sha256: bytes, now: float | None = None,
) -> bytes:
    """Encrypt and sign an encoded delta (``local - base``, :func:`federation.deltas.delta`, encoded
    with :func:`federation.codec.encode_tensors`) against the model of version ``round_number``
    whose SHA-256 is ``base_sha256``."""
    if len(base_sha256) != 32:
        raise ValueError("base_sha256 must be the 32-byte SHA-256 of the base model")
    eph_seed, eph_public = crypto.x25519_generate()
    msg_id = crypto.random_bytes(16)
    iv = crypto.random_bytes(crypto.GCM_NONCE_BYTES)
    header = {
        "fleet": bundle.fleet, "device": bundle.device_id, "round": int(round_number),
        "key_id": bundle.key_id, "msg_id": msg_id, "epk": eph_public,
        "to": bundle.coordinator.enc_key_id, "iv": iv,
        "weights_sha256": hashlib.sha256(delta).digest(), "num_samples": int(num_samples),
        "metrics": {k: float(v) for k, v in sorted(metrics.items())}, "codec": 1,
        "created": float(time.time() if now is None else now), "dataset_sha256": dataset_sha256,
        "base_sha256": bytes(base_sha256),
    }
    header_bytes = _pack(header)
    key = crypto.x25519_shared_key(eph_seed, bundle.coordinator.enc_public, msg_id, UPDATE_KDF_CONTEXT)
    ciphertext, tag = crypto.aes_gcm_encrypt(key, iv, delta, header_bytes)
    return _pack({
        "fmt": UPDATE_FORMAT, "v": UPDATE_VERSION, "hdr": header_bytes,
        "sig": bundle.sign(header_bytes), "ct": ciphertext, "tag": tag,
    })


def parse_update(data: bytes, *, max_bytes: int) -> SealedUpdate:
    """Parse the outer layer and header; no key is needed and nothing is trusted yet.

    A v1 envelope (full weights, no base) is parsed too, so that the coordinator can authenticate
    its sender and refuse it by name (``unsupported_version``) in the device's acknowledgement."""
    outer = _unpack_outer(data, UPDATE_FORMAT, max_bytes, versions=READABLE_UPDATE_VERSIONS)
    version = outer["v"]
    header_bytes = outer["hdr"]
    if len(header_bytes) > MAX_HEADER_BYTES:
        # The header is recorded in the ledger verbatim: its size must not be the sender's choice.
        raise EnvelopeError("malformed", f"header of {len(header_bytes)} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        hdr = msgpack.unpackb(header_bytes, raw=False, max_map_len=32, max_str_len=256)
    except Exception as exc:
        raise EnvelopeError("malformed", "header is not msgpack") from exc
    if not isinstance(hdr, dict):
        raise EnvelopeError("malformed", "header is not a map")
    unknown = set(hdr) - {f.name for f in dataclasses.fields(UpdateHeader)}
    if unknown:
        raise EnvelopeError("malformed", f"unknown header fields {sorted(map(str, unknown))}")
    metrics = _field(hdr, "metrics", dict)
    if not all(isinstance(k, str) and isinstance(v, float) for k, v in metrics.items()):
        raise EnvelopeError("malformed", "metrics must map names to floats")
    header = UpdateHeader(
        fleet=_field(hdr, "fleet", str), device=_field(hdr, "device", str),
        round=_field(hdr, "round", int), key_id=_field(hdr, "key_id", str),
        msg_id=_field(hdr, "msg_id", bytes), epk=_field(hdr, "epk", bytes),
        to=_field(hdr, "to", str), iv=_field(hdr, "iv", bytes),
        weights_sha256=_field(hdr, "weights_sha256", bytes),
        num_samples=_field(hdr, "num_samples", int), metrics=metrics,
        codec=_field(hdr, "codec", int), created=_field(hdr, "created", float),
        dataset_sha256=_field(hdr, "dataset_sha256", bytes),
        base_sha256=_field(hdr, "base_sha256", bytes) if version >= 2 else b"",
    )
    if version >= 2 and len(header.base_sha256) != 32:
        raise EnvelopeError("malformed", "base_sha256 must be 32 bytes")
    if version < 2 and "base_sha256" in hdr:
        raise EnvelopeError("malformed", "a v1 header has no base_sha256")
    if len(header.msg_id) != 16 or len(header.weights_sha256) != 32 or len(header.epk) != 32:
        raise EnvelopeError("malformed", "msg_id, epk or weights_sha256 has the wrong length")
    if len(outer["sig"]) != 64:
        raise EnvelopeError("malformed", "signature must be 64 bytes")
    return SealedUpdate(header, header_bytes, outer["sig"], outer["ct"], outer["tag"], version)


def verify_update_signature(sealed: SealedUpdate, device_public_key: bytes) -> None:
    if not crypto.ed25519_verify(device_public_key, sealed.header_bytes, sealed.signature):
        raise EnvelopeError("bad_signature", f"signature of device {sealed.header.device!r} does not verify")


def decrypt_update(sealed: SealedUpdate, keys: CoordinatorKeys) -> bytes:
    """Decrypt and check the digest; return the encoded tensors (a delta, in a v2 envelope)."""
    header = sealed.header
    if header.to != keys.public.enc_key_id:
        raise EnvelopeError("wrong_key", f"update is encrypted to key {header.to}, not ours")
    try:
        key = crypto.x25519_shared_key(keys.enc_seed, header.epk, header.msg_id, UPDATE_KDF_CONTEXT)
        weights = crypto.aes_gcm_decrypt(key, header.iv, sealed.ciphertext, sealed.tag, sealed.header_bytes)
    except crypto.CryptoError as exc:
        raise EnvelopeError("decrypt_failed", str(exc)) from exc
    if hashlib.sha256(weights).digest() != header.weights_sha256:
        raise EnvelopeError("digest_mismatch", "SHA-256 of the weights differs from the header")
    return weights


# --- global model ----------------------------------------------------------------------------


def seal_model(
    keys: CoordinatorKeys, round_number: int, weights: bytes, *, block: bytes,
    done: bool = False, info: dict[str, Any] | None = None, now: float | None = None,
) -> bytes:
    """``block`` is the coordinator-signed ledger block that produced this model (the round's
    aggregate, or the initial model.published); it travels with the model so a device checks the
    model against the ledger without having to follow it."""
    ledger_block = Block.from_bytes(block)
    block_hash, block_index = ledger_block.hash, ledger_block.index
    iv = crypto.random_bytes(crypto.GCM_NONCE_BYTES)
    header_bytes = _pack({
        "fleet": keys.fleet, "round": int(round_number),
        "model_sha256": hashlib.sha256(weights).digest(), "block_hash": block_hash,
        "block_index": int(block_index), "done": bool(done), "key_id": keys.public.sign_key_id,
        "model_key_id": keys.model_key_id, "iv": iv,
        "created": float(time.time() if now is None else now), "info": info or {},
    })
    ciphertext, tag = crypto.aes_gcm_encrypt(keys.model_key, iv, weights, header_bytes)
    return _pack({
        "fmt": MODEL_FORMAT, "v": ENVELOPE_VERSION, "hdr": header_bytes,
        "sig": keys.sign(header_bytes), "ct": ciphertext, "tag": tag, "block": block,
    })


def _check_model_block(raw: Any, header: ModelHeader, coordinator_sign_public: bytes) -> Block:
    """The named ledger block must be genuine (its hash, the coordinator's signature) and record
    exactly this model: its hash and round."""
    if not isinstance(raw, bytes):
        raise EnvelopeError("malformed", "global model carries no ledger block")
    try:
        block = Block.from_bytes(raw)
    except ValueError as exc:
        raise EnvelopeError("malformed", f"ledger block: {exc}") from exc
    if block.computed_hash() != block.hash or block.hash != header.block_hash or block.index != header.block_index:
        raise EnvelopeError("ledger_mismatch", "the ledger block does not match the hash the model names")
    if not crypto.ed25519_verify(coordinator_sign_public, block.hash, block.signature):
        raise EnvelopeError("bad_signature", f"ledger block {block.index} is not signed by the coordinator")
    if model_named_by(block.data) != (header.round, header.model_sha256):  # the fleet's one reading of it
        raise EnvelopeError("ledger_mismatch", f"ledger block {block.index} records another model or round")
    return block


def open_model(data: bytes, bundle: DeviceBundle, *, max_bytes: int) -> tuple[ModelHeader, bytes]:
    """Verify the coordinator's signature, decrypt, and check the model digest."""
    return _open_model(data, fleet=bundle.fleet, coordinator_sign_public=bundle.coordinator.sign_public,
                       model_key_id=bundle.model_key_id, model_key=bundle.model_key, max_bytes=max_bytes)


def open_own_model(data: bytes, keys: CoordinatorKeys, *, max_bytes: int) -> tuple[ModelHeader, bytes]:
    """The checks of :func:`open_model`, with the coordinator's own key file: reading back a model
    it published (``fledger ledger restore --from-broker``)."""
    return _open_model(data, fleet=keys.fleet, coordinator_sign_public=keys.public.sign_public,
                       model_key_id=keys.model_key_id, model_key=keys.model_key, max_bytes=max_bytes)


def _open_model(data: bytes, *, fleet: str, coordinator_sign_public: bytes, model_key_id: str, model_key: bytes,
                max_bytes: int) -> tuple[ModelHeader, bytes]:
    outer = _unpack_outer(data, MODEL_FORMAT, max_bytes)
    header_bytes = outer["hdr"]
    if not crypto.ed25519_verify(coordinator_sign_public, header_bytes, outer["sig"]):
        raise EnvelopeError("bad_signature", "global model is not signed by the fleet's coordinator")
    hdr = _header_map(header_bytes, "model header")
    header = ModelHeader(
        fleet=_field(hdr, "fleet", str), round=_field(hdr, "round", int),
        model_sha256=_field(hdr, "model_sha256", bytes), block_hash=_field(hdr, "block_hash", bytes),
        block_index=_field(hdr, "block_index", int), done=_field(hdr, "done", bool),
        key_id=_field(hdr, "key_id", str), model_key_id=_field(hdr, "model_key_id", str),
        iv=_field(hdr, "iv", bytes), created=_field(hdr, "created", float),
        info=_field(hdr, "info", dict),
    )
    if header.fleet != fleet:
        raise EnvelopeError("wrong_fleet", f"model is for fleet {header.fleet!r}")
    block = _check_model_block(outer.get("block"), header, coordinator_sign_public)
    header = dataclasses.replace(header, block_data=block.data)
    if header.model_key_id != model_key_id:
        raise EnvelopeError(
            "wrong_key", f"model encrypted with key {header.model_key_id}, we hold {model_key_id}"
        )
    try:
        weights = crypto.aes_gcm_decrypt(model_key, header.iv, outer["ct"], outer["tag"], header_bytes)
    except crypto.CryptoError as exc:
        raise EnvelopeError("decrypt_failed", str(exc)) from exc
    if hashlib.sha256(weights).digest() != header.model_sha256:
        raise EnvelopeError("digest_mismatch", "model digest differs from its signed header")
    return header, weights


# --- status and acknowledgements -------------------------------------------------------------
# JSON so that operators can read them with any MQTT tool; signed because their readers act on
# them. The fleet status is for the operator and monitors; each device gets its own
# acknowledgement (an agent drops an update from its outbox once its acknowledgement lists the
# update as accepted). Each kind has its own signing context: one cannot pass for the other.

STATUS_CONTEXT = b"fledger/status/v1\n"
ACK_CONTEXT = b"fledger/ack/v1\n"
MAX_SIGNED_JSON_BYTES = 1 << 20


def _json_bytes(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def _seal_signed_json(keys: CoordinatorKeys, context: bytes, field: str, body: dict[str, Any]) -> bytes:
    signature = keys.sign(context + _json_bytes(body))
    return json.dumps({field: body, "key_id": keys.public.sign_key_id, "sig": signature.hex()},
                      sort_keys=True).encode()


def _open_signed_json(data: bytes, coordinator_sign_public: bytes, context: bytes, field: str) -> dict[str, Any]:
    if len(data) > MAX_SIGNED_JSON_BYTES:
        raise EnvelopeError("oversized", f"{field} message of {len(data)} bytes")
    try:
        message = json.loads(data)
        body, signature = message[field], bytes.fromhex(message["sig"])
    except (ValueError, KeyError, TypeError) as exc:
        raise EnvelopeError("malformed", f"not a signed {field} message") from exc
    if not isinstance(body, dict) or not crypto.ed25519_verify(
            coordinator_sign_public, context + _json_bytes(body), signature):
        raise EnvelopeError("bad_signature", f"{field} is not signed by the fleet's coordinator")
    return body


def seal_status(keys: CoordinatorKeys, body: dict[str, Any]) -> bytes:
    return _seal_signed_json(keys, STATUS_CONTEXT, "status", body)


def open_status(data: bytes, coordinator_sign_public: bytes) -> dict[str, Any]:
    """The status body if the coordinator signed it; EnvelopeError otherwise."""
    return _open_signed_json(data, coordinator_sign_public, STATUS_CONTEXT, "status")


def seal_ack(keys: CoordinatorKeys, body: dict[str, Any]) -> bytes:
    return _seal_signed_json(keys, ACK_CONTEXT, "ack", body)


def open_ack(data: bytes, coordinator_sign_public: bytes, *, fleet: str, device: str) -> dict[str, Any]:
    """A device's acknowledgement body if the coordinator signed it for this fleet and device."""
    body = _open_signed_json(data, coordinator_sign_public, ACK_CONTEXT, "ack")
    if body.get("fleet") != fleet or body.get("device") != device:
        raise EnvelopeError("wrong_recipient", f"acknowledgement for {body.get('device')!r} of fleet "
                                               f"{body.get('fleet')!r}")
    return body


# --- dataset registration ---------------------------------------------------------------------
# A device states, signed, which data set it trains on (SHA-256, size, schema) before its first
# update; the coordinator records the statement in the ledger. Nothing secret: no encryption.

DATASET_FORMAT = "fledger.dataset"


@dataclass(frozen=True)
class DatasetStatement:
    fleet: str
    device: str
    key_id: str
    sha256: bytes
    size: int
    schema: dict[str, Any]
    statement: bytes
    signature: bytes
    created: float
    msg_id: bytes


def seal_dataset(bundle: DeviceBundle, sha256: bytes, size: int, schema: dict[str, Any],
                 *, now: float | None = None) -> bytes:
    header_bytes = _pack({
        "fleet": bundle.fleet, "device": bundle.device_id, "key_id": bundle.key_id,
        "msg_id": crypto.random_bytes(16), "sha256": sha256, "size": int(size), "schema": schema,
        "created": float(time.time() if now is None else now),
    })
    return _pack({"fmt": DATASET_FORMAT, "v": ENVELOPE_VERSION, "hdr": header_bytes,
                  "sig": bundle.sign(header_bytes)})


def open_dataset(data: bytes, public_key_of: Any, *, max_bytes: int = 64 * 1024) -> DatasetStatement:
    """Parse and verify a registration; ``public_key_of(device, key_id)`` gives the device's key or None."""
    outer = _unpack_outer(data, DATASET_FORMAT, max_bytes, fields=("hdr", "sig"))
    if len(outer["hdr"]) > MAX_HEADER_BYTES:
        raise EnvelopeError("malformed", f"registration of {len(outer['hdr'])} bytes exceeds {MAX_HEADER_BYTES}")
    hdr = _header_map(outer["hdr"], "registration header")
    statement = DatasetStatement(
        fleet=_field(hdr, "fleet", str), device=_field(hdr, "device", str), key_id=_field(hdr, "key_id", str),
        sha256=_field(hdr, "sha256", bytes), size=_field(hdr, "size", int), schema=_field(hdr, "schema", dict),
        statement=outer["hdr"], signature=_field(outer, "sig", bytes), created=_field(hdr, "created", float),
        msg_id=_field(hdr, "msg_id", bytes),
    )
    try:
        canonical.normalize(statement.schema)  # it goes into a ledger block: no NaN, no odd types
    except ValueError as exc:
        raise EnvelopeError("malformed", f"schema: {exc}") from exc
    public_key = public_key_of(statement.device, statement.key_id)
    if public_key is None:
        raise EnvelopeError("unknown_key", f"device {statement.device!r} key {statement.key_id!r}")
    if not crypto.ed25519_verify(public_key, statement.statement, statement.signature):
        raise EnvelopeError("bad_signature", f"registration of {statement.device!r} is not signed by it")
    if len(statement.sha256) != 32 or statement.size < 0:
        raise EnvelopeError("malformed", "bad dataset digest or size")
    return statement


# --- presence ---------------------------------------------------------------------------------
# Heartbeats and the Last Will, signed by the device so that a leaked broker password (or a
# broker without ACLs) cannot mark a device online or offline. Freshness without trusting the
# device's clock for ordering: a random session id per process, its start time (orders
# sessions) and a counter within the session.

PRESENCE_FORMAT = "fledger.presence"
PRESENCE_CONTEXT = b"fledger/presence/v1\n"  # the device key also signs updates: keep them apart
MAX_PRESENCE_BYTES = 1024
PRESENCE_STATES = ("online", "offline")


@dataclass(frozen=True)
class PresenceStatement:
    fleet: str
    device: str
    key_id: str
    state: str
    session: bytes
    started: float
    seq: int
    round: int | None


def seal_presence(bundle: DeviceBundle, state: str, *, session: bytes, started: float, seq: int,
                  round_number: int | None = None) -> bytes:
    if state not in PRESENCE_STATES:
        raise ValueError(f"presence state must be one of {PRESENCE_STATES}, not {state!r}")
    header_bytes = _pack({
        "fleet": bundle.fleet, "device": bundle.device_id, "key_id": bundle.key_id, "state": state,
        "session": bytes(session), "started": float(started), "seq": int(seq), "round": round_number,
    })
    return _pack({"fmt": PRESENCE_FORMAT, "v": ENVELOPE_VERSION, "hdr": header_bytes,
                  "sig": bundle.sign(PRESENCE_CONTEXT + header_bytes)})


def open_presence(data: bytes, public_key_of: Any, *, fleet: str,
                  max_bytes: int = MAX_PRESENCE_BYTES) -> PresenceStatement:
    """Parse and verify a heartbeat or Last Will; ``public_key_of(device, key_id)`` gives the
    device's active key or None. Ordering (stale sessions, replays) is the caller's."""
    outer = _unpack_outer(data, PRESENCE_FORMAT, max_bytes, fields=("hdr", "sig"))
    hdr = _header_map(outer["hdr"], "presence header", max_map_len=16)
    round_number = hdr.get("round")
    if round_number is not None and (not isinstance(round_number, int) or isinstance(round_number, bool)):
        raise EnvelopeError("malformed", "presence round is not an integer")
    statement = PresenceStatement(
        fleet=_field(hdr, "fleet", str), device=_field(hdr, "device", str), key_id=_field(hdr, "key_id", str),
        state=_field(hdr, "state", str), session=_field(hdr, "session", bytes),
        started=_field(hdr, "started", float), seq=_field(hdr, "seq", int), round=round_number,
    )
    if statement.state not in PRESENCE_STATES or len(statement.session) != 16:
        raise EnvelopeError("malformed", "bad presence state or session id")
    if statement.fleet != fleet:
        raise EnvelopeError("wrong_fleet", f"presence for fleet {statement.fleet!r}")
    public_key = public_key_of(statement.device, statement.key_id)
    if public_key is None:
        raise EnvelopeError("unknown_key", f"device {statement.device!r} key {statement.key_id!r}")
    if not crypto.ed25519_verify(public_key, PRESENCE_CONTEXT + outer["hdr"], outer["sig"]):
        raise EnvelopeError("bad_signature", f"presence of {statement.device!r} is not signed by it")
    return statement
