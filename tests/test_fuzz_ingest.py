"""Fuzz the coordinator's input path (updates and dataset registrations) in process.

Random bytes and mutated valid envelopes (flipped bytes, truncations, swapped msgpack fields,
changed header fields, wrong types, and headers changed *and re-signed* by a genuine device)
go straight into :meth:`Coordinator.handle_update` / :meth:`Coordinator.handle_registration`.
After every case: no exception escaped, no ``internal_error``, nothing accepted unless it is
the genuine update unchanged in every signed or encrypted byte, the global model is byte for
byte the same, the ledger grew only by ``update.rejected`` records of authenticated senders
(at most one per message id), and the rejection counter of the reported reason grew by one.

Each hypothesis example carries a batch of mutations, so tens of thousands of cases run in
seconds; ``derandomize=True`` keeps CI stable.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coordinator.rounds import RoundPolicy
from coordinator.service import Coordinator, CoordinatorSettings
from coordinator.storage import ModelStore, Spool
from federation import crypto, deltas, envelope
from federation.codec import encode_tensors
from federation.fleet_state import FleetLedger, verify_file
from federation.keys import CoordinatorKeys, DeviceBundle, DeviceRegistry
from federation.topics import Topics
from ledger import Ed25519Signer

FLEET = "fuzz"
TOPICS = Topics(FLEET)
DATASET = hashlib.sha256(b"fuzz data").digest()
DEVICES = ("dev-a", "dev-b")
BATCH = 16  # cases per hypothesis example


def _model() -> dict[str, np.ndarray]:
    return {"w": np.zeros((4, 3), np.float32), "b": np.zeros(3, np.float32)}


def _weights(value: float) -> dict[str, np.ndarray]:
    return {"w": np.full((4, 3), value, np.float32), "b": np.full(3, value, np.float32)}


class Target:
    """A coordinator on a temporary state directory, with one genuine update and registration to mutate."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.keys = CoordinatorKeys.generate(FLEET)
        self.registry = DeviceRegistry()
        self.bundles: dict[str, DeviceBundle] = {}
        for name in DEVICES:
            seed, public = crypto.ed25519_generate()
            self.registry.add(name, public)
            self.bundles[name] = DeviceBundle(FLEET, name, seed, self.keys.public, self.keys.model_key_id,
                                              self.keys.model_key)
        self.ledger = FleetLedger.open(tmp / "ledger.log", signer=Ed25519Signer(self.keys.sign_seed), fleet=FLEET,
                                  sync_every=0)  # fsync per block is not what is under test here
        # min_clients above the number of devices and no deadline: the round never closes, so
        # the global model may only change if something wrongly got accepted.
        start = time.time()  # a fixed coordinator clock, near the real one registrations carry
        self.coordinator = Coordinator(
            CoordinatorSettings(FLEET, RoundPolicy(min_clients=3, quorum=3, deadline_s=0), max_update_bytes=1 << 16),
            self.keys, self.registry, self.ledger, ModelStore(tmp / "models"), Spool(tmp / "spool"),
            initial_model=_model, publish=lambda t, p, r: None, topics=TOPICS, now=lambda: start,
        )
        self.coordinator.start()
        for name, bundle in self.bundles.items():
            outcome = self.coordinator.handle_registration(
                TOPICS.register(name), envelope.seal_dataset(bundle, DATASET, 100, {"task": "fuzz"}))
            assert outcome.accepted
        self.valid_update = envelope.seal_update(self.bundles["dev-a"], 1, encode_tensors(_weights(1.0)), 10,
                                                 {"train_loss": 0.5}, dataset_sha256=DATASET,
                                                 base_sha256=deltas.model_sha256(_model()))
        self.valid_registration = envelope.seal_dataset(self.bundles["dev-a"], DATASET, 100, {"task": "fuzz"})
        self.model_bytes = encode_tensors(self.coordinator.global_model)
        self.recorded_msg_ids: set[bytes] = set()
        self.cases = 0
        self.accepted = 0

    # -- the oracle -------------------------------------------------------------------------------
    def check_update(self, topic: str, payload: bytes) -> None:
        c = self.coordinator
        height = self.ledger.height
        before = c.rejections.copy()
        outcome = c.handle_update(topic, payload)
        self.cases += 1
        assert outcome.reason != "internal_error", payload
        assert encode_tensors(c.global_model) == self.model_bytes
        new = self.ledger.blocks(height)
        if outcome.accepted:
            # Only the genuine update may get in: same statement, signature, ciphertext and tag
            # (outer map order or extra outer keys are not covered by the signature and harmless).
            self._assert_genuine(topic, payload)
            self.accepted += 1
            assert [b.data["type"] for b in new] == ["update"]
            assert sum(c.rejections.values()) == sum(before.values())
            return
        assert c.rejections[outcome.reason] == before[outcome.reason] + 1
        assert sum(c.rejections.values()) == sum(before.values()) + 1
        assert len(new) <= 1, [b.data for b in new]
        for block in new:
            # Only an authenticated sender's rejection reaches the ledger, once per message id.
            data = block.data
            assert data["type"] == "update.rejected" and data["reason"] == outcome.reason
            assert data["device"] in DEVICES
            msg_id = data.get("msg_id")
            assert isinstance(msg_id, bytes) and msg_id not in self.recorded_msg_ids
            self.recorded_msg_ids.add(msg_id)

    def _assert_genuine(self, topic: str, payload: bytes) -> None:
        assert topic == TOPICS.update("dev-a")
        got = msgpack.unpackb(payload, raw=False)
        want = msgpack.unpackb(self.valid_update, raw=False)
        for key in ("fmt", "v", "hdr", "sig", "ct", "tag"):
            assert got[key] == want[key]

    def check_registration(self, topic: str, payload: bytes) -> None:
        c = self.coordinator
        height = self.ledger.height
        before = sum(c.rejections.values())
        datasets = dict(c.datasets)
        outcome = c.handle_registration(topic, payload)
        self.cases += 1
        assert outcome.reason != "internal_error"
        assert c.datasets == datasets
        assert self.ledger.height == height  # a resend of the genuine registration records nothing
        if outcome.accepted:
            assert outcome.reason == "already_registered"
        else:
            assert sum(c.rejections.values()) == before + 1
            assert c.rejections[outcome.reason] >= 1


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    # Every rejection logs a WARNING; tens of thousands of them would dominate the run time.
    service_log = logging.getLogger("coordinator.service")
    level = service_log.level
    service_log.setLevel(logging.CRITICAL)
    try:
        yield Target(tmp_path_factory.mktemp("fuzz"))
    finally:
        service_log.setLevel(level)


# -- mutations ------------------------------------------------------------------------------------

JUNK_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(allow_nan=True), st.binary(max_size=40),
    st.text(max_size=20), st.lists(st.integers(-(2**63), 2**63 - 1), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(-(2**63), 2**63 - 1), max_size=3),
)
UPDATE_OUTER = ("fmt", "v", "hdr", "sig", "ct", "tag")
UPDATE_HDR = ("fleet", "device", "round", "key_id", "msg_id", "epk", "to", "iv", "weights_sha256", "num_samples",
              "metrics", "codec", "created", "dataset_sha256")
RESIGNED_VALUES = [
    ("round", 0), ("round", -1), ("round", 2), ("round", 2**63 - 1), ("num_samples", 0), ("num_samples", -3),
    ("metrics", {"train_loss": float("nan")}), ("metrics", {"train_loss": float("inf")}), ("metrics", {}),
    ("weights_sha256", bytes(32)), ("to", "0000000000000000"), ("iv", bytes(12)), ("epk", bytes(32)),
    ("epk", b"\x01" * 32), ("dataset_sha256", bytes(32)), ("fleet", "other"), ("codec", 2), ("created", 0.0),
    ("key_id", "0123456789abcdef"),
]


def _flip(data: bytes, draw: Any) -> bytes:
    buf = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(buf) - 1))
        buf[i] ^= draw(st.integers(1, 255))
    return bytes(buf)


TOPIC_CHOICES = st.sampled_from([TOPICS.update("dev-a"), TOPICS.update("dev-a"), TOPICS.update("dev-b"),
                                 TOPICS.update("ghost"), "fledger/other/update/dev-a", "junk"])


@st.composite
def mutated_update(draw: Any, valid: bytes, bundles: dict[str, DeviceBundle]) -> tuple[str, bytes]:
    """A topic and a payload: mostly the genuine update's topic, sometimes another."""
    topic = draw(TOPIC_CHOICES)
    outer = msgpack.unpackb(valid, raw=False)
    hdr = msgpack.unpackb(outer["hdr"], raw=False)
    kind = draw(st.sampled_from(["random", "flip", "truncate", "swap_outer", "outer_field", "drop_outer",
                                 "hdr_field", "swap_hdr", "flip_inner", "resigned"]))
    if kind == "random":
        return topic, bytes(draw(st.binary(max_size=300)))
    if kind == "flip":
        return topic, _flip(valid, draw)
    if kind == "truncate":
        return topic, valid[:draw(st.integers(0, len(valid) - 1))]
    if kind == "swap_outer":
        a, b = draw(st.lists(st.sampled_from(UPDATE_OUTER), min_size=2, max_size=2, unique=True))
        outer[a], outer[b] = outer[b], outer[a]
    elif kind == "outer_field":
        outer[draw(st.sampled_from(UPDATE_OUTER))] = draw(JUNK_VALUES)
    elif kind == "drop_outer":
        del outer[draw(st.sampled_from(UPDATE_OUTER))]
    elif kind == "flip_inner":  # corrupt one of the byte fields, keep the structure
        name = draw(st.sampled_from(("hdr", "sig", "ct", "tag")))
        outer[name] = _flip(outer[name], draw) if outer[name] else b"\x00"
    elif kind in ("hdr_field", "swap_hdr", "resigned"):
        device = "dev-a"
        if kind == "resigned":
            # Either device, on its own topic, often with a fresh message id so that the checks
            # after the replay check (round, samples, metrics, keys, digest) are reached.
            device = draw(st.sampled_from(DEVICES))
            hdr.update(device=device, key_id=bundles[device].key_id)
            if draw(st.booleans()):
                hdr["msg_id"] = draw(st.binary(min_size=16, max_size=16))
            if draw(st.integers(0, 4)):
                topic = TOPICS.update(device)
        if kind == "swap_hdr":
            a, b = draw(st.lists(st.sampled_from(UPDATE_HDR), min_size=2, max_size=2, unique=True))
            hdr[a], hdr[b] = hdr[b], hdr[a]
        elif kind == "resigned" and draw(st.booleans()):
            # Well-typed but wrong values, so the checks after parsing are all reached.
            name, value = draw(st.sampled_from(RESIGNED_VALUES))
            hdr[name] = value
        else:
            hdr[draw(st.sampled_from(UPDATE_HDR))] = draw(JUNK_VALUES)
        outer["hdr"] = msgpack.packb(hdr, use_bin_type=True)
        if kind == "resigned":
            # The genuine device signed a broken statement (a buggy or malicious device): it is
            # authenticated, and must still be refused (the AEAD binds the header, so any change
            # breaks decryption even where the field itself would pass).
            outer["sig"] = bundles[device].sign(outer["hdr"])
    return topic, msgpack.packb(outer, use_bin_type=True)


@st.composite
def mutated_registration(draw: Any, valid: bytes) -> bytes:
    outer = msgpack.unpackb(valid, raw=False)
    hdr = msgpack.unpackb(outer["hdr"], raw=False)
    kind = draw(st.sampled_from(["random", "flip", "truncate", "outer_field", "hdr_field", "drop_outer"]))
    if kind == "random":
        return bytes(draw(st.binary(max_size=200)))
    if kind == "flip":
        return _flip(valid, draw)
    if kind == "truncate":
        return valid[:draw(st.integers(0, len(valid) - 1))]
    if kind == "outer_field":
        outer[draw(st.sampled_from(("fmt", "v", "hdr", "sig")))] = draw(JUNK_VALUES)
    elif kind == "drop_outer":
        del outer[draw(st.sampled_from(("fmt", "v", "hdr", "sig")))]
    else:
        hdr[draw(st.sampled_from(("fleet", "device", "key_id", "msg_id", "sha256", "size", "schema", "created")))] = \
            draw(JUNK_VALUES)
        outer["hdr"] = msgpack.packb(hdr, use_bin_type=True)
    return msgpack.packb(outer, use_bin_type=True)


@settings(max_examples=1200, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_fuzzed_updates_change_nothing(target: Target, data: st.DataObject) -> None:
    strategy = mutated_update(target.valid_update, target.bundles)
    for _ in range(BATCH):
        target.check_update(*data.draw(strategy))


@settings(max_examples=400, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_fuzzed_registrations_change_nothing(target: Target, data: st.DataObject) -> None:
    strategy = mutated_registration(target.valid_registration)
    for _ in range(BATCH):
        topic = data.draw(st.sampled_from([TOPICS.register("dev-a"), TOPICS.register("dev-b"), "junk"]))
        target.check_registration(topic, data.draw(strategy))


def test_fuzz_summary_and_chain(target: Target) -> None:
    """Runs after the two fuzzers (same module fixture): the totals, and the chain still verifies."""
    c = target.coordinator
    assert target.cases >= 25_000, target.cases
    # The genuine update is never accepted twice, and the round never closed.
    assert target.accepted <= 1 and c.round is not None and c.round.number == 1
    assert encode_tensors(c.global_model) == target.model_bytes
    kinds = [b.data["type"] for b in target.ledger]
    assert kinds.count("update") == target.accepted
    # Many reasons were exercised, each counted.
    # Each well-typed wrong value once, deterministically, from dev-b (whose genuine update is
    # never sent, so no duplicate_in_round hides the later checks): which reasons the random
    # cases reach depends on their order (once dev-a's genuine update is in, its later ones
    # stop at duplicate_in_round), and that order is not the same in every checkout.
    genuine_b = msgpack.unpackb(envelope.seal_update(target.bundles["dev-b"], 1, encode_tensors(_weights(2.0)), 10,
                                                     {"train_loss": 0.5}, dataset_sha256=DATASET,
                                                     base_sha256=deltas.model_sha256(_model())), raw=False)
    for name, value in RESIGNED_VALUES:
        hdr = msgpack.unpackb(genuine_b["hdr"], raw=False)
        hdr.update({name: value, "msg_id": hashlib.sha256(repr((name, value)).encode()).digest()[:16]})
        outer = dict(genuine_b, hdr=msgpack.packb(hdr, use_bin_type=True))
        outer["sig"] = target.bundles["dev-b"].sign(outer["hdr"])
        target.check_update(TOPICS.update("dev-b"), msgpack.packb(outer, use_bin_type=True))
    # A byte-identical replay and a second update in the round, deterministically too: whether
    # random cases reach them depends on their order (a genuine update must be accepted first).
    genuine = envelope.seal_update(target.bundles["dev-b"], 1, encode_tensors(_weights(2.0)), 10,
                                   {"train_loss": 0.5}, dataset_sha256=DATASET,
                                   base_sha256=deltas.model_sha256(_model()))
    first = c.handle_update(TOPICS.update("dev-b"), genuine)
    assert first.accepted or first.reason == "duplicate_in_round", first
    assert c.handle_update(TOPICS.update("dev-b"), genuine).reason == "replay"
    another = envelope.seal_update(target.bundles["dev-b"], 1, encode_tensors(_weights(3.0)), 10,
                                   {"train_loss": 0.5}, dataset_sha256=DATASET,
                                   base_sha256=deltas.model_sha256(_model()))
    assert c.handle_update(TOPICS.update("dev-b"), another).reason == "duplicate_in_round"
    for reason in ("malformed", "unsupported_version", "wrong_fleet", "topic_mismatch", "unknown_key",
                   "bad_signature", "replay", "stale_round", "future_round", "duplicate_in_round", "decrypt_failed",
                   "bad_sample_count", "bad_metrics", "dataset_not_registered", "wrong_key",
                   "registration_malformed", "registration_bad_signature"):
        assert c.rejections[reason] > 0, (reason, dict(c.rejections))
    print(f"\nfuzz: {target.cases} cases, accepted {target.accepted}, rejections {dict(c.rejections)}, "
          f"ledger records {dict((k, kinds.count(k)) for k in set(kinds))}")
    target.ledger.sync()
    assert verify_file(target.tmp / "ledger.log").ok
