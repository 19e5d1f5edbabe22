"""When a run ends by itself: after ``--rounds``, or once a round's model reaches ``--stop-at``.

A target names a metric exactly as the ledger's aggregate record holds it, so anyone can check
from the ledger alone that the run stopped where it said: ``test_*`` is the coordinator's own
evaluation of the new global model on the task's held-out test set (needs ``--evaluate``),
``clients_*`` the sample-weighted mean of what the round's devices reported (no torch needed).
Pure: no clock, no I/O.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from federation.config import ConfigError

COMPARISONS: dict[str, Callable[[float, float], bool]] = {"<=": operator.le, ">=": operator.ge}
# What federation.evaluation.evaluate returns for each kind of task (central and on devices),
# listed here so that a coordinator without torch can check a target's name at start-up.
EVALUATION_METRICS = {"regression": ("mse",), "classification": ("accuracy", "loss")}
CLASSIFICATION_TASKS = frozenset({"mnist"})
CENTRAL_TEST_SETS = frozenset({"california", "mnist"})  # a csv task's data is on the devices only
_TARGET = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(<=|>=)\s*(\S+)\s*$")


def recorded_metrics(task: str) -> list[str]:
    """The metric names an aggregate record of ``task`` can carry (test_* only with --evaluate)."""
    evaluated = EVALUATION_METRICS["classification" if task in CLASSIFICATION_TASKS else "regression"]
    device = ["train_loss", "train_seconds", *(f"test_{m}" for m in evaluated),
              *(f"global_test_{m}" for m in evaluated)]
    central = [f"test_{m}" for m in evaluated] if task in CENTRAL_TEST_SETS else []
    return [*central, *(f"clients_{m}" for m in device)]


@dataclass(frozen=True)
class StopTarget:
    metric: str  # as in the aggregate record's metrics, e.g. test_mse or clients_test_accuracy
    comparison: str  # "<=" or ">="
    value: float

    @classmethod
    def parse(cls, text: str) -> StopTarget:
        match = _TARGET.match(text)
        if match is None:
            raise ConfigError(f"--stop-at {text!r}: write METRIC<=VALUE or METRIC>=VALUE, e.g. test_mse<=0.25 "
                              "or test_accuracy>=0.98")
        metric, comparison, number = match.groups()
        try:
            value = float(number)
        except ValueError:
            raise ConfigError(f"--stop-at {text!r}: {number!r} is not a number") from None
        if not math.isfinite(value):
            raise ConfigError(f"--stop-at {text!r}: the value must be finite")
        return cls(metric, comparison, value)

    def reached(self, metrics: Mapping[str, object]) -> bool:
        """True when ``metrics`` (an aggregate record's) meet the target. A missing or unusable
        value (a failed or diverged evaluation is recorded as None) never does."""
        value = metrics.get(self.metric)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        return COMPARISONS[self.comparison](float(value), self.value)

    def __str__(self) -> str:
        return f"{self.metric}{self.comparison}{self.value:g}"


def stop_target(text: str, *, task: str, evaluates: bool) -> StopTarget | None:
    """The ``--stop-at`` setting, checked before anything is opened (ConfigError); None if unset."""
    if not text.strip():
        return None
    target = StopTarget.parse(text)
    known = recorded_metrics(task)
    if target.metric not in known:
        raise ConfigError(f"--stop-at {text!r}: task {task} records no metric {target.metric!r}; "
                          f"choose from {', '.join(known)}")
    if target.metric.startswith("test_") and not evaluates:
        raise ConfigError(f"--stop-at {text!r}: test_* metrics come from the coordinator's own evaluation, so add "
                          "--evaluate (needs torch), or stop at a clients_* metric (what the devices report)")
    return target
