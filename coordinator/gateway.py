"""A gateway's rounds (``--upstream``): the coordinator's side of training under an upstream.

A gateway's round closes like any other (its devices' aggregate is recorded in its ledger), but
the aggregate is not its devices' next model: the aggregated delta goes upstream as one update
(:class:`coordinator.upstream.Upstream` sends it, from its outbox), the next round opens without
a model and waits (``awaiting``), and the model the upstream publishes next becomes that round's
model (:meth:`Gateway.adopt`): recorded in the ledger, naming where it comes from, then published
to the gateway's devices. The :class:`coordinator.service.Coordinator` owns the state this
changes (the open round, the global model, the writer) and delegates its gateway steps here;
the daemon hands the model :class:`Upstream` received to ``Coordinator.adopt_upstream_model``.

:func:`awaits_upstream` (where a restarted gateway stands) is pure.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from federation import deltas, records
from federation.codec import TensorDict, check_against_spec
from federation.fleet_state import FleetState

if TYPE_CHECKING:
    from coordinator.service import Coordinator

# The coordinator's logger: these lines were the coordinator's before this part had its own
# module, and operators' filters on the logger name keep working.
log = logging.getLogger("coordinator.service")

SendUpstream = Callable[[TensorDict, int, dict[str, float]], None]  # (aggregated delta, samples, metrics)


def awaits_upstream(fleet: FleetState, round_number: int, *, done: bool) -> bool:
    """At start: whether the open round ``round_number`` still waits for the upstream's next model.

    So it does when the gateway stopped after its round's aggregate and before the upstream's
    next model (its update is in the upstream outbox): the ledger's last model block is that
    aggregate, which is not a model its devices train from (no ``model.published`` for it)."""
    block = fleet.model_block
    return not done and block is not None and block.data.get("type") == records.AGGREGATE and \
        round_number not in fleet.published_rounds


class Gateway:
    """The gateway steps of one coordinator: send each aggregate upstream, adopt the answer."""

    def __init__(self, coordinator: Coordinator, send: SendUpstream, now: Callable[[], float]) -> None:
        self._coordinator = coordinator
        self._send = send
        self._now = now
        self.awaiting = False  # the open round waits for the upstream's next model

    def send(self, change: TensorDict, num_samples: int, metrics: dict[str, float]) -> None:
        """One update upstream: this gateway's aggregated delta, weighted by all its devices' samples."""
        self._send(change, num_samples, metrics)

    def adopt(self, model: TensorDict, upstream: dict[str, Any], *, replace_open_round: bool = False) -> bool:
        """The gateway's next model: the one its upstream coordinator published after this
        gateway's update (``upstream``: which round and block it is there). Recorded as the model
        of the round that waited for it, then published to this gateway's devices. False if no
        round waits for one (the upstream moved on without us: our round goes on from our model).

        ``replace_open_round`` (at start, when the open round does not train from the upstream's
        newest model, e.g. after a restart between our update and the upstream's answer): the
        open round is abandoned, like a restore, and the next one trains from the upstream's."""
        c = self._coordinator
        assert c.round is not None
        if c.halted or not (self.awaiting or replace_open_round):
            return False
        check_against_spec(model, c.spec)
        digest = deltas.model_sha256(model)
        abandoned: dict[str, Any] = {}
        if not self.awaiting:
            abandoned = {"abandoned_round": c.round.number}
            c.open_round(c.round.number + 1, announce=False)
        with c.writer.group_commit() as committed:
            block = c.writer.new_model(c.round.number, model, records.model_published(
                c.round.number, digest, upstream=upstream, **abandoned), closes=abandoned.get("abandoned_round"))
            c.writer.append(records.round_opened(c.round.number), sign=False)
        c.install_model(model, block)
        self.awaiting = False
        c.round.opened_at = self._now()
        log.info("round %d trains from the upstream model of its round %s", c.round.number, upstream.get("round"))
        c.publish_model()
        c.writer.announce(committed)
        c.publish_status()
        return True
