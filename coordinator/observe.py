"""Wires the coordinator's observability (metrics, dashboard) to what the daemon already does.

The daemon hands over three things and nothing else: the ledger at start-up, each message the
coordinator publishes (ledger blocks and the signed status are picked out of them), and the
outcome of each message it dispatched with the time the message arrived. With neither
metrics nor the dashboard switched on, every call here is a cheap no-op.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from coordinator.dashboard import DashboardServer
from coordinator.fleet_view import FleetView
from federation.observability import Endpoints, serve_metrics
from federation.topics import Topics
from federation.verdicts import LeftOut
from ledger import Block, BlockFormatError

log = logging.getLogger(__name__)


class Observatory:
    def __init__(self, topics: Topics, *, task: str, metrics_host: str = "127.0.0.1", metrics_port: int = 0,
                 dashboard_host: str = "127.0.0.1", dashboard_port: int = 0) -> None:
        self.topics = topics
        self.endpoints = Endpoints()
        self.metrics: Any = None
        self.view: FleetView | None = None
        self.dashboard: DashboardServer | None = None
        try:
            if metrics_port:
                from coordinator.metrics import CoordinatorMetrics

                self.metrics = CoordinatorMetrics(topics.fleet, task)
                self.endpoints.add(serve_metrics(self.metrics.registry, metrics_host, metrics_port))
            if dashboard_port:
                self.view = FleetView(topics.fleet)
                self.dashboard = DashboardServer(self.view.snapshot, dashboard_host, dashboard_port).start()
                self.endpoints.add(self.dashboard.stop)
        except BaseException:
            self.endpoints.stop()
            raise

    @property
    def active(self) -> bool:
        return self.metrics is not None or self.view is not None

    def __enter__(self) -> Observatory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.endpoints.stop()

    def catch_up(self, ledger: Any) -> None:
        """The blocks already in the ledger, before the coordinator appends more."""
        if not self.active:
            return
        for block in ledger:
            self._block(block, replayed=True)

    def published(self, topic: str, payload: bytes) -> None:
        """Something the coordinator published (our own, trusted output)."""
        if not self.active:
            return
        try:
            if topic == self.topics.ledger_blocks:
                self._block(Block.from_bytes(payload), replayed=False)
            elif topic == self.topics.status:
                body = json.loads(payload)["status"]
                if self.metrics is not None:
                    self.metrics.status(body)
                if self.view is not None:
                    self.view.set_status(body)
        except (BlockFormatError, ValueError, KeyError, TypeError):  # a bug here must not stop the fleet
            log.exception("observability: could not read a message published on %s", topic)

    def outcome(self, kind: str, outcome: Any, received: float | None) -> None:
        """A message the daemon dispatched: ``outcome`` is the coordinator's Outcome (or None);
        ``received`` the wall-clock time the message arrived."""
        if self.metrics is None or outcome is None:
            return
        seconds = time.time() - received if received is not None else None
        self.metrics.outcome(kind, outcome.accepted, outcome.reason, seconds)

    def catch_up_answered(self, result: str) -> None:
        """A catch-up request served (``"served"``) or refused (the reason): coordinator/catch_up.py."""
        if self.metrics is not None:
            self.metrics.catch_up(result)

    def replay_answered(self, result: str) -> None:
        """A ledger replay request served (``"served"``) or refused (the reason): coordinator/replay.py."""
        if self.metrics is not None:
            self.metrics.replay(result)

    def upstream_left_out(self, why: LeftOut) -> None:
        """A gateway's accepted update that the upstream left out of its aggregate (coordinator/upstream.py)."""
        if self.metrics is not None:
            self.metrics.upstream_excluded.labels(reason=why.reason).inc()

    def head_seen(self, verdict: str) -> None:
        """A ledger/head message judged by coordinator/twin_watch.py (ours, retained, junk, another_writer)."""
        if self.metrics is not None:
            self.metrics.ledger_heads.labels(verdict=verdict).inc()

    def _block(self, block: Block, *, replayed: bool) -> None:
        if self.metrics is not None:
            self.metrics.block(block, replayed=replayed)
        if self.view is not None:
            self.view.add_block(block)
