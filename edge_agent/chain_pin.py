"""The agent's pin on its fleet's chain: the coordinator key, the genesis block and the highest
signed model (round and ledger height) it has seen, kept in ``STATE/chain.json``.

A coordinator whose state was lost, or whose ledger was rolled back, publishes a model from a
new chain or from lower down its old one. Without a pin an agent waits silently for a round
it has already trained; with one it says, as an ERROR, what happened and how to fix it. To
follow a reset that is intended, run the agent once with ``--accept-reset`` or delete the file.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from federation.durable import atomic_write

log = logging.getLogger(__name__)

FILE = "chain.json"


@dataclass(frozen=True)
class ChainPin:
    coordinator_key: str  # hex of the coordinator's signing key
    genesis: str  # hex of the genesis block's hash ("" if the coordinator does not say)
    round: int
    height: int  # ledger height of the model's block (index + 1)


def judge(pin: ChainPin | None, seen: ChainPin) -> str | None:
    """None if ``seen`` (a verified model) continues the pinned chain, else what went wrong."""
    if pin is None:
        return None
    if seen.coordinator_key != pin.coordinator_key:
        return f"is signed with a different coordinator key ({seen.coordinator_key[:16]}, we followed " \
               f"{pin.coordinator_key[:16]})"
    if seen.genesis and pin.genesis and seen.genesis != pin.genesis:
        return (f"started a new chain (genesis {seen.genesis[:16]}; we followed genesis {pin.genesis[:16]} up to "
                f"round {pin.round}, ledger height {pin.height})")
    if seen.height < pin.height or seen.round < pin.round:
        return (f"went backwards from round {pin.round} (ledger height {pin.height}) to round {seen.round} "
                f"(height {seen.height}): its ledger was lost or rolled back")
    return None


def advance(pin: ChainPin | None, seen: ChainPin) -> ChainPin:
    """The pin after ``seen``, which continues it (or replaces it: an accepted reset)."""
    if pin is None or judge(pin, seen) is not None:
        return seen
    return ChainPin(pin.coordinator_key, pin.genesis or seen.genesis, max(pin.round, seen.round),
                    max(pin.height, seen.height))


def load(state_dir: Path) -> ChainPin | None:
    path = Path(state_dir) / FILE
    try:
        data = json.loads(path.read_text())
        return ChainPin(str(data["coordinator_key"]), str(data["genesis"]), int(data["round"]), int(data["height"]))
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as exc:
        log.warning("%s is unreadable (%s); pinning the next model's chain afresh", path, exc)
        return None


def save(state_dir: Path, pin: ChainPin) -> None:
    atomic_write(Path(state_dir) / FILE, json.dumps(asdict(pin)).encode())
