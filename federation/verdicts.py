"""What a coordinator may answer about one update, as both roles read it (see the ``ack`` topic)."""

from __future__ import annotations

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
