"""Per-device acknowledgements: each device learns, signed, what became of its own updates."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from manual_clock import ManualClock
from test_coordinator import TOPICS, Harness, weights

from coordinator.acks import ACK_REPEAT_INTERVAL_S, MAX_VERDICTS, AckPublisher, DeviceAcks
from federation import envelope
from federation.envelope import EnvelopeError
from federation.keys import CoordinatorKeys
from federation.verdicts import ACCEPTED


def latest_ack(h: Harness, device: str) -> dict[str, Any]:
    payloads = [p for t, p, r in h.published if t == TOPICS.ack(device)]
    assert payloads, f"no acknowledgement published for {device}"
    assert all(r for t, p, r in h.published if t == TOPICS.ack(device)), "acknowledgements are retained"
    bundle = h.devices[device]
    return envelope.open_ack(payloads[-1], bundle.coordinator.sign_public, fleet=bundle.fleet, device=device)


def msg_id_of(payload: bytes) -> str:
    return envelope.parse_update(payload, max_bytes=len(payload)).header.msg_id.hex()


def test_a_device_learns_its_registration_acceptance_and_the_reason_for_a_stale_update(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    ack = latest_ack(h, "dev-a")
    assert ack["registered"] is not None and ack["updates"] == {}
    first = h.update("dev-a", 1, weights(1.0))
    assert h.send("dev-a", first).accepted
    assert latest_ack(h, "dev-a")["updates"][msg_id_of(first)] == {"round": 1, "verdict": ACCEPTED}
    assert h.send("dev-b", h.update("dev-b", 1, weights(2.0))).accepted  # round 1 closes
    late = h.update("dev-c", 1, weights(3.0))
    assert not h.send("dev-c", late).accepted
    ack_c = latest_ack(h, "dev-c")
    assert ack_c["updates"][msg_id_of(late)] == {"round": 1, "verdict": "stale_round"}
    assert ack_c["round"] == 2
    # Nothing about other devices leaks into a device's acknowledgement.
    assert "dev-a" not in str(ack_c) and "dev-b" not in str(ack_c)


def test_a_resent_accepted_update_is_answered_accepted_again_but_not_more_than_once_a_second(
        tmp_path: Path) -> None:
    h = Harness(tmp_path)
    update = h.update("dev-a", 1, weights(1.0))
    assert h.send("dev-a", update).accepted
    count = sum(1 for t, _, _ in h.published if t == TOPICS.ack("dev-a"))
    for _ in range(5):
        outcome = h.send("dev-a", update)
        assert outcome.reason == "replay"
    assert sum(1 for t, _, _ in h.published if t == TOPICS.ack("dev-a")) == count  # within the same second
    h.clock.t += 1.5
    h.send("dev-a", update)
    assert sum(1 for t, _, _ in h.published if t == TOPICS.ack("dev-a")) == count + 1
    assert latest_ack(h, "dev-a")["updates"][msg_id_of(update)]["verdict"] == ACCEPTED


def test_unauthenticated_junk_gets_no_acknowledgement(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    before = len(h.published)
    other = h.update("dev-b", 1, weights(1.0))
    h.send("dev-a", b"junk")
    h.send("dev-a", other)  # dev-b's genuine update on dev-a's topic: topic_mismatch, before any key check
    assert not any(t == TOPICS.ack("dev-a") for t, _, _ in h.published[before:])


def test_a_restart_republishes_the_acknowledgement_of_updates_accepted_in_the_open_round(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    update = h.update("dev-a", 1, weights(1.0))
    assert h.send("dev-a", update).accepted
    h.published.clear()
    h.coordinator = h.build(register=False)  # a restart
    assert latest_ack(h, "dev-a")["updates"][msg_id_of(update)]["verdict"] == ACCEPTED
    assert latest_ack(h, "dev-a")["registered"] is not None  # known from the ledger


def test_acknowledgement_is_signed_for_one_device_and_kept_apart_from_the_status() -> None:
    keys = CoordinatorKeys.generate("f")
    other = CoordinatorKeys.generate("f")
    body = DeviceAcks("f").body("dev-a", open_round=3, now=1.0)
    sealed = envelope.seal_ack(keys, body)
    assert envelope.open_ack(sealed, keys.public.sign_public, fleet="f", device="dev-a")["round"] == 3
    with pytest.raises(EnvelopeError, match="dev-a"):
        envelope.open_ack(sealed, keys.public.sign_public, fleet="f", device="dev-b")
    with pytest.raises(EnvelopeError):
        envelope.open_ack(sealed, other.public.sign_public, fleet="f", device="dev-a")
    # A status signature does not pass for an acknowledgement, nor the other way round.
    status = envelope.seal_status(keys, body)
    with pytest.raises(EnvelopeError):
        envelope.open_ack(status, keys.public.sign_public, fleet="f", device="dev-a")
    with pytest.raises(EnvelopeError):
        envelope.open_status(sealed, keys.public.sign_public)
    with pytest.raises(EnvelopeError, match="oversized"):
        envelope.open_ack(b" " * (envelope.MAX_SIGNED_JSON_BYTES + 1), keys.public.sign_public, fleet="f",
                          device="dev-a")


def test_verdicts_are_bounded_and_accepted_is_never_overwritten() -> None:
    acks = DeviceAcks("f")
    assert acks.verdict("d", 1, b"\x01" * 16, ACCEPTED)
    assert not acks.verdict("d", 1, b"\x01" * 16, "decrypt_failed")  # a broken copy of an accepted update
    assert acks.verdict("d", 1, b"\x02" * 16, "decrypt_failed")
    assert acks.verdict("d", 1, b"\x02" * 16, ACCEPTED)  # the genuine one, resent, is accepted
    for i in range(3, 3 + 2 * MAX_VERDICTS):
        acks.verdict("d", i, bytes([i]) * 16, "stale_round")
    updates = acks.body("d", open_round=1, now=0.0)["updates"]
    assert len(updates) == MAX_VERDICTS
    assert (bytes([2 + 2 * MAX_VERDICTS]) * 16).hex() in updates  # the newest are kept


def test_the_ack_publisher_tells_news_at_once_and_repeats_an_unchanged_ack_at_most_once_a_second() -> None:
    clock = ManualClock()
    sent: list[tuple[str, dict[str, Any]]] = []
    publisher = AckPublisher(DeviceAcks("f"), lambda device, body: sent.append((device, body)), clock, lambda: 4)
    publisher.verdict("dev-a", 4, b"\x01", ACCEPTED)
    assert sent == [("dev-a", {"fleet": "f", "device": "dev-a", "round": 4, "registered": None,
                               "updates": {"01": {"round": 4, "verdict": ACCEPTED}}, "time": clock.t})]
    publisher.verdict("dev-a", 4, b"\x01", ACCEPTED)  # a resend, answered already
    publisher.repeat("dev-a")
    assert len(sent) == 1 and not publisher.repeat_due("dev-a", clock.t + ACK_REPEAT_INTERVAL_S * 0.99)
    publisher.verdict("dev-a", 4, b"\x02", "stale_round")  # news goes out at once
    assert len(sent) == 2 and sent[-1][1]["updates"]["02"]["verdict"] == "stale_round"
    clock.t += ACK_REPEAT_INTERVAL_S
    publisher.verdict("dev-a", 4, b"\x01", ACCEPTED)
    assert len(sent) == 3
    assert publisher.repeat_due("dev-b", clock.t)  # never told: due
    publisher.acks.registered("dev-b", b"\xbb")
    publisher.publish("dev-b")
    sent.clear()
    publisher.publish_all()  # after a reconnect: every device told, in order
    assert [device for device, _ in sent] == ["dev-a", "dev-b"] and sent[1][1]["registered"] == "bb"
