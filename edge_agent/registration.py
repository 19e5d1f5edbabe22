"""Dataset registration: a device commits, in the ledger, to the data it trains on.

The fingerprint is the SHA-256 over the task's data files (plus which shard this device
uses), their size and schema. The agent keeps its registration in its state directory and
refuses to train if the data changed, unless started with ``--reregister``.

What leaves the device is not that SHA-256 but a salted commitment to it,
SHA-256(salt || SHA-256 of the data), with 32 random bytes of salt kept in the state
directory (``dataset.json``). A public data set's hash is guessable: published as is, it
would tell every reader of the ledger or status which data a device holds. The commitment
binds the device to its data just as well (the ledger records it, updates name it), and the
device can open it on request by handing over ``dataset.json`` (salt and SHA-256):
``fledger ledger dataset`` checks an opening against the ledger. See docs/security.md.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from federation.durable import atomic_write
from federation.tasks import LocalData, Task

log = logging.getLogger(__name__)


class DatasetChanged(ValueError):
    """The local data differs from what this device registered."""


@dataclass(frozen=True)
class Fingerprint:
    sha256: bytes
    size: int
    schema: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"sha256": self.sha256.hex(), "size": self.size, "schema": self.schema}

    def committed(self, salt: bytes) -> Fingerprint:
        """What the device publishes: the salted commitment in place of the SHA-256, and the
        schema marked so that a reader of the ledger knows what the digest is."""
        return Fingerprint(dataset_commitment(salt, self.sha256), self.size, {**self.schema, "digest": COMMITMENT})


SALT_BYTES = 32
COMMITMENT = "sha256(salt||sha256)"  # the schema's "digest" field names the scheme


def dataset_commitment(salt: bytes, sha256: bytes) -> bytes:
    if len(salt) != SALT_BYTES or len(sha256) != 32:
        raise ValueError(f"a commitment takes a {SALT_BYTES}-byte salt and a 32-byte SHA-256")
    return hashlib.sha256(salt + sha256).digest()


def opening_matches(opening: dict[str, Any], committed: bytes) -> bool:
    """Does ``opening`` (a device's dataset.json: hex ``salt`` and ``sha256``) open ``committed``?"""
    try:
        return dataset_commitment(bytes.fromhex(opening["salt"]), bytes.fromhex(opening["sha256"])) == committed
    except (KeyError, TypeError, ValueError):
        return False


def published_fingerprint(state_dir: Path, current: Fingerprint) -> Fingerprint:
    """``current`` as this device publishes it, committed with the salt stored by
    :func:`check_registration` (call that first)."""
    stored = _read(Path(state_dir) / "dataset.json") or {}
    try:
        salt = bytes.fromhex(stored["salt"])
    except (KeyError, TypeError, ValueError):
        raise DatasetChanged(f"{Path(state_dir) / 'dataset.json'} holds no salt; start with --reregister") from None
    return current.committed(salt)


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
    stored = _read(path)
    if stored is None and path.exists() and not reregister:
        raise DatasetChanged(f"{path} is unreadable, so the data cannot be checked against this device's "
                             "registration; start with --reregister to register the current data")
    if stored is not None:
        if stored.get("sha256") == current.sha256.hex():
            if isinstance(stored.get("salt"), str):
                return not stored.get("acknowledged", False)
            # Registered by a version that published the bare SHA-256: commit afresh (a new
            # registration, which the coordinator records once).
            atomic_write(path, json.dumps({**stored, "salt": secrets.token_hex(SALT_BYTES), "acknowledged": False},
                                          indent=2).encode(), mode=0o600)
            return True
        if not reregister:
            raise DatasetChanged(
                f"local data differs from this device's registration (registered {stored.get('sha256', '?')[:16]}, "
                f"now {current.sha256.hex()[:16]}); start with --reregister to register the new data")
    # A new salt with every new registration: commitments to the same data cannot be linked.
    # 0600: the salt is what keeps the commitment from being checked against guessed data.
    atomic_write(path, json.dumps({**current.to_json(), "salt": secrets.token_hex(SALT_BYTES), "acknowledged": False},
                                  indent=2).encode(), mode=0o600)
    return True


def mark_acknowledged(state_dir: Path) -> None:
    path = Path(state_dir) / "dataset.json"
    stored = _read(path)
    if stored is None:
        return  # written by check_registration at start; unreadable now means it is sent again
    stored["acknowledged"] = True
    atomic_write(path, json.dumps(stored, indent=2).encode(), mode=0o600)


def _read(path: Path) -> dict[str, Any] | None:
    """The stored registration; None if missing or unreadable (e.g. left empty by a power cut
    on an older version, which wrote it without fsync)."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("%s is unreadable: %s", path, exc)
        return None
    return data if isinstance(data, dict) else None
