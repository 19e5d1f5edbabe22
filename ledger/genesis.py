"""The genesis record: the log's own first entry, naming the fleet, the proof-of-work
difficulty and the coordinator key that signs every block. Everything after it is an opaque
record to the log; what records mean is the business of whoever builds on it."""

from __future__ import annotations

from typing import Any

from ledger.keys import key_id_of

GENESIS = "genesis"


def genesis(fleet: str, coordinator_public_key: bytes, difficulty: int = 0, **extra: Any) -> dict[str, Any]:
    return {**extra, "type": GENESIS, "fleet": fleet, "difficulty": int(difficulty),
            "coordinator_key": {"key_id": key_id_of(coordinator_public_key), "public_key": coordinator_public_key}}
