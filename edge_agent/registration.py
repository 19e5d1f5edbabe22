"""Dataset registration: a device commits, in the ledger, to the data it trains on.

The fingerprint is the SHA-256 over the task's data files (plus which shard this device
uses), their size and schema. The agent keeps its registration in its state directory and
refuses to train if the data changed, unless started with ``--reregister``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from federation.tasks import LocalData, Task


class DatasetChanged(ValueError):
    """The local data differs from what this device registered."""


@dataclass(frozen=True)
class Fingerprint:
    sha256: bytes
    size: int
    schema: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"sha256": self.sha256.hex(), "size": self.size, "schema": self.schema}


def fingerprint(task: Task, data: LocalData, shard: str, limit: int | None) -> Fingerprint:
    digest = hashlib.sha256()
    size = 0
    names = []
    for path in task.dataset_files():
        with open(path, "rb") as handle:
            file_digest = hashlib.sha256()
            for block in iter(lambda: handle.read(1 << 20), b""):
                file_digest.update(block)
                size += len(block)
        digest.update(file_digest.digest())
        names.append(Path(path).name)
    schema: dict[str, Any] = {
        "task": task.name, "kind": task.kind, "files": names, "shard": shard, "limit": limit or 0,
        "features": list(data.feature_names) or [list(data.train_x.shape[1:])],
        "train_samples": len(data.train_y), "test_samples": len(data.test_y),
    }
    # The shard and limit select which rows this device trains on: part of what it commits to.
    digest.update(json.dumps(schema, sort_keys=True).encode())
    return Fingerprint(digest.digest(), size, schema)


def check_registration(state_dir: Path, current: Fingerprint, *, reregister: bool) -> bool:
    """Compare with the stored registration. Returns True when a (new) registration must be sent.

    Raises DatasetChanged if the data differs and ``reregister`` is not set."""
    path = Path(state_dir) / "dataset.json"
    if path.exists():
        stored = json.loads(path.read_text())
        if stored.get("sha256") == current.sha256.hex():
            return not stored.get("acknowledged", False)
        if not reregister:
            raise DatasetChanged(
                f"local data differs from this device's registration (registered {stored.get('sha256', '?')[:16]}, "
                f"now {current.sha256.hex()[:16]}); start with --reregister to register the new data")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**current.to_json(), "acknowledged": False}, indent=2))
    return True


def mark_acknowledged(state_dir: Path) -> None:
    path = Path(state_dir) / "dataset.json"
    stored = json.loads(path.read_text())
    stored["acknowledged"] = True
    path.write_text(json.dumps(stored, indent=2))
