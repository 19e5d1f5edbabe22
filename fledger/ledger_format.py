"""Human and machine output for ``fledger ledger show``: any record, with a shorter line for
the fleet's updates and aggregates (moved out of ledger/, which does not read records)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from ledger.block import Block


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def block_to_json_dict(block: Block) -> dict[str, Any]:
    """A block as JSON-ready values (bytes as hex; a statement is decoded alongside), with its exact
    encodings: ``body_hex`` (the canonical bytes its hash is SHA-256 of) and ``wire_hex``
    (:meth:`Block.to_bytes`, as on the MQTT topic and in the file's frames). The decoded fields
    are a convenience; the bytes are what verifies."""
    out = _jsonable(block.to_dict())
    out["body_hex"] = block.body.hex()
    out["wire_hex"] = block.to_bytes().hex()
    statement = block.data.get("statement")
    if block.type == "update" and isinstance(statement, bytes):
        try:
            import msgpack

            out["data"]["statement_decoded"] = _jsonable(msgpack.unpackb(statement, raw=False))
        except Exception:
            pass
    return out


def to_json(blocks: Iterable[Block], *, indent: int | None = 2) -> str:
    return json.dumps([block_to_json_dict(b) for b in blocks], indent=indent, sort_keys=False)


def summary(block: Block) -> str:
    """One-line description of a record."""
    d = block.data
    kind = block.type
    if kind == "genesis":
        ck = d.get("coordinator_key") or {}
        return f"fleet={d.get('fleet')} coordinator={ck.get('key_id')} difficulty={d.get('difficulty')}"
    if kind == "update":
        metrics = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in (d.get("metrics") or {}).items())
        return f"round={d.get('round')} device={d.get('device')} n={d.get('num_samples')} {metrics}".rstrip()
    if kind == "aggregate":
        root = d.get("merkle_root")
        left_out = "".join(f" {name}={','.join(map(str, d[name]))}" for name in ("excluded", "clipped")
                           if isinstance(d.get(name), dict) and d[name])
        return (f"round={d.get('round')} participants={','.join(map(str, d.get('participants') or []))} "
                f"root={root.hex()[:12] if isinstance(root, bytes) else root} strategy={d.get('strategy')}{left_out}")
    parts = []
    for key, value in d.items():
        if key == "type":
            continue
        if isinstance(value, bytes):
            value = value.hex()[:12]
        elif isinstance(value, dict | list):
            value = json.dumps(_jsonable(value), sort_keys=True)
            value = value if len(value) <= 40 else value[:37] + "..."
        parts.append(f"{key}={value}")
    return " ".join(parts)


def format_table(blocks: Iterable[Block], *, width: int = 140) -> str:
    """Fixed-width table: index, UTC time, type, hash prefix, signer, summary."""
    header = f"{'#':>6}  {'time (UTC)':<19}  {'type':<16}  {'hash':<16}  {'signer':<16}  details"
    lines = [header, "-" * min(width, len(header) + 20)]
    for b in blocks:
        try:
            when = datetime.fromtimestamp(b.timestamp, UTC).strftime("%Y-%m-%d %H:%M:%S")
        except (OverflowError, OSError, ValueError):
            when = f"{b.timestamp:.0f}"
        signer = "(sealed)" if b.unsigned else b.key_id[:16]  # proven by its group's signed last block
        line = f"{b.index:>6}  {when:<19}  {b.type[:16]:<16}  {b.hash.hex()[:16]}  {signer:<16}  {summary(b)}"
        lines.append(line if len(line) <= width else line[: width - 3] + "...")
    return "\n".join(lines)
