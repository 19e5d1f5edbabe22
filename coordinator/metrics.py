"""The coordinator's Prometheus metrics: their definitions, and how each is kept up to date.

They are fed from what the coordinator already produces, never by the checking code itself:
the outcome of each message (counted where the daemon dispatches it), the answer to each
catch-up request (coordinator/catch_up.py) and ledger replay request (coordinator/replay.py), the
ledger blocks it appends and the signed status it publishes (both seen as they are published).
So a counter here cannot disagree with the ledger: every "accepted" outcome is one ``update`` block.
"""

from __future__ import annotations

from typing import Any

from coordinator import catch_up, replay, twin_watch
from coordinator.request_tally import SERVED
from federation import records
from federation.fleet_state import RoundResult
from federation.observability import LATENCY_BUCKETS, new_registry, prometheus
from ledger import Block

STATES = ("waiting", "aggregating", "done", "halted")


class CoordinatorMetrics:
    def __init__(self, fleet: str, task: str) -> None:
        client = prometheus()
        self.registry = registry = new_registry()
        client.Info("fledger_coordinator", "the fleet and task this coordinator serves",
                    registry=registry).info({"fleet": fleet, "task": task})
        self.updates_accepted = client.Counter(
            "fledger_coordinator_updates_accepted", "updates accepted into a round (one ledger 'update' block each)",
            registry=registry)
        self.updates_rejected = client.Counter(
            "fledger_coordinator_updates_rejected", "updates rejected, by reason (see docs/protocol.md)",
            ["reason"], registry=registry)
        self.upstream_excluded = client.Counter(
            "fledger_coordinator_upstream_excluded", "a gateway's updates the upstream accepted and then left out "
            "of its aggregate, by the upstream strategy's reason (e.g. distance, krum_score)", ["reason"],
            registry=registry)
        self.registrations = client.Counter(
            "fledger_coordinator_registrations", "data set registrations handled, by result",
            ["result"], registry=registry)
        self.ingest_seconds = client.Histogram(
            "fledger_coordinator_ingest_seconds", "from an update's arrival to its verdict (queueing, checks, "
            "decryption, spool, ledger; a round's aggregation when it closes one)", ["result"],
            buckets=LATENCY_BUCKETS, registry=registry)
        self.rounds_closed = client.Counter(
            "fledger_coordinator_rounds_closed", "rounds aggregated by this process", registry=registry)
        self.round = client.Gauge("fledger_coordinator_round", "the open round", registry=registry)
        self.state = client.Enum("fledger_coordinator_state", "what the open round is doing", states=list(STATES),
                                 registry=registry)
        self.waiting_for = client.Gauge("fledger_coordinator_waiting_for",
                                        "updates still needed before the open round closes", registry=registry)
        self.round_participants = client.Gauge("fledger_coordinator_round_participants",
                                               "devices in the last aggregated round", registry=registry)
        self.ledger_height = client.Gauge("fledger_coordinator_ledger_height", "blocks in the ledger",
                                          registry=registry)
        self.devices_online = client.Gauge("fledger_coordinator_devices_online",
                                           "devices whose signed heartbeats say online", registry=registry)
        self.devices_known = client.Gauge("fledger_coordinator_devices_known",
                                          "devices that have sent a signed presence statement", registry=registry)
        self.model_test_metric = client.Gauge(
            "fledger_coordinator_model_test_metric", "the latest global model on the held-out test set "
            "(coordinator --evaluate), by metric: mse, accuracy, loss", ["metric"], registry=registry)
        self.model_clients_metric = client.Gauge(
            "fledger_coordinator_model_clients_metric", "sample-weighted mean of what the last round's devices "
            "reported, by metric (e.g. train_loss, test_mse on their local test split)", ["metric"],
            registry=registry)

        self.ledger_heads = client.Counter(
            "fledger_coordinator_ledger_heads", "ledger/head messages received, by verdict "
            f"({', '.join(twin_watch.VERDICTS)}; coordinator/twin_watch.py): another_writer stops the coordinator",
            ["verdict"], registry=registry)

        # A catch-up or ledger replay request: "served", or refused with this reason (RequestTally).
        self.catch_up = _RequestCounters(client, registry, "catch_up", "catch-up requests",
                                         "coordinator/catch_up.py", catch_up.REFUSALS)
        self.replay = _RequestCounters(client, registry, "replay", "ledger replay requests",
                                       "coordinator/replay.py", replay.REFUSALS)

    def outcome(self, kind: str, accepted: bool, reason: str, seconds: float | None) -> None:
        """One message handled: ``kind`` is "update" or "registration"."""
        if kind == "registration":
            self.registrations.labels(result=reason).inc()
            return
        if accepted:
            self.updates_accepted.inc()
        else:
            self.updates_rejected.labels(reason=reason).inc()
        if seconds is not None:
            self.ingest_seconds.labels(result="accepted" if accepted else "rejected").observe(max(0.0, seconds))

    def block(self, block: Block, *, replayed: bool = False) -> None:
        """A ledger block: appended now, or (``replayed``) read from the ledger at start-up."""
        self.ledger_height.set(block.index + 1)
        if block.data.get("type") != records.AGGREGATE:
            return
        if not replayed:
            self.rounds_closed.inc()
        result = RoundResult.of(block)  # the aggregate as the fleet's fold reads it
        self.round_participants.set(len(result.participants))
        for name, value in result.metrics.items():
            if value is None:
                continue  # the evaluation failed or diverged (recorded as such in the ledger)
            if name.startswith("test_"):
                self.model_test_metric.labels(metric=name[len("test_"):]).set(value)
            elif name.startswith("clients_"):
                self.model_clients_metric.labels(metric=name[len("clients_"):]).set(value)

    def status(self, body: dict[str, Any]) -> None:
        """The fleet status the coordinator just signed and published."""
        if isinstance(body.get("round"), int):
            self.round.set(body["round"])
        if body.get("state") in STATES:
            self.state.state(body["state"])
        if isinstance(body.get("waiting_for"), int):
            self.waiting_for.set(body["waiting_for"])
        if isinstance(body.get("height"), int):
            self.ledger_height.set(body["height"])
        presence = body.get("presence")
        if isinstance(presence, dict):
            self.devices_known.set(len(presence))
            self.devices_online.set(sum(1 for state in presence.values() if state == "online"))


class _RequestCounters:
    """The served and refused counters of one rate-limited request service."""

    def __init__(self, client: Any, registry: Any, name: str, what: str, source: str,
                 reasons: tuple[str, ...]) -> None:
        self.served = client.Counter(f"fledger_coordinator_{name}_served", f"{what} answered ({source})",
                                     registry=registry)
        self.refused = client.Counter(f"fledger_coordinator_{name}_refused",
                                      f"{what} refused, by reason ({', '.join(reasons)})", ["reason"],
                                      registry=registry)

    def __call__(self, result: str) -> None:
        if result == SERVED:
            self.served.inc()
        else:
            self.refused.labels(reason=result).inc()
