"""The edge agent's Prometheus metrics, and the events the agent reports to them.

The agent calls the four methods of :class:`AgentEvents`; without ``--metrics-port`` they go
to :data:`NO_EVENTS`, which does nothing and needs no prometheus_client.
"""

from __future__ import annotations

from federation.observability import TRAINING_BUCKETS, new_registry, prometheus


class AgentEvents:
    """What an agent tells its observers. This base class ignores everything."""

    def trained(self, round_number: int, seconds: float, num_samples: int, train_loss: float) -> None:
        """A local training round finished."""

    def sent(self, round_number: int, *, resend: bool) -> None:
        """An update was handed to MQTT (again, when ``resend``)."""

    def acknowledged(self, round_number: int) -> None:
        """The coordinator's signed acknowledgement says it accepted our update."""

    def rejected(self, round_number: int, reason: str) -> None:
        """The coordinator's acknowledgement names a reason it did not count our update (once per
        update and reason)."""


NO_EVENTS = AgentEvents()


class AgentMetrics(AgentEvents):
    def __init__(self, fleet: str, device: str, task: str) -> None:
        client = prometheus()
        self.registry = registry = new_registry()
        client.Info("fledger_agent", "the device, fleet and task of this agent",
                    registry=registry).info({"fleet": fleet, "device": device, "task": task})
        self.rounds_trained = client.Counter("fledger_agent_rounds_trained", "rounds trained locally",
                                             registry=registry)
        self.training_seconds = client.Histogram("fledger_agent_training_seconds", "seconds of local training "
                                                 "per round", buckets=TRAINING_BUCKETS, registry=registry)
        self.last_round = client.Gauge("fledger_agent_last_trained_round", "the last round trained",
                                       registry=registry)
        self.train_loss = client.Gauge("fledger_agent_train_loss", "training loss of the last round",
                                       registry=registry)
        self.samples = client.Gauge("fledger_agent_training_samples", "samples trained on in the last round",
                                    registry=registry)
        self.updates_sent = client.Counter("fledger_agent_updates_sent", "updates sent (first sends)",
                                           registry=registry)
        self.updates_resent = client.Counter("fledger_agent_updates_resent", "updates sent again for want of an "
                                             "acknowledgement", registry=registry)
        self.updates_acknowledged = client.Counter("fledger_agent_updates_acknowledged", "updates the coordinator "
                                                   "acknowledged as accepted", registry=registry)
        self.updates_rejected = client.Counter("fledger_agent_updates_rejected", "updates the coordinator did not "
                                               "count, by its reason", ["reason"], registry=registry)

    def trained(self, round_number: int, seconds: float, num_samples: int, train_loss: float) -> None:
        self.rounds_trained.inc()
        self.training_seconds.observe(max(0.0, seconds))
        self.last_round.set(round_number)
        self.samples.set(num_samples)
        self.train_loss.set(train_loss)

    def sent(self, round_number: int, *, resend: bool) -> None:
        (self.updates_resent if resend else self.updates_sent).inc()

    def acknowledged(self, round_number: int) -> None:
        self.updates_acknowledged.inc()

    def rejected(self, round_number: int, reason: str) -> None:
        self.updates_rejected.labels(reason=reason).inc()
