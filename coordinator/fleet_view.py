"""What the dashboard shows: the fleet as the coordinator's ledger and signed status tell it.

Pure and thread-safe: the daemon's worker feeds it every block the coordinator appends and
every status it publishes; the dashboard's HTTP thread reads a JSON-ready snapshot. Only
small summaries are kept (one per round, a bounded window of recent blocks), so a long
ledger costs little memory.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Any

from federation import records
from federation.fleet_state import RunHistory
from ledger import Block

RECENT_BLOCKS = 25
MAX_ROUNDS_SHOWN = 1000


class FleetView:
    def __init__(self, fleet: str) -> None:
        self.fleet = fleet
        self._lock = threading.Lock()
        self.status: dict[str, Any] = {}
        self.history = RunHistory()  # the fleet's fold of the run (federation/fleet_state.py), summaries only
        self.recent: deque[dict[str, Any]] = deque(maxlen=RECENT_BLOCKS)
        self.height = 0
        self.head = ""

    def add_block(self, block: Block) -> None:
        with self._lock:
            self.height = block.index + 1
            self.head = block.hash.hex()
            self.recent.appendleft({"index": block.index, "type": block.data.get("type"), "time": block.timestamp,
                                    "hash": block.hash.hex(), "what": records.describe(block.data)})
            self.history.apply(block)

    def set_status(self, body: dict[str, Any]) -> None:
        with self._lock:
            self.status = dict(body)

    def snapshot(self) -> dict[str, Any]:
        """Everything the dashboard draws, as plain JSON types."""
        with self._lock:
            history = self.history
            rounds = [{"round": r.round, "participants": list(r.participants), "num_samples": r.num_samples,
                       "metrics": dict(r.metrics), "strategy": r.strategy, "block": r.block, "hash": r.hash.hex(),
                       "time": r.time, "rejected": dict(history.rejected_in(r.round))}
                      for r in list(history.results.values())[-MAX_ROUNDS_SHOWN:]]
            open_round = {"round": history.open_round, "rejected": dict(history.rejected_in(history.open_round))}
            return {
                "fleet": self.fleet, "task": history.task, "status": dict(self.status),
                "ledger": {"height": self.height, "head": self.head, "recent": list(self.recent)},
                "rounds": rounds, "open_round": open_round,
            }
