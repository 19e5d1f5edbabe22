"""What the dashboard shows: the fleet as the coordinator's ledger and signed status tell it.

Pure and thread-safe: the daemon's worker feeds it every block the coordinator appends and
every status it publishes; the dashboard's HTTP thread reads a JSON-ready snapshot. Only
small summaries are kept (one per round, a bounded window of recent blocks), so a long
ledger costs little memory.
"""

from __future__ import annotations

import threading
from collections import Counter, deque
from typing import Any

from federation import records
from ledger import Block

RECENT_BLOCKS = 25
MAX_ROUNDS_SHOWN = 1000


def summarize(data: dict[str, Any]) -> str:
    """One line saying what a block records."""
    kind = data.get("type")
    device = data.get("device")
    if kind == records.UPDATE:
        return f"{device}: update for round {data.get('round')} ({data.get('num_samples')} samples)"
    if kind == records.UPDATE_REJECTED:
        return f"{device}: update rejected ({data.get('reason')})"
    if kind == records.AGGREGATE:
        return f"round {data.get('round')} aggregated from {len(data.get('participants') or ())} devices"
    if kind == records.ROUND_OPENED:
        return f"round {data.get('round')} opened"
    if kind == records.MODEL_PUBLISHED:
        return f"model for round {data.get('round')} published" + (" (initial)" if data.get("initial") else "")
    if kind == records.DATASET:
        return f"{device}: data set registered ({data.get('size')} bytes)"
    if kind == records.DEVICE_KEY:
        return f"{device}: key {data.get('key_id')} registered"
    if kind == records.DEVICE_KEY_REVOKED:
        return f"{device}: key {data.get('key_id')} revoked"
    if kind == records.GENESIS:
        return f"fleet {data.get('fleet')} founded"
    return str(kind)


def _finite_metrics(metrics: Any) -> dict[str, float | None]:
    if not isinstance(metrics, dict):
        return {}
    return {str(k): (float(v) if isinstance(v, (int, float)) else None) for k, v in metrics.items()}


class FleetView:
    def __init__(self, fleet: str) -> None:
        self.fleet = fleet
        self._lock = threading.Lock()
        self.task: str | None = None
        self.status: dict[str, Any] = {}
        self.rounds: list[dict[str, Any]] = []
        self.open_round: int | None = None
        self.rejections_by_round: dict[int, Counter[str]] = {}
        self.recent: deque[dict[str, Any]] = deque(maxlen=RECENT_BLOCKS)
        self.height = 0
        self.head = ""

    def add_block(self, block: Block) -> None:
        data = block.data
        kind = data.get("type")
        with self._lock:
            self.height = block.index + 1
            self.head = block.hash.hex()
            self.recent.appendleft({"index": block.index, "type": kind, "time": block.timestamp,
                                    "hash": block.hash.hex(), "what": summarize(data)})
            if kind == records.ROUND_OPENED:
                self.open_round = int(data["round"])
            elif kind == records.MODEL_PUBLISHED and data.get("initial"):
                task = data.get("task")
                self.task = str(task.get("task")) if isinstance(task, dict) and task.get("task") else self.task
            elif kind == records.UPDATE_REJECTED:
                # By the round that was open when it was recorded: a device may claim any round number.
                key = self.open_round if self.open_round is not None else 0
                self.rejections_by_round.setdefault(key, Counter())[str(data.get("reason"))] += 1
            elif kind == records.AGGREGATE:
                self.rounds.append({
                    "round": int(data["round"]), "participants": list(data.get("participants") or []),
                    "num_samples": data.get("num_samples"), "metrics": _finite_metrics(data.get("metrics")),
                    "strategy": data.get("strategy"), "block": block.index, "hash": block.hash.hex(),
                    "time": block.timestamp,
                })

    def set_status(self, body: dict[str, Any]) -> None:
        with self._lock:
            self.status = dict(body)

    def snapshot(self) -> dict[str, Any]:
        """Everything the dashboard draws, as plain JSON types."""
        with self._lock:
            rounds = [{**r, "rejected": dict(self.rejections_by_round.get(r["round"], {}))}
                      for r in self.rounds[-MAX_ROUNDS_SHOWN:]]
            open_rejected = dict(self.rejections_by_round.get(self.open_round, {})) \
                if self.open_round is not None else {}
            return {
                "fleet": self.fleet, "task": self.task, "status": dict(self.status),
                "ledger": {"height": self.height, "head": self.head, "recent": list(self.recent)},
                "rounds": rounds, "open_round": {"round": self.open_round, "rejected": open_rejected},
            }
