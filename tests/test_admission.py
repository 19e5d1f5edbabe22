"""Admission verdicts (coordinator/admission.py): pure, no ledger, no broker, no disk."""

from __future__ import annotations

import hashlib
from dataclasses import replace

import msgpack
import numpy as np
import pytest

from coordinator.admission import MAX_REGISTRATIONS_PER_ROUND, MAX_REJECTION_RECORDS, Admission, UpdateVerdict
from coordinator.rounds import RoundPolicy, RoundState
from federation import crypto, deltas, envelope
from federation.codec import encode_tensors, spec_of
from federation.fleet_state import FleetState, Registration
from federation.keys import CoordinatorKeys, DeviceBundle, DeviceRegistry
from federation.topics import Topics

FLEET = "adm"
TOPICS = Topics(FLEET)
DATASET = hashlib.sha256(b"data").digest()
MODEL = {"w": np.zeros((2, 2), np.float32)}


class Fleet:
    def __init__(self) -> None:
        self.keys = CoordinatorKeys.generate(FLEET)
        self.registry = DeviceRegistry()
        self.devices: dict[str, DeviceBundle] = {}
        for name in ("dev-a", "dev-b"):
            seed, public = crypto.ed25519_generate()
            self.registry.add(name, public)
            self.devices[name] = DeviceBundle(FLEET, name, seed, self.keys.public, self.keys.model_key_id,
                                              self.keys.model_key)
        self.state = FleetState()
        self.state.datasets["dev-a"] = Registration(DATASET, 1.0, self.devices["dev-a"].key_id)
        self.state.published_models[3] = deltas.model_sha256(MODEL)  # the base of round 3's deltas
        self.round = RoundState(3, 0.0, RoundPolicy(min_clients=2))
        self.admission = Admission(FLEET, self.keys, TOPICS, max_update_bytes=1 << 20)

    def update(self, device: str = "dev-a", round_number: int = 3, value: float = 1.0, n: int = 10,
               shape: tuple[int, ...] = (2, 2), metrics: dict[str, float] | None = None) -> bytes:
        change = {"w": np.full(shape, value, np.float32)}  # a delta against MODEL (zeros), of any shape
        return envelope.seal_update(self.devices[device], round_number, encode_tensors(change), n,
                                    metrics or {"train_loss": 0.5}, dataset_sha256=DATASET,
                                    base_sha256=deltas.model_sha256(MODEL))

    def judge(self, payload: bytes, device: str = "dev-a", done: bool = False) -> UpdateVerdict:
        return self.admission.update(TOPICS.update(device), payload, registry=self.registry, round=self.round,
                                     state=self.state, spec=spec_of(MODEL), done=done)


@pytest.fixture
def fleet() -> Fleet:
    return Fleet()


def test_a_good_update_is_accepted_with_its_checked_weights(fleet: Fleet) -> None:
    verdict = fleet.judge(fleet.update(value=2.0))
    assert verdict.accepted and verdict.authenticated and verdict.device == "dev-a" and verdict.round == 3
    assert verdict.weights is not None
    np.testing.assert_array_equal(verdict.weights["w"], np.full((2, 2), 2.0, np.float32))


def test_unauthenticated_rejections_are_neither_recorded_nor_answered(fleet: Fleet) -> None:
    good = fleet.update()
    cases = {
        "malformed": (b"\x00junk", "dev-a"),
        "topic_mismatch": (good, "dev-b"),  # dev-a's update on dev-b's topic
        "bad_signature": (good[:-40] + bytes(40), "dev-a"),
    }
    for reason, (payload, topic_device) in cases.items():
        verdict = fleet.judge(payload, device=topic_device)
        assert not verdict.accepted and not verdict.authenticated and not verdict.record, reason
    unknown = DeviceBundle(FLEET, "dev-a", crypto.ed25519_generate()[0], fleet.keys.public, fleet.keys.model_key_id,
                           fleet.keys.model_key)
    payload = deltas.seal_trained(unknown, 3, MODEL, MODEL, 1, {}, dataset_sha256=DATASET)
    assert fleet.judge(payload).reason == "unknown_key"


def test_authenticated_rejections_say_why_and_are_recorded_except_a_replay(fleet: Fleet) -> None:
    assert fleet.judge(fleet.update(round_number=2)).reason == "stale_round"
    assert fleet.judge(fleet.update(n=0)).reason == "bad_sample_count"
    assert fleet.judge(fleet.update(metrics={"loss": float("nan")})).reason == "bad_metrics"
    assert fleet.judge(fleet.update(shape=(3, 2))).reason == "bad_tensors"
    assert fleet.judge(fleet.update(), done=True).reason == "training_done"
    assert fleet.judge(fleet.update("dev-b"), device="dev-b").reason == "dataset_not_registered"
    for payload in (fleet.update(round_number=2), fleet.update(shape=(3, 2))):
        verdict = fleet.judge(payload)
        assert verdict.authenticated and verdict.record and verdict.weights is None
    payload = fleet.update()
    sealed = envelope.parse_update(payload, max_bytes=1 << 20)
    fleet.state.accepted_msg_ids.add(sealed.header.msg_id)
    replay = fleet.judge(payload)
    assert replay.reason == "replay" and replay.authenticated and not replay.record


def test_rejection_records_are_once_per_message_and_capped_per_round() -> None:
    state = FleetState()
    assert Admission.may_record_rejection(state, "dev-a", b"m" * 16)
    state.rejected_msg_ids.add(b"m" * 16)
    assert not Admission.may_record_rejection(state, "dev-a", b"m" * 16)
    state.rejections_this_round["dev-a"] = MAX_REJECTION_RECORDS
    assert not Admission.may_record_rejection(state, "dev-a", b"n" * 16)
    assert Admission.may_record_rejection(state, "dev-b", b"n" * 16)


def test_registration_verdicts(fleet: Fleet) -> None:
    bundle = fleet.devices["dev-b"]
    payload = envelope.seal_dataset(bundle, DATASET, 10, {"task": "unit"})
    verdict = fleet.admission.registration(TOPICS.register("dev-b"), payload, registry=fleet.registry)
    assert verdict.reason == "register" and verdict.statement is not None
    assert fleet.admission.registration(TOPICS.register("dev-a"), payload,
                                         registry=fleet.registry).reason == "registration_topic_mismatch"
    statement = verdict.statement
    news = Admission.registration_news
    assert news(statement, registry=fleet.registry, state=fleet.state, now=statement.created).reason == "register"
    assert news(statement, registry=fleet.registry, state=fleet.state,
                now=statement.created - 3600).reason == "registration_from_future"
    fleet.state.datasets["dev-b"] = Registration(DATASET, statement.created, bundle.key_id)
    assert news(statement, registry=fleet.registry, state=fleet.state,
                now=statement.created).reason == "already_registered"
    older = replace(statement, sha256=bytes(32))
    assert news(older, registry=fleet.registry, state=fleet.state,
                now=statement.created).reason == "registration_stale"
    newer = replace(statement, sha256=bytes(32), created=statement.created + 1)
    fleet.state.registrations_this_round[("dev-b", bundle.key_id)] = MAX_REGISTRATIONS_PER_ROUND
    assert news(newer, registry=fleet.registry, state=fleet.state,
                now=newer.created).reason == "registration_rate"


def test_opening_ahead_changes_no_verdict_even_when_the_state_moves_on_in_between(fleet: Fleet) -> None:
    """The daemon opens the next batch (signature, decryption) while the one before is made
    durable: the verdict must be the one reached without opening ahead, with the state as it is
    when the verdict is due, not as it was when the message was opened."""
    spec = spec_of(MODEL)
    good = fleet.update(value=2.0)
    tampered = bytearray(fleet.update())
    tampered[-30] ^= 1  # in the ciphertext or its tag: signed header intact, decryption fails
    outer = msgpack.unpackb(good)
    forged = msgpack.packb({**outer, "sig": bytes(64)})
    messages = {
        "accepted": (good, "dev-a"), "decrypt_failed": (bytes(tampered), "dev-a"),
        "bad_tensors": (fleet.update(shape=(3, 2)), "dev-a"), "malformed": (b"\x00junk", "dev-a"),
        "topic_mismatch": (good, "dev-b"), "bad_signature": (forged, "dev-a"),
        "stale_round": (fleet.update(round_number=2), "dev-a"), "future_round": (fleet.update(round_number=4), "dev-a"),
        "dataset_not_registered": (fleet.update("dev-b"), "dev-b"),
    }

    def both(payload: bytes, device: str) -> tuple[UpdateVerdict, UpdateVerdict]:
        opened = fleet.admission.open_ahead(TOPICS.update(device), payload, registry=fleet.registry,
                                            round=fleet.round, state=fleet.state, spec=spec)
        ahead = fleet.admission.update(TOPICS.update(device), payload, registry=fleet.registry, round=fleet.round,
                                       state=fleet.state, spec=spec, done=False, opened=opened)
        return ahead, fleet.judge(payload, device=device)

    def same(a: UpdateVerdict, b: UpdateVerdict) -> bool:
        return (a.reason, a.detail, a.device, a.round, a.record, a.authenticated) == \
            (b.reason, b.detail, b.device, b.round, b.record, b.authenticated) and \
            (a.weights is None) == (b.weights is None)

    for reason, (payload, device) in messages.items():
        ahead, now = both(payload, device)
        assert ahead.reason == reason and same(ahead, now), reason
    # Opened while acceptable; by the time it is judged the state has moved on: a replay, or the
    # device's key revoked; opened for round 4 while 3 was open, judged once 4 is open.
    opened = fleet.admission.open_ahead(TOPICS.update("dev-a"), good, registry=fleet.registry, round=fleet.round,
                                        state=fleet.state, spec=spec)
    assert opened.weights is not None  # it was decrypted ahead
    fleet.state.accepted_msg_ids.add(envelope.parse_update(good, max_bytes=1 << 20).header.msg_id)
    verdict = fleet.admission.update(TOPICS.update("dev-a"), good, registry=fleet.registry, round=fleet.round,
                                     state=fleet.state, spec=spec, done=False, opened=opened)
    assert verdict.reason == "replay" and not verdict.record
    fresh = fleet.update(value=3.0)
    opened = fleet.admission.open_ahead(TOPICS.update("dev-a"), fresh, registry=fleet.registry, round=fleet.round,
                                        state=fleet.state, spec=spec)
    _, public = crypto.ed25519_generate()
    rotated = DeviceRegistry()
    rotated.add("dev-a", public)  # dev-a's key replaced: the signature checked ahead no longer counts
    verdict = fleet.admission.update(TOPICS.update("dev-a"), fresh, registry=rotated, round=fleet.round,
                                     state=fleet.state, spec=spec, done=False, opened=opened)
    assert verdict.reason == "unknown_key"
    later = fleet.update(round_number=4, value=4.0)
    opened = fleet.admission.open_ahead(TOPICS.update("dev-a"), later, registry=fleet.registry, round=fleet.round,
                                        state=fleet.state, spec=spec)
    assert opened.weights is None  # not for the open round: not decrypted ahead
    fleet.state.published_models[4] = deltas.model_sha256(MODEL)
    verdict = fleet.admission.update(TOPICS.update("dev-a"), later, registry=fleet.registry,
                                     round=RoundState(4, 0.0, RoundPolicy(min_clients=2)), state=fleet.state, spec=spec,
                                     done=False, opened=opened)
    assert verdict.accepted and verdict.weights is not None
    np.testing.assert_array_equal(verdict.weights["w"], np.full((2, 2), 4.0, np.float32))
