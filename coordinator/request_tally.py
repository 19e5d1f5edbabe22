"""What a rate-limited request service of the coordinator answered (ledger replays, catch-up).

Each request is served or refused with a reason. Every answer goes to ``counted`` (the
coordinator's metrics); refusals are also counted here by reason and logged once per requester,
reason and window, so a flood costs a counter, not a log line.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

SERVED = "served"  # what ``counted`` hears of a served request; else the refusal's reason


def ignore(result: str) -> None:
    """The default ``counted``: no metrics."""


@dataclass
class RequestTally:
    what: str  # the log line's subject, e.g. "catch-up request"
    log: logging.Logger
    counted: Callable[[str], None] = ignore
    refused: Counter[str] = field(default_factory=Counter)  # reason -> requests dropped
    _warned: set[tuple[str, str]] = field(default_factory=set)  # (requester, reason) logged this window

    def served(self) -> None:
        self.counted(SERVED)

    def refuse(self, requester: str, reason: str) -> None:
        self.refused[reason] += 1
        self.counted(reason)
        if (requester, reason) not in self._warned:  # once per requester, reason and window: no log flood
            self._warned.add((requester, reason))
            self.log.warning("%s from %s refused: %s (%d %s refusals so far; more this window are counted, not "
                             "logged)", self.what, requester, reason, self.refused[reason], reason)

    def new_window(self) -> None:
        self._warned = set()
