"""Undoing a poisoned round: republish an earlier, ledger-recorded global model.

The operator runs ``fledger restore-model --round R`` (after revoking the hostile device). It
checks, on the spot, that the ledger records a global model for round R and that the saved
file is that model (its SHA-256), then leaves a request file in the coordinator's state
directory. The coordinator applies it (within 2 s, at once on SIGHUP, or at its next start if
it is stopped): it republishes model R as the next round, a new and higher round, with a
signed ``model.published`` record that names the round it restores. Agents follow it like
any newer model. One code path whether or not the coordinator runs, and no second writer of
the ledger: the request file is the only thing the command writes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from coordinator.storage import ModelStore, atomic_write, read_model_file
from federation.codec import encode_tensors
from ledger import Block
from ledger import storage as ledger_storage

if TYPE_CHECKING:
    from coordinator.service import Coordinator

# The daemon's logger: apply_request's line was logged by coordinator/daemon.py before it moved
# here, and operators' filters on the logger name keep working.
log = logging.getLogger("coordinator.daemon")

REQUEST_FILE = "restore-request.json"


class RestoreError(ValueError):
    """The restore cannot be done as asked (no such round, a model file that is not the ledger's)."""


class ModelMismatch(RestoreError):
    """The saved model file is not the model the ledger records (corruption or tampering)."""


@dataclass(frozen=True)
class RestoreRequest:
    round: int  # the round whose global model is republished
    reason: str
    request_id: str  # recorded with the restore, so a request is never applied twice
    # Left by `fledger ledger restore` when the lost state directory held accepted updates of the
    # open round (``round``): their envelopes went with the spool, so the coordinator starts that
    # round without them and this request runs it again as the next round, from the same model.
    lost_updates: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"round": self.round, "reason": self.reason, "request_id": self.request_id,
                **({"lost_updates": list(self.lost_updates)} if self.lost_updates else {})}

    def lost_in(self, round_number: int) -> frozenset[str]:
        """Devices whose accepted update of the open ``round_number`` may be missing from the spool."""
        return frozenset(self.lost_updates) if round_number == self.round else frozenset()


def request_path(state_dir: Path) -> Path:
    return Path(state_dir) / REQUEST_FILE


def write_request(state_dir: Path, round_number: int, reason: str, *,
                  lost_updates: tuple[str, ...] = ()) -> RestoreRequest:
    request = RestoreRequest(int(round_number), reason, secrets.token_hex(8), tuple(lost_updates))
    for stale in (REQUEST_FILE + ".refused", REQUEST_FILE + ".refused.txt"):  # an earlier request's
        (Path(state_dir) / stale).unlink(missing_ok=True)
    atomic_write(request_path(state_dir), json.dumps({**request.to_json(), "requested": time.time()}).encode())
    return request


def read_request(state_dir: Path) -> RestoreRequest | None:
    """The pending request, None if there is none; RestoreError if the file is not one."""
    path = request_path(state_dir)
    try:
        raw = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise RestoreError(f"{path}: not a restore request: {exc}") from exc
    if not isinstance(raw, dict) or type(raw.get("round")) is not int or not isinstance(raw.get("reason"), str) \
            or not isinstance(raw.get("request_id"), str):
        raise RestoreError(f"{path}: not a restore request (needs round, reason, request_id)")
    lost = raw.get("lost_updates", [])
    if not isinstance(lost, list) or not all(isinstance(device, str) for device in lost):
        raise RestoreError(f"{path}: not a restore request (lost_updates must be a list of device ids)")
    return RestoreRequest(raw["round"], raw["reason"][:500], raw["request_id"][:64], tuple(lost))


def clear_request(state_dir: Path, refused: str | None = None) -> None:
    """Remove the request once applied; a refused one is kept beside, with why, for the operator."""
    path = request_path(state_dir)
    if refused is not None and path.exists():
        path.replace(path.with_name(REQUEST_FILE + ".refused"))
        path.with_name(REQUEST_FILE + ".refused.txt").write_text(refused + "\n")
    path.unlink(missing_ok=True)


def apply_request(coordinator: Coordinator, state_dir: Path) -> None:
    """Apply a `fledger restore-model` request left in the state directory, if there is one."""
    try:
        request = read_request(state_dir)
        if request is None:
            return
        coordinator.restore_model(request.round, request.reason, request_id=request.request_id)
    except RestoreError as exc:
        log.error("restore request refused: %s", exc)
        clear_request(state_dir, refused=str(exc))
        return
    clear_request(state_dir)


def checked_model(models: ModelStore, recorded: dict[int, bytes], round_number: int) -> tuple[Any, bytes]:
    """The saved model of ``round_number`` and its digest, if it is the one the ledger records."""
    if round_number not in recorded:
        known = sorted(recorded)
        raise RestoreError(f"the ledger records no global model for round {round_number} "
                           f"(rounds {known[0]}..{known[-1]})" if known else "the ledger records no model yet")
    path = models.path(round_number)
    if not path.exists():
        raise RestoreError(f"{path} is missing: the model of round {round_number} cannot be restored")
    model = read_model_file(path)
    digest = hashlib.sha256(encode_tensors(model)).digest()
    if digest != recorded[round_number]:
        raise ModelMismatch(f"{path} is not the model the ledger records for round {round_number} "
                           f"(SHA-256 {digest.hex()[:16]}, ledger {recorded[round_number].hex()[:16]})")
    return model, digest


def read_blocks(ledger_path: Path) -> list[Block]:
    """The ledger's blocks, read without taking the writer's lock (the coordinator may be running)."""
    scanned = ledger_storage.read(ledger_path, strict=False)
    return [Block.from_bytes(payload) for payload in scanned.payloads]
