"""What a coordinator may answer about one update, as both roles read it (see the ``ack`` topic)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from federation.records import AGGREGATE

ACCEPTED = "accepted"

# Reasons after which sending the same update again cannot help: the agent drops it from its
# outbox. Any other reason (halted, storage_error, internal_error, dataset_not_registered, ...)
# is transient or fixable by the agent, which keeps the update and sends it again.
FINAL_REASONS = frozenset({
    "stale_round", "future_round", "duplicate_in_round", "training_done", "bad_sample_count",
    "bad_metrics", "bad_tensors", "wrong_key", "digest_mismatch", "unsupported_version", "wrong_base",
    "too_stale",
})
# Not final: decrypt_failed. The ciphertext is not signed, so anyone who saw a genuine update can
# send a broken copy first; the genuine one, sent again, is still accepted.

# One line for the device's log: what the reason means for the operator of that device.
EXPLANATIONS = {
    "stale_round": "it arrived after its round had closed (training took longer than the round stayed open)",
    "future_round": "it names a round the coordinator has not opened",
    "duplicate_in_round": "the coordinator already counted another update of this device in that round",
    "training_done": "the federation has finished its rounds",
    "bad_metrics": "its reported metrics are not finite or are out of range (did training diverge?)",
    "bad_tensors": "its weights do not match the global model's tensors",
    "dataset_not_registered": "the coordinator has no registration of this data set; registering again",
    "unsupported_version": "the coordinator does not take this agent's update format (update envelope v2 sends a "
                           "delta against a named base model): upgrade the agent, or the coordinator",
    "wrong_base": "the delta names a base model other than the one the coordinator published for that version",
    "too_stale": "it was trained from a model more versions behind than the coordinator's --max-staleness",
}


@dataclass(frozen=True)
class LeftOut:
    """An accepted update that its round's aggregate did not use: the round, the strategy's
    reason (``distance``, ``krum_score``, ...) and the numbers it recorded with it."""

    round: int
    reason: str
    numbers: dict[str, Any]

    def __str__(self) -> str:
        """``distance (distance 1.895, factor 5.959, ...)``: the reason, then its numbers."""
        return f"{self.reason} (" + ", ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in self.numbers.items()) + ")"


def left_out(block: object, device: str) -> LeftOut | None:
    """Whether ``device``'s accepted update was left out of an aggregate, and why.

    ``block`` is the data of the signed ledger block a model travels with
    (``ModelHeader.block_data``): an ``aggregate`` block names, under ``excluded``, each device
    whose update a robust strategy accepted and then left out, with the reason and numbers. An
    edge agent reads its own entry there, and so does a gateway (the device of its upstream).
    None if the block is no aggregate, does not name the device as excluded (a clipped update
    was still used), or is malformed (never raises: it comes from the network)."""
    if not isinstance(block, dict) or block.get("type") != AGGREGATE:
        return None
    excluded, round_number = block.get("excluded"), block.get("round")
    why = excluded.get(device) if isinstance(excluded, dict) else None
    if not isinstance(why, dict) or not isinstance(round_number, int) or isinstance(round_number, bool):
        return None
    reason = why.get("reason")
    return LeftOut(round_number, reason if isinstance(reason, str) else "no reason given",
                   {str(k): v for k, v in why.items() if k not in ("action", "reason")})
