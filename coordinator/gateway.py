"""A gateway's rounds (``--upstream``): the coordinator's side of training under an upstream.

A gateway's round closes like any other (its devices' aggregate is recorded in its ledger), but
the aggregate is not its devices' next model: the aggregated delta goes upstream as one update
(:class:`coordinator.upstream.Upstream` sends it, from its outbox), the next round opens without
a model and waits (``awaiting``), and the model the upstream publishes next becomes that round's
model (:meth:`Gateway.adopt`): recorded in the ledger, naming where it comes from, then published
to the gateway's devices. The :class:`coordinator.service.Coordinator` owns the state this
changes (the open round, the global model, the writer) and delegates its gateway steps here.

Between the two sides, :class:`Upstream` (the gateway as a device upstream) and the
coordinator: :func:`wait_for_upstream_model` (at start, before the coordinator is built),
:func:`serve_upstream` (each pass of the daemon's loop) feeds what the upstream
link received to :class:`Upstream` and hands a newer upstream model to
``Coordinator.adopt_upstream_model`` (:func:`adopt_upstream`); :func:`resume_upstream` (at start)
goes on where a stopped gateway left off. :func:`awaits_upstream` (where a restarted gateway
stands) is pure.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from federation import deltas, envelope, records
from federation.codec import TensorDict, check_against_spec
from federation.fleet_state import FleetState

if TYPE_CHECKING:
    from coordinator.service import Coordinator
    from coordinator.upstream import Upstream
    from federation.mqtt import Message

# The coordinator's logger: these lines were the coordinator's before this part had its own
# module, and operators' filters on the logger name keep working.
log = logging.getLogger("coordinator.service")
# Likewise the daemon's: resume_upstream's line was logged by coordinator/daemon.py before it
# moved here, under that logger name, which is kept.
daemon_log = logging.getLogger("coordinator.daemon")

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


def wait_for_upstream_model(upstream: Upstream, inbox: queue.Queue[Message], stop: threading.Event) -> bool:
    """At start: feed the upstream link's messages to ``upstream`` until its first model is in,
    which the gateway's open round then trains from (False: stopped first)."""
    while upstream.model is None and not stop.is_set():
        try:
            message = inbox.get(timeout=0.5)
        except queue.Empty:
            continue
        upstream.on_message(message.topic, message.payload)
    if upstream.model is None:
        return False
    upstream.base = upstream.model[0]
    return True


def serve_upstream(coordinator: Coordinator, upstream: Upstream, inbox: queue.Queue[Message], now: float) -> None:
    """Upstream messages, the gateway's registration and pending update there, and the next model."""
    while True:
        try:
            message = inbox.get_nowait()
        except queue.Empty:
            break
        upstream.on_message(message.topic, message.payload)
    upstream.resend(now)  # the outbox, until the upstream answers
    newer = upstream.newer_model()
    if newer is not None and coordinator.awaiting_upstream:
        adopt_upstream(coordinator, upstream, newer[0])


def adopt_upstream(coordinator: Coordinator, upstream: Upstream, header: envelope.ModelHeader, *,
                   replace_open_round: bool = False) -> None:
    """The upstream model ``header`` (the newest :class:`Upstream` holds) as the coordinator's
    next model; :class:`Upstream` then trains from it (its base) if the coordinator took it."""
    assert upstream.model is not None and upstream.model[0] == header
    if coordinator.adopt_upstream_model(upstream.model[1], {"fleet": header.fleet, "round": header.round,
                                                            "block_hash": header.block_hash,
                                                            "model_sha256": header.model_sha256},
                                        replace_open_round=replace_open_round):
        upstream.adopted(header)


def resume_upstream(coordinator: Coordinator, upstream: Upstream) -> None:
    """After a start: go on where the gateway stopped towards its upstream."""
    assert upstream.model is not None
    if coordinator.awaiting_upstream:
        # Stopped after our round's aggregate: the update sent upstream is in the outbox and goes
        # again (the same bytes: counted once) until a newer upstream model answers it.
        if upstream.restore() is None:
            # Stopped between the aggregate and the outbox: nothing went upstream. The round's
            # work is lost; the next round trains from the upstream's newest model.
            daemon_log.warning("gateway: our last round's aggregate was not sent upstream before the stop; the next "
                               "round trains from the upstream's model of its round %d", upstream.model[0].round)
            adopt_upstream(coordinator, upstream, upstream.model[0])
    elif upstream.base is not None and deltas.model_sha256(coordinator.global_model) != upstream.base.model_sha256:
        # Our open round trains from another model than the upstream's newest (it moved on while
        # we were stopped): our deltas must be against the upstream's model, so the next round
        # trains from it.
        adopt_upstream(coordinator, upstream, upstream.base, replace_open_round=True)
