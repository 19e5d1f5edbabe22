"""The fleet's record types: constructors and the rules each record must follow (see docs/ledger.md).

The ledger stores any dict with a str ``"type"``; what the types below mean, and which may
follow which, is read in one place: :class:`federation.fleet_state.FleetState`, the fold of
the chain that verifiers, the coordinator, agents, ``predict`` and credits all use. The
pay-per-prediction records are in :mod:`federation.credits`.
"""

from __future__ import annotations

import math
from typing import Any

import msgpack

from ledger import canonical
from ledger.genesis import GENESIS, genesis
from ledger.keys import key_id_of

__all__ = ["AGGREGATE", "DATASET", "DEVICE_KEY", "DEVICE_KEY_REVOKED", "GENESIS", "MODEL_PUBLISHED", "ROUND_OPENED",
           "STATEMENT_FIELDS", "UPDATE", "UPDATE_REJECTED", "aggregate", "dataset", "decode_statement", "describe",
           "device_key", "device_key_revoked", "genesis", "model_published", "round_opened", "statement", "update",
           "update_leaf", "update_rejected"]
DEVICE_KEY = "device.key"
DEVICE_KEY_REVOKED = "device.key_revoked"
DATASET = "dataset"
UPDATE = "update"
UPDATE_REJECTED = "update.rejected"
ROUND_OPENED = "round.opened"
MODEL_PUBLISHED = "model.published"
AGGREGATE = "aggregate"

STATEMENT_FIELDS = ("fleet", "device", "round", "key_id", "msg_id", "weights_sha256", "num_samples", "metrics")
"""Fields a device statement must contain; those shared with the update record must be equal."""


def device_key(device: str, public_key: bytes, **extra: Any) -> dict[str, Any]:
    if len(public_key) != 32:
        raise ValueError("a raw Ed25519 public key is 32 bytes")
    return {**extra, "type": DEVICE_KEY, "device": device, "key_id": key_id_of(public_key),
            "public_key": bytes(public_key)}


def device_key_revoked(device: str, key_id: str, reason: str, **extra: Any) -> dict[str, Any]:
    return {**extra, "type": DEVICE_KEY_REVOKED, "device": device, "key_id": key_id, "reason": reason}


def dataset(device: str, sha256: bytes, size: int, schema: Any, **extra: Any) -> dict[str, Any]:
    if len(sha256) != 32:
        raise ValueError("sha256 must be the 32-byte digest")
    return {**extra, "type": DATASET, "device": device, "sha256": bytes(sha256), "size": int(size), "schema": schema}


def statement(fleet: str, device: str, round: int, key_id: str, msg_id: bytes, weights_sha256: bytes,
              num_samples: int, metrics: dict[str, float], **extra: Any) -> bytes:
    """The bytes a device signs for an update (canonical msgpack map)."""
    return canonical.encode({**extra, "fleet": fleet, "device": device, "round": int(round), "key_id": key_id,
                             "msg_id": msg_id, "weights_sha256": weights_sha256, "num_samples": int(num_samples),
                             "metrics": {k: float(v) for k, v in metrics.items()}})


def update(statement: bytes, device_sig: bytes, **extra: Any) -> dict[str, Any]:
    """An accepted update record; the copied fields are taken from the signed statement."""
    fields = decode_statement(statement)
    return {**extra, "type": UPDATE, "device": fields["device"], "round": fields["round"],
            "key_id": fields["key_id"], "statement": bytes(statement), "device_sig": bytes(device_sig),
            "weights_sha256": fields["weights_sha256"], "num_samples": fields["num_samples"],
            "metrics": fields["metrics"]}


def update_rejected(device: str, round: int | None, reason: str, digest: bytes, **extra: Any) -> dict[str, Any]:
    return {**extra, "type": UPDATE_REJECTED, "device": device, "round": round, "reason": reason,
            "digest": bytes(digest)}


def round_opened(round: int, **extra: Any) -> dict[str, Any]:
    return {**extra, "type": ROUND_OPENED, "round": int(round)}


def model_published(round: int, model_sha256: bytes, **extra: Any) -> dict[str, Any]:
    return {**extra, "type": MODEL_PUBLISHED, "round": int(round), "model_sha256": bytes(model_sha256)}


def aggregate(round: int, participants: list[str], model_sha256: bytes, strategy: str,
              metrics: dict[str, Any], *, merkle_root: bytes, **extra: Any) -> dict[str, Any]:
    """An aggregation record. ``merkle_root``: the root over the round's accepted updates, in the
    order they were accepted (:meth:`federation.fleet_state.FleetState.merkle_root_for`)."""
    return {**extra, "type": AGGREGATE, "round": int(round), "participants": list(participants),
            "model_sha256": bytes(model_sha256), "strategy": strategy, "metrics": metrics,
            "merkle_root": bytes(merkle_root)}


def describe(data: dict[str, Any]) -> str:
    """One line saying what a record records (the dashboard's list of recent blocks)."""
    kind = data.get("type")
    device = data.get("device")
    if kind == UPDATE:
        return f"{device}: update for round {data.get('round')} ({data.get('num_samples')} samples)"
    if kind == UPDATE_REJECTED:
        return f"{device}: update rejected ({data.get('reason')})"
    if kind == AGGREGATE:
        return f"round {data.get('round')} aggregated from {len(data.get('participants') or ())} devices"
    if kind == ROUND_OPENED:
        return f"round {data.get('round')} opened"
    if kind == MODEL_PUBLISHED:
        return f"model for round {data.get('round')} published" + (" (initial)" if data.get("initial") else "")
    if kind == DATASET:
        return f"{device}: data set registered ({data.get('size')} bytes)"
    if kind == DEVICE_KEY:
        return f"{device}: key {data.get('key_id')} registered"
    if kind == DEVICE_KEY_REVOKED:
        return f"{device}: key {data.get('key_id')} revoked"
    if kind == GENESIS:
        return f"fleet {data.get('fleet')} founded"
    return str(kind)


def staleness_weight(staleness: int) -> float:
    """FedBuff's weight of an update trained ``staleness`` model versions ago: 1/sqrt(1+s)
    (Nguyen et al. 2022). The coordinator scales the delta by it; the rule recomputes it."""
    return 1.0 / math.sqrt(1.0 + staleness)


def update_leaf(statement: bytes, device_sig: bytes) -> bytes:
    """Merkle leaf data of an accepted update: canonical msgpack of [statement, device_sig]."""
    return canonical.pack_normalized([bytes(statement), bytes(device_sig)])


def decode_statement(statement: bytes) -> dict[str, Any]:
    """Decode a device statement (any msgpack map with the fields of :data:`STATEMENT_FIELDS`)."""
    try:
        fields = msgpack.unpackb(statement, raw=False, strict_map_key=True)
    except Exception as exc:
        raise ValueError(f"statement is not msgpack: {type(exc).__name__}") from exc
    if not isinstance(fields, dict):
        raise ValueError("statement is not a map")
    missing = [name for name in STATEMENT_FIELDS if name not in fields]
    if missing:
        raise ValueError(f"statement lacks {', '.join(missing)}")
    return fields

