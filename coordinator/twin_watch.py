"""While running: is another process writing this fleet's ledger with our key?

Two coordinators with the same keys but different state directories (a backup restored onto a
second gateway while the first still runs, one started by hand beside the systemd one) can both
pass the start-up check (coordinator/state_check.py) when they start together at the same
height. Each then appends its own blocks at the same indexes and publishes its own head: a fork
nobody would notice. The running coordinator therefore also reads the fleet's retained
``ledger/head`` and judges every head it receives here (pure: the daemon passes the message and
the ledger, and stops on ANOTHER_WRITER).

- Not signed by our key: junk (anyone can publish on an open broker), counted, never acted on.
- A retained delivery (MQTT retain flag set) is what the broker held when we (re)subscribed.
  Both brokers fledger supports clear the flag on live deliveries to an existing subscriber
  (MQTT 3.1.1 3.3.1.3, and MQTT 5 without Retain As Published; measured on amqtt 0.12.1 and
  mosquitto 2.0.11), so a head published while we run arrives with it cleared; amqtt sets it
  on what it queued for a persistent session while we were away (read in its source). A
  retained head may rightly be an old chain's (after ``--new-chain``): the start-up check saw
  the broker's head and judged it. So a retained head is acted on only if it is not ours and beyond the height the
  start-up check saw there, i.e. published since by someone else: the other writer's head
  we missed while disconnected, or one published between the start-up look and our
  subscription. If that look saw no head (``--head-wait 0``, a slow broker), nothing is known
  and no retained head is acted on.
- Our own head echoed back: we publish a head only after appending its block, so our ledger
  holds that very block at its index, also when later blocks followed (under load the echo
  arrives after more appends) and after a reconnect.
- Signed by our key but older than our genesis: a block of an old chain (the one before
  ``--new-chain``, same key) that someone replays, e.g. on a broker without an ACL. Nothing
  that writes beside us makes such a block (its blocks are younger than our genesis; a twin on
  a clock running behind is seen at its first head past our genesis), so it is counted, never
  acted on: an old head must not be a way to stop the coordinator.
- Signed by our key, but beyond our height or with another hash than our block at its index:
  another writer. Stop before publishing anything more.

The other side of a twin that stops: on reconnecting, a coordinator republishes its retained
model, status and acknowledgements before the broker hands it the head that makes it stop
(the retained messages of its subscriptions arrive after its own publishes). The survivor then
sees, on its status topic, a status signed by its key from another process (another session) and
publishes its own retained state again at once (:meth:`TwinWatch.reclaim_due`), instead of
leaving the stopped twin's model and status on the broker until its own next change.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from coordinator.state_check import signed_head
from federation import envelope

log = logging.getLogger(__name__)

# What a received head was judged to be (also the metric's label).
OURS = "ours"  # a block our ledger holds at that index: our own echo, or an older head of ours
RETAINED = "retained"  # what the broker held when we (re)subscribed, no newer than what the start judged
JUNK = "junk"  # not a block signed by this coordinator's key
OLD_CHAIN = "old_chain"  # signed by our key before our genesis: an old chain's head, replayed
ANOTHER_WRITER = "another_writer"  # signed by our key, not in our ledger: another coordinator writes
VERDICTS = (OURS, RETAINED, JUNK, OLD_CHAIN, ANOTHER_WRITER)
RECLAIM_INTERVAL_S = 5.0  # at most one republication per this, whatever keeps overwriting the status


@dataclass(frozen=True)
class HeadVerdict:
    verdict: str
    index: int | None = None  # the received block's index (a block signed by our key)
    their_hash: bytes | None = None
    our_hash: bytes | None = None  # our block at that index; None when it is beyond our height
    our_height: int = 0


def judge_head(payload: bytes, *, retained: bool, coordinator_key: bytes, height: int,
               hash_at: Callable[[int], bytes], start_height: int | None = None,
               genesis_timestamp: float | None = None) -> HeadVerdict:
    """Judge one ``ledger/head`` message against our ledger (``height`` blocks, ``hash_at(i)``
    the hash of our block ``i``, ``genesis_timestamp`` the signed time of our block 0);
    ``start_height``: that of the head the start-up check saw on the broker (signed by our
    key), None if it saw none."""
    if retained and start_height is None:
        return HeadVerdict(RETAINED, our_height=height)
    head = signed_head(payload, coordinator_key, "a ledger head")
    if head is None:
        return HeadVerdict(JUNK, our_height=height)
    index = head.height - 1
    ours = hash_at(index) if index < height else None
    if ours == head.hash:
        return HeadVerdict(OURS, index, head.hash, ours, height)
    if retained and start_height is not None and head.height <= start_height:
        return HeadVerdict(RETAINED, index, head.hash, ours, height)  # no newer than what the start judged
    if genesis_timestamp is not None and head.timestamp < genesis_timestamp:
        return HeadVerdict(OLD_CHAIN, index, head.hash, ours, height)
    return HeadVerdict(ANOTHER_WRITER, index, head.hash, ours, height)


def other_session(payload: bytes, coordinator_key: bytes, session: str) -> str | None:
    """The session of a status signed by our key but published by another coordinator process;
    None for our own, for junk and for what another key signed."""
    try:
        status = envelope.open_status(payload, coordinator_key)
    except envelope.EnvelopeError:
        return None
    other = status.get("session")
    return str(other) if other is not None and other != session else None


def alarm(fleet: str, seen: HeadVerdict) -> str:
    """The one ERROR line for ANOTHER_WRITER: what was seen, and what to do."""
    assert seen.index is not None and seen.their_hash is not None
    ours = (f"ours is {seen.our_hash.hex()[:16]}" if seen.our_hash is not None
            else "ours does not reach it")
    return (f"another coordinator is writing the ledger of fleet {fleet}: block {seen.index} signed by this "
            f"coordinator's key is {seen.their_hash.hex()[:16]}, {ours} (our height {seen.our_height}); stopping "
            "so the chain does not fork; stop the other coordinator (same keys, another state directory), then "
            "check this ledger with `fledger ledger verify` and restore it with `fledger ledger restore` if needed")


class TwinWatch:
    """Judges each live ledger head the daemon receives; counts the verdicts (``counts``, and
    ``counted`` for the metrics) and warns once about junk."""

    def __init__(self, fleet: str, coordinator_key: bytes, *, start_height: int | None = None,
                 counted: Callable[[str], None] | None = None) -> None:
        self.fleet = fleet
        self.coordinator_key = coordinator_key
        self.start_height = start_height  # of the broker's head the start-up check saw (None: none)
        self.counts: Counter[str] = Counter()
        self._counted = counted
        self._reclaimed_at: float | None = None
        self._overwritten_by: str | None = None  # session of a status of our key from another process

    def check(self, payload: bytes, *, retained: bool, height: int, hash_at: Callable[[int], bytes],
              genesis_timestamp: float | None = None) -> str | None:
        """The ERROR line if another writer was seen (the caller stops at once), else None."""
        seen = judge_head(payload, retained=retained, coordinator_key=self.coordinator_key, height=height,
                          hash_at=hash_at, start_height=self.start_height, genesis_timestamp=genesis_timestamp)
        self.counts[seen.verdict] += 1
        if self._counted is not None:
            self._counted(seen.verdict)
        if seen.verdict == JUNK and self.counts[JUNK] == 1:  # once: a flood must not flood the log
            log.warning("ignored a ledger head not signed by this coordinator's key on fleet %s's topic "
                        "(counted as junk; not acted on)", self.fleet)
        if seen.verdict == OLD_CHAIN and self.counts[OLD_CHAIN] == 1:
            log.warning("ignored a ledger head signed by this coordinator's key but older than this chain's genesis "
                        "on fleet %s's topic (block %s, an old chain's head replayed; counted as old_chain, not "
                        "acted on)", self.fleet, seen.index)
        return alarm(self.fleet, seen) if seen.verdict == ANOTHER_WRITER else None

    def note_status(self, payload: bytes, *, session: str, retained: bool = False) -> str | None:
        """A message on the fleet's status topic: if it is a live status signed by our key from
        another process (another session), our retained state is due again (:meth:`reclaim_due`);
        returns that session, else None (our own echo, junk, another key's). A retained delivery
        is what the broker held when we (re)subscribed: we publish ours after every (re)connect
        anyway, so it is not acted on (nor is an earlier run's status at start)."""
        if retained:
            return None
        other = other_session(payload, self.coordinator_key, session)
        if other is not None:
            self._overwritten_by = other
        return other

    def reclaim_due(self, now: float) -> str | None:
        """The session that overwrote our status, when we should publish our retained state again
        now: at once the first time, then at most once per :data:`RECLAIM_INTERVAL_S`, and always
        once after the last overwrite (a twin's last status may come just after a republication)."""
        if self._overwritten_by is None:
            return None
        if self._reclaimed_at is not None and now - self._reclaimed_at < RECLAIM_INTERVAL_S:
            return None
        other, self._overwritten_by, self._reclaimed_at = self._overwritten_by, None, now
        return other
