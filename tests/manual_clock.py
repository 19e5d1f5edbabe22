"""A clock the test sets by hand: passed as ``now`` to code that takes its clock as an argument."""

from __future__ import annotations


class ManualClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t
