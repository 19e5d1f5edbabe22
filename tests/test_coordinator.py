"""The coordinator core without a network: every bad input is rejected, counted, and leaves
the global model and the ledger as they were; good input aggregates correctly, across restarts."""

from __future__ import annotations

import dataclasses
import hashlib
import time
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
from manual_clock import ManualClock

from coordinator import restore
from coordinator.aggregation import DEFAULT_STRATEGY
from coordinator.rounds import RoundPolicy
from coordinator.service import Coordinator, CoordinatorSettings
from coordinator.storage import ModelStore, Spool
from federation import crypto, deltas, envelope
from federation.codec import decode_tensors, encode_tensors, spec_of
from federation.fleet_state import FleetLedger, FleetState, verify_file
from federation.keys import CoordinatorKeys, DeviceBundle, DeviceRegistry
from federation.topics import Topics
from federation.verdicts import EXPLANATIONS, FINAL_REASONS
from ledger import Ed25519Signer
from ledger.verify import ChainState

FLEET = "unit"
DATASET = hashlib.sha256(b"a data set").digest()
TOPICS = Topics(FLEET)


def initial_model() -> dict[str, np.ndarray]:
    return {"w": np.zeros((4, 3), np.float32), "b": np.zeros(3, np.float32)}


class Harness:
    def __init__(self, tmp: Path, policy: RoundPolicy | None = None, max_rounds: int = 0,
                 strategy: str = DEFAULT_STRATEGY, mode: dict[str, Any] | None = None, gateway: bool = False) -> None:
        self.tmp = tmp
        self.strategy = strategy
        self.keys = CoordinatorKeys.generate(FLEET)
        self.registry = DeviceRegistry()
        self.devices: dict[str, DeviceBundle] = {}
        for name in ("dev-a", "dev-b", "dev-c"):
            seed, public = crypto.ed25519_generate()
            self.registry.add(name, public)
            self.devices[name] = DeviceBundle(FLEET, name, seed, self.keys.public, self.keys.model_key_id,
                                              self.keys.model_key)
        self.policy = policy or RoundPolicy(min_clients=2, quorum=1, deadline_s=0)
        self.max_rounds = max_rounds
        self.mode = mode or {}  # e.g. {"mode": "async", "max_staleness": 1}
        self.upstream: list[tuple[dict[str, np.ndarray], int]] = []  # what a gateway sent upstream
        self.send_upstream: Any = (lambda change, samples, metrics: self.upstream.append((change, samples))) \
            if gateway else None
        self.clock = ManualClock(time.time())  # registrations carry the real clock; deadlines are relative
        self.published: list[tuple[str, bytes, bool]] = []
        self.evaluate: Any = None
        self.coordinator = self.build()

    def build(self, register: bool = True) -> Coordinator:
        if hasattr(self, "ledger"):
            self.ledger.close()  # as if the old process had exited
        ledger = FleetLedger.open(self.tmp / "ledger.log", signer=Ed25519Signer(self.keys.sign_seed), fleet=FLEET,
                             now=self.clock)
        self.ledger = ledger
        coordinator = Coordinator(
            CoordinatorSettings(FLEET, self.policy, max_rounds=self.max_rounds, max_update_bytes=1 << 20,
                                strategy=self.strategy, **self.mode),
            self.keys, self.registry, ledger, ModelStore(self.tmp / "models"), Spool(self.tmp / "spool"),
            initial_model=initial_model, publish=lambda t, p, r: self.published.append((t, p, r)),
            topics=TOPICS, now=self.clock, evaluate=self.evaluate, send_upstream=self.send_upstream,
        )
        coordinator.start(restore.read_request(self.tmp))  # the daemon passes the pending restore request too
        for name, bundle in self.devices.items() if register else ():
            payload = envelope.seal_dataset(bundle, DATASET, 1234, {"task": "unit"})
            coordinator.handle_registration(TOPICS.register(name), payload)
        return coordinator

    def update(self, device: str, round_number: int, weights: dict[str, np.ndarray], n: int = 10,
               metrics: dict[str, float] | None = None, dataset: bytes = DATASET) -> bytes:
        base = self.base(round_number)
        if spec_of(weights) != spec_of(base):  # malformed on purpose: sent as the delta, as it is
            return envelope.seal_update(self.devices[device], round_number, encode_tensors(weights), n,
                                        metrics or {"train_loss": 0.5}, dataset_sha256=dataset,
                                        base_sha256=deltas.model_sha256(base))
        return deltas.seal_trained(self.devices[device], round_number, weights, base, n,
                                   metrics or {"train_loss": 0.5}, dataset_sha256=dataset)

    def base(self, round_number: int) -> dict[str, np.ndarray]:
        """The model round ``round_number`` trains from (the current one for a round not opened)."""
        return self.coordinator.models.load(round_number) or self.coordinator.global_model

    def send(self, device: str, payload: bytes) -> Any:
        return self.coordinator.handle_update(TOPICS.update(device), payload)

    def snapshot(self) -> tuple[int, bytes, bytes]:
        head = self.ledger.head
        return head.index, head.hash, encode_tensors(self.coordinator.global_model)


def weights(value: float) -> dict[str, np.ndarray]:
    return {"w": np.full((4, 3), value, np.float32), "b": np.full(3, value, np.float32)}


@pytest.fixture
def h(tmp_path: Path) -> Harness:
    return Harness(tmp_path)


def test_round_aggregates_weighted_by_samples_and_records_blocks(tmp_path: Path) -> None:
    h = Harness(tmp_path, strategy="fedavg")  # unbounded: the plain weighted mean
    assert h.send("dev-a", h.update("dev-a", 1, weights(1.0), n=10)).accepted
    assert h.send("dev-b", h.update("dev-b", 1, weights(4.0), n=30)).accepted
    assert h.coordinator.round is not None and h.coordinator.round.number == 2
    np.testing.assert_allclose(h.coordinator.global_model["w"], 3.25)  # (1*10 + 4*30) / 40
    kinds = [b.data["type"] for b in h.ledger]
    assert kinds.count("update") == 2 and kinds.count("aggregate") == 1
    aggregate = next(b for b in h.ledger if b.data["type"] == "aggregate")
    assert aggregate.data["participants"] == ["dev-a", "dev-b"]
    assert aggregate.data["model_sha256"] == hashlib.sha256(encode_tensors(h.coordinator.global_model)).digest()
    # The newest retained model on the model topic is round 2, signed, and opens for a device.
    model_msgs = [p for t, p, r in h.published if t == TOPICS.model and r]
    header, body = envelope.open_model(model_msgs[-1], h.devices["dev-a"], max_bytes=1 << 20)
    assert header.round == 2 and header.block_hash == aggregate.hash
    np.testing.assert_allclose(decode_tensors(body)["b"], 3.25)
    assert verify_file(h.tmp / "ledger.log").ok


def _flip_ct(payload: bytes) -> bytes:
    outer = msgpack.unpackb(payload)
    ct = bytearray(outer["ct"])
    ct[0] ^= 0xFF
    outer["ct"] = bytes(ct)
    return msgpack.packb(outer)


def _with_header(h: Harness, payload: bytes, **changes: Any) -> bytes:
    outer = msgpack.unpackb(payload)
    hdr = msgpack.unpackb(outer["hdr"])
    hdr.update(changes)
    outer["hdr"] = msgpack.packb(hdr)
    return msgpack.packb(outer)


BAD_INPUTS = {
    "malformed": lambda h: b"\x00\x01not msgpack",
    "malformed_map": lambda h: msgpack.packb({"fmt": "fledger.update", "v": 1, "hdr": 5}),
    "unsupported_version": lambda h: msgpack.packb({**msgpack.unpackb(h.update("dev-a", 1, weights(1))), "v": 9}),
    "decrypt_failed": lambda h: _flip_ct(h.update("dev-a", 1, weights(1))),
    "bad_signature": lambda h: _with_header(h, h.update("dev-a", 1, weights(1)), num_samples=10**6),
    "stale_round": lambda h: h.update("dev-a", 0, weights(1)),
    "future_round": lambda h: h.update("dev-a", 7, weights(1)),
    "bad_tensors_nan": lambda h: h.update("dev-a", 1, {"w": np.full((4, 3), np.nan, np.float32),
                                                       "b": np.zeros(3, np.float32)}),
    "bad_tensors_shape": lambda h: h.update("dev-a", 1, {"w": np.zeros((3, 4), np.float32),
                                                         "b": np.zeros(3, np.float32)}),
    "bad_tensors_dtype": lambda h: h.update("dev-a", 1, {"w": np.zeros((4, 3), np.float64),
                                                         "b": np.zeros(3, np.float32)}),
    "bad_metrics": lambda h: h.update("dev-a", 1, weights(1), metrics={"train_loss": float("nan")}),
    "bad_sample_count": lambda h: h.update("dev-a", 1, weights(1), n=0),
    "oversized": lambda h: b"\x00" * ((1 << 20) + 1),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_rejected_counted_and_changes_nothing(h: Harness, case: str) -> None:
    before_model = encode_tensors(h.coordinator.global_model)
    before_height = h.ledger.head.index
    outcome = h.send("dev-a", BAD_INPUTS[case](h))
    assert not outcome.accepted
    expected = case.removesuffix("_nan").removesuffix("_shape").removesuffix("_dtype").removesuffix("_map")
    assert outcome.reason == expected
    assert h.coordinator.rejections[expected] == 1
    assert encode_tensors(h.coordinator.global_model) == before_model
    assert h.coordinator.round is not None and not h.coordinator.round.accepted
    new_blocks = [b for b in h.ledger if b.index > before_height]
    # Authenticated senders' rejections are on the ledger (a signed record); junk never is.
    assert all(b.data["type"] == "update.rejected" for b in new_blocks)
    assert len(new_blocks) <= 1


def test_forged_device_and_wrong_topic_and_revoked_key(h: Harness) -> None:
    height = h.ledger.head.index
    forger_seed, _ = crypto.ed25519_generate()
    forged = DeviceBundle(FLEET, "dev-a", forger_seed, h.keys.public, h.keys.model_key_id, h.keys.model_key)
    payload = deltas.seal_trained(forged, 1, weights(9), h.base(1), 10, {}, dataset_sha256=DATASET)
    assert h.send("dev-a", payload).reason == "unknown_key"
    # dev-b publishing dev-a's genuine update on its own topic
    assert h.send("dev-b", h.update("dev-a", 1, weights(1))).reason == "topic_mismatch"
    h.registry.revoke("dev-c", h.devices["dev-c"].key_id)
    assert h.send("dev-c", h.update("dev-c", 1, weights(1))).reason == "revoked_key"
    assert h.ledger.head.index == height  # forged or unauthenticated input never reaches the ledger


def test_replay_and_duplicate_are_distinct_reasons(h: Harness) -> None:
    first = h.update("dev-a", 1, weights(1))
    assert h.send("dev-a", first).accepted
    assert h.send("dev-a", first).reason == "replay"
    assert h.send("dev-a", h.update("dev-a", 1, weights(2))).reason == "duplicate_in_round"
    assert h.send("dev-b", h.update("dev-b", 1, weights(3))).accepted
    assert h.send("dev-a", h.update("dev-a", 1, weights(2))).reason == "stale_round"
    np.testing.assert_allclose(h.coordinator.global_model["w"], 2.0)


def test_restart_mid_round_counts_each_update_once(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    first = h.update("dev-a", 1, weights(1.0), n=10)
    assert h.send("dev-a", first).accepted
    h.coordinator = h.build()  # a new process on the same state directory
    assert h.coordinator.round is not None and sorted(h.coordinator.round.accepted) == ["dev-a"]
    assert h.send("dev-a", first).reason == "replay"  # the resend after restart is harmless
    assert h.send("dev-b", h.update("dev-b", 1, weights(4.0), n=30)).accepted
    # The default clipped-fedavg rebuilt its update matrix from the spool: dev-b (4x dev-a's
    # distance from the zero model, beyond 3x the median) is scaled back to 3.0: (10*1 + 30*3) / 40.
    np.testing.assert_allclose(h.coordinator.global_model["w"], 2.5)
    aggregate = next(b for b in h.ledger if b.data["type"] == "aggregate")
    assert aggregate.data["participants"] == ["dev-a", "dev-b"] and list(aggregate.data["clipped"]) == ["dev-b"]
    h.coordinator = h.build()
    assert h.coordinator.round is not None and h.coordinator.round.number == 2
    np.testing.assert_allclose(h.coordinator.global_model["w"], 2.5)
    assert verify_file(tmp_path / "ledger.log").ok


def test_deadline_closes_round_with_quorum(tmp_path: Path) -> None:
    h = Harness(tmp_path, RoundPolicy(min_clients=3, quorum=2, deadline_s=60))
    assert h.send("dev-a", h.update("dev-a", 1, weights(1))).accepted
    h.clock.t += 120
    h.coordinator.tick()
    assert h.coordinator.round is not None and h.coordinator.round.number == 1  # below quorum: waits
    assert h.send("dev-b", h.update("dev-b", 1, weights(3))).accepted
    assert h.coordinator.round.number == 2
    assert h.send("dev-c", h.update("dev-c", 1, weights(5))).reason == "stale_round"


def test_max_rounds_marks_done(tmp_path: Path) -> None:
    h = Harness(tmp_path, max_rounds=1)
    h.send("dev-a", h.update("dev-a", 1, weights(1)))
    h.send("dev-b", h.update("dev-b", 1, weights(1)))
    assert h.coordinator.done
    header, _ = envelope.open_model([p for t, p, r in h.published if t == TOPICS.model][-1],
                                    h.devices["dev-a"], max_bytes=1 << 20)
    assert header.done and header.round == 2


class FullDiskSpool(Spool):
    """A spool on a disk that has filled up: every write fails with ENOSPC."""

    def put(self, round_number: int, device: str, envelope_bytes: bytes) -> None:
        import errno

        from coordinator.storage import StorageError

        raise StorageError(errno.ENOSPC, "No space left on device")

    def put_many(self, round_number: int, envelopes: list[tuple[str, bytes]]) -> None:
        for device, envelope_bytes in envelopes:  # a batch of updates is spooled together
            self.put(round_number, device, envelope_bytes)


def test_full_disk_stops_accepting_without_acknowledging(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.coordinator.spool = FullDiskSpool(tmp_path / "spool")
    height = h.ledger.head.index
    outcome = h.send("dev-a", h.update("dev-a", 1, weights(1)))
    assert outcome.reason == "storage_error" and h.coordinator.halted
    assert h.ledger.head.index == height  # nothing recorded as accepted
    assert h.send("dev-b", h.update("dev-b", 1, weights(1))).reason == "halted"
    assert h.coordinator.status()["state"] == "halted"


def test_dataset_registration_is_signed_recorded_once_and_required(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    records = [b.data for b in h.ledger if b.data["type"] == "dataset"]
    assert sorted(r["device"] for r in records) == ["dev-a", "dev-b", "dev-c"]
    assert h.coordinator.status()["datasets"]["dev-a"] == DATASET.hex()
    height = h.ledger.head.index
    # a resend changes nothing; a registration signed by someone else is refused
    assert h.coordinator.handle_registration(
        TOPICS.register("dev-a"), envelope.seal_dataset(h.devices["dev-a"], DATASET, 1234, {})).accepted
    forged = DeviceBundle(FLEET, "dev-a", crypto.ed25519_generate()[0], h.keys.public, "", b"")
    outcome = h.coordinator.handle_registration(
        TOPICS.register("dev-a"), envelope.seal_dataset(forged, bytes(32), 1, {}))
    assert not outcome.accepted and outcome.reason == "registration_unknown_key"
    assert h.ledger.head.index == height
    # an update that names another data set is refused
    other = deltas.seal_trained(h.devices["dev-a"], 1, weights(1), h.base(1), 10, {}, dataset_sha256=bytes(32))
    assert h.send("dev-a", other).reason == "dataset_not_registered"


def test_ledger_refuses_a_dataset_record_with_a_forged_device_signature(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    genuine = next(b.data for b in h.ledger if b.data["type"] == "dataset" and b.data["device"] == "dev-a")
    forged = dict(genuine, device_sig=bytes(64))
    with pytest.raises(ValueError, match="signature"):
        h.ledger.append(forged)
    swapped = dict(genuine, sha256=bytes(32))  # the record no longer says what the device signed
    with pytest.raises(ValueError, match="differs"):
        h.ledger.append(swapped)
    assert verify_file(tmp_path / "ledger.log").ok


def _resealed(h: Harness, device: str, **header_changes: Any) -> bytes:
    """A genuine device signing a header it built itself (a buggy or malicious device)."""
    outer = msgpack.unpackb(h.update(device, 1, weights(1.0)))
    hdr = msgpack.unpackb(outer["hdr"])
    hdr.update(header_changes)
    outer["hdr"] = msgpack.packb(hdr)
    outer["sig"] = h.devices[device].sign(outer["hdr"])
    return msgpack.packb(outer)


def test_claims_that_would_overflow_the_aggregate_are_refused(h: Harness) -> None:
    assert h.send("dev-a", h.update("dev-a", 1, weights(1), metrics={"train_loss": 1e308})).reason == "bad_metrics"
    assert h.send("dev-a", h.update("dev-a", 1, weights(1), n=2**62)).reason == "bad_sample_count"
    too_many = {f"m{i}": 1.0 for i in range(100)}
    assert h.send("dev-a", h.update("dev-a", 1, weights(1), metrics=too_many)).reason == "malformed"  # > 32 keys
    # The sender chooses what the ledger stores verbatim only within the protocol's fields and size.
    assert h.send("dev-a", _resealed(h, "dev-a", pad=b"x" * 1000)).reason == "malformed"
    assert h.send("dev-a", _resealed(h, "dev-a", fleet="x" * 200)).reason in ("malformed", "wrong_fleet")
    assert h.coordinator.round is not None and not h.coordinator.round.accepted
    assert h.send("dev-a", h.update("dev-a", 1, weights(1))).accepted


def test_registration_replay_cannot_switch_a_device_back(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    old = envelope.seal_dataset(h.devices["dev-a"], DATASET, 1234, {"task": "unit"}, now=1.0)
    newer = hashlib.sha256(b"new data").digest()
    assert h.coordinator.handle_registration(
        TOPICS.register("dev-a"), envelope.seal_dataset(h.devices["dev-a"], newer, 99, {"v": 2})).accepted
    height = h.ledger.head.index
    outcome = h.coordinator.handle_registration(TOPICS.register("dev-a"), old)
    assert outcome.reason == "registration_stale" and h.ledger.head.index == height
    assert h.coordinator.datasets["dev-a"] == newer
    # ... and that survives a restart (the ledger holds the signed registration times).
    h.coordinator = h.build(register=False)
    assert h.coordinator.handle_registration(TOPICS.register("dev-a"), old).reason == "registration_stale"


def test_registration_with_unencodable_schema_is_rejected_not_fatal(h: Harness) -> None:
    bad = envelope.seal_dataset(h.devices["dev-a"], bytes(32), 1, {"x": float("nan")})
    outcome = h.coordinator.handle_registration(TOPICS.register("dev-a"), bad)
    assert not outcome.accepted and outcome.reason == "registration_malformed"


def test_rejection_records_are_capped_per_device_and_round(h: Harness) -> None:
    """Even a stolen key making fresh message ids cannot grow the ledger without bound."""
    from coordinator.admission import MAX_REJECTION_RECORDS

    height = h.ledger.head.index
    for _ in range(3 * MAX_REJECTION_RECORDS):
        assert h.send("dev-a", h.update("dev-a", 7, weights(1))).reason == "future_round"
    assert h.ledger.head.index - height == MAX_REJECTION_RECORDS
    assert h.coordinator.rejections["future_round"] == 3 * MAX_REJECTION_RECORDS  # all counted
    h.coordinator = h.build(register=False)
    h.send("dev-a", h.update("dev-a", 7, weights(1)))
    assert h.ledger.head.index - height == MAX_REJECTION_RECORDS  # the cap survives a restart


def test_restart_keeps_the_round_deadline(tmp_path: Path) -> None:
    h = Harness(tmp_path, RoundPolicy(min_clients=3, quorum=1, deadline_s=60))
    assert h.send("dev-a", h.update("dev-a", 1, weights(1))).accepted
    h.clock.t += 61
    h.coordinator = h.build(register=False)  # restarted after the deadline passed
    assert h.coordinator.round is not None and h.coordinator.round.number == 2  # closed at once with the quorum


def test_registry_reload_adds_devices_and_a_ledger_revocation_is_final(h: Harness) -> None:
    """A running coordinator adopts a changed registry: a new device's key is recorded in the
    ledger before its first update is accepted; a key revoked in the ledger stays revoked even
    if the registry file later lists it as active again (a restored backup, a hand edit)."""
    seed, public = crypto.ed25519_generate()
    bundle = DeviceBundle(FLEET, "dev-new", seed, h.keys.public, h.keys.model_key_id, h.keys.model_key)
    h.devices["dev-new"] = bundle
    assert h.send("dev-new", h.update("dev-new", 1, weights(1))).reason == "unknown_key"

    grown = DeviceRegistry.from_json({"devices": {d: {"keys": {k: v.hex() for k, v in r.keys.items()}}
                                                  for d, r in h.registry.devices.items()}})
    grown.add("dev-new", public)
    grown.revoke("dev-c", h.devices["dev-c"].key_id)
    h.coordinator.reload_registry(grown)
    payload = envelope.seal_dataset(bundle, DATASET, 1234, {"task": "unit"})
    assert h.coordinator.handle_registration(TOPICS.register("dev-new"), payload).accepted
    assert h.send("dev-new", h.update("dev-new", 1, weights(1))).accepted
    assert h.send("dev-c", h.update("dev-c", 1, weights(1))).reason == "revoked_key"

    # The file "un-revokes" dev-c's key: the ledger's revocation wins, live and after a restart.
    restored = DeviceRegistry.from_json({"devices": {d: {"keys": {k: v.hex() for k, v in r.keys.items()}}
                                                     for d, r in grown.devices.items()}})
    h.coordinator.reload_registry(restored)
    assert h.send("dev-c", h.update("dev-c", 1, weights(1))).reason == "revoked_key"
    h.registry = DeviceRegistry.from_json({"devices": {d: {"keys": {k: v.hex() for k, v in r.keys.items()}}
                                                       for d, r in grown.devices.items()}})
    h.coordinator = h.build(register=False)
    assert h.send("dev-c", h.update("dev-c", 1, weights(1))).reason == "revoked_key"
    assert h.send("dev-a", h.update("dev-a", 1, weights(3))).accepted  # closes round 1 with dev-new
    aggregate = next(b for b in h.ledger if b.data["type"] == "aggregate")
    assert aggregate.data["participants"] == ["dev-a", "dev-new"]
    kinds = [(b.data["type"], b.data.get("device")) for b in h.ledger]
    assert kinds.index(("device.key", "dev-new")) < kinds.index(("update", "dev-new"))
    assert kinds.count(("device.key_revoked", "dev-c")) == 1
    # Every signature checks out against the keys the chain itself records.
    assert verify_file(h.tmp / "ledger.log", h.keys.public.sign_public).ok


def test_presence_must_be_signed_by_the_device_of_its_topic(h: Harness) -> None:
    from edge_agent.presence import PresenceSession

    index, head, model = h.snapshot()
    session = PresenceSession(h.devices["dev-a"])
    assert h.coordinator.handle_presence(TOPICS.presence("dev-a"), session.statement("online", 1))
    assert not h.coordinator.handle_presence(TOPICS.presence("dev-a"), session.statement("online", 1))  # refresh
    # dev-a's genuine heartbeat re-published on dev-b's topic; a forged JSON one; an unknown device.
    assert not h.coordinator.handle_presence(TOPICS.presence("dev-b"), session.statement("online"))
    assert not h.coordinator.handle_presence(TOPICS.presence("dev-b"), b'{"state": "online"}')
    seed, _public = crypto.ed25519_generate()
    stranger = DeviceBundle(FLEET, "dev-x", seed, h.keys.public, h.keys.model_key_id, h.keys.model_key)
    assert not h.coordinator.handle_presence(TOPICS.presence("dev-x"), PresenceSession(stranger).statement("online"))
    status = h.coordinator.status()
    assert status["presence"] == {"dev-a": "online"}
    assert status["presence_rejections"] == {"topic_mismatch": 1, "malformed": 1, "unknown_key": 1}
    assert h.snapshot() == (index, head, model)  # presence never touches the ledger or the model


def test_a_diverged_model_is_recorded_not_fatal(h: Harness) -> None:
    """Finite but huge weights pass every input check; the central evaluation of the averaged
    model then gives Inf/NaN, or fails outright. The round still closes, the metric is recorded
    as None (the ledger takes only finite numbers), and the fleet goes on, also after a restart."""
    results: list[Any] = [{"mse": float("inf"), "loss": float("nan"), "r2": 0.5}, RuntimeError("bad input")]

    def evaluate(model: dict[str, np.ndarray]) -> dict[str, float]:
        result = results.pop(0)
        if isinstance(result, Exception):
            raise result
        return dict(result)

    h.evaluate = evaluate
    h.coordinator = h.build(register=False)
    assert h.send("dev-a", h.update("dev-a", 1, weights(1e20))).accepted
    assert h.send("dev-b", h.update("dev-b", 1, weights(1.0))).accepted
    assert h.coordinator.halted is None and h.coordinator.round is not None and h.coordinator.round.number == 2
    assert h.send("dev-a", h.update("dev-a", 2, weights(1.0))).accepted
    assert h.send("dev-b", h.update("dev-b", 2, weights(1.0))).accepted
    assert h.coordinator.halted is None and h.coordinator.round.number == 3
    metrics = [b.data["metrics"] for b in h.ledger if b.data["type"] == "aggregate"]
    assert (metrics[0]["test_mse"], metrics[0]["test_loss"], metrics[0]["test_r2"]) == (None, None, 0.5)
    assert not [k for k in metrics[1] if k.startswith("test_")]
    h.coordinator = h.build(register=False)
    assert h.coordinator.halted is None and h.coordinator.round is not None and h.coordinator.round.number == 3
    assert verify_file(h.tmp / "ledger.log").ok


def test_a_registry_the_ledger_would_refuse_is_refused_whole(h: Harness) -> None:
    """One edit revokes dev-a's key and (a copy-paste slip) gives dev-b's key to a new device:
    the ledger cannot record that, so nothing of the edit is appended or adopted, the error
    names the key, and a restart with the registry in force still works."""
    from federation.keys import KeyFileError

    height = h.ledger.head.index
    edited = DeviceRegistry.from_json({"devices": {d: {"keys": {k: v.hex() for k, v in r.keys.items()}}
                                                   for d, r in h.registry.devices.items()}})
    edited.revoke("dev-a", h.devices["dev-a"].key_id)
    dev_b_key = h.registry.devices["dev-b"].keys[h.devices["dev-b"].key_id]
    edited.devices["dev-z"] = type(edited.devices["dev-a"])("dev-z", {h.devices["dev-b"].key_id: dev_b_key}, set())
    with pytest.raises(KeyFileError, match="registered in the ledger to dev-b"):
        h.coordinator.reload_registry(edited)
    assert h.ledger.head.index == height
    assert h.send("dev-a", h.update("dev-a", 1, weights(1))).accepted  # the old registry is in force
    h.coordinator = h.build(register=False)
    assert h.coordinator.round is not None and verify_file(h.tmp / "ledger.log").ok


def test_topics_with_an_invalid_device_id_are_ignored_not_raised(h: Harness) -> None:
    """update/+ also matches update/a.b: such a message is dropped quietly. (It used to raise
    in the worker, so a stream of them kept the daemon from ticking and reloading keys.)"""
    from coordinator.catch_up import CatchUp
    from coordinator.daemon import _dispatch
    from coordinator.replay import ReplayLimiter

    before = h.snapshot()
    limiter, catch_up = ReplayLimiter(), CatchUp(TOPICS)
    for topic in (f"fledger/{FLEET}/update/a.b", f"fledger/{FLEET}/presence/x y",
                  f"fledger/{FLEET}/register/" + "a" * 65, f"fledger/{FLEET}/ledger/replay/a.b",
                  f"fledger/{FLEET}/catchup/a.b"):
        assert TOPICS.device_of(topic) is None and TOPICS.replay_requester_of(topic) is None
        assert TOPICS.catch_up_requester_of(topic) is None
        _dispatch(h.coordinator, None, TOPICS, topic, h.update("dev-a", 1, weights(1)), limiter,  # type: ignore[arg-type]
                  catch_up)
    assert h.snapshot() == before and not h.coordinator.rejections
    assert TOPICS.device_of(TOPICS.update("dev-a")) == "dev-a"


def test_one_device_cannot_grow_the_ledger_without_bound(h: Harness) -> None:
    """A device (or a thief of its key) signs whatever it likes: updates naming round after
    round, registration after registration. The ledger takes a few records per device per open
    round; the rest is counted only."""
    from coordinator.admission import MAX_REGISTRATIONS_PER_ROUND, MAX_REJECTION_RECORDS

    height = h.ledger.head.index
    for round_number in range(2, 60):  # future rounds, each with a fresh message id
        assert h.send("dev-a", h.update("dev-a", round_number, weights(1))).reason == "future_round"
    for i in range(20):
        digest = hashlib.sha256(b"data %d" % i).digest()
        h.coordinator.handle_registration(TOPICS.register("dev-a"), envelope.seal_dataset(
            h.devices["dev-a"], digest, 10, {"task": "unit"}, now=time.time() + 1 + i))
    assert h.coordinator.rejections["future_round"] == 58
    registered = MAX_REGISTRATIONS_PER_ROUND - 1  # the harness registered each device once already
    assert h.coordinator.rejections["registration_rate"] == 20 - registered
    assert h.ledger.head.index - height == MAX_REJECTION_RECORDS + registered
    # The caps hold across a restart (rebuilt from the ledger) and start over with a new round.
    h.coordinator = h.build(register=False)
    assert h.send("dev-a", h.update("dev-a", 77, weights(1))).reason == "future_round"
    assert h.ledger.head.index - height == MAX_REJECTION_RECORDS + registered
    current = h.coordinator.datasets["dev-a"]
    for device in ("dev-a", "dev-b"):
        h.coordinator.handle_registration(TOPICS.register(device), envelope.seal_dataset(
            h.devices[device], current if device == "dev-a" else DATASET, 10, {"task": "unit"}))
    assert h.send("dev-a", h.update("dev-a", 1, weights(1), dataset=current)).accepted
    assert h.send("dev-b", h.update("dev-b", 1, weights(1))).accepted  # round 2 opens
    before = h.ledger.head.index
    assert h.send("dev-a", h.update("dev-a", 9, weights(1))).reason == "future_round"
    assert h.ledger.head.index == before + 1  # recorded again: a new round
    assert verify_file(h.tmp / "ledger.log").ok


def test_a_registration_from_the_future_cannot_lock_a_device_out(h: Harness) -> None:
    """Registrations are ordered by the device's signed clock. A thief with the device's key
    cannot post one dated far ahead (it would make every genuine one look stale); one dated a
    little ahead is superseded as soon as the operator rotates the stolen key."""
    thief = h.devices["dev-a"]
    bogus = hashlib.sha256(b"bogus").digest()
    far = envelope.seal_dataset(thief, bogus, 1, {"task": "x"}, now=h.clock.t + 10 * 86400)
    assert h.coordinator.handle_registration(TOPICS.register("dev-a"), far).reason == "registration_from_future"
    near = envelope.seal_dataset(thief, bogus, 1, {"task": "x"}, now=h.clock.t + 200)
    assert h.coordinator.handle_registration(TOPICS.register("dev-a"), near).accepted
    assert h.send("dev-a", h.update("dev-a", 1, weights(1))).reason == "dataset_not_registered"

    # The operator rotates dev-a's key; the device, with its new key, registers its real data.
    seed, public = crypto.ed25519_generate()
    rotated = DeviceRegistry.from_json({"devices": {d: {"keys": {k: v.hex() for k, v in r.keys.items()}}
                                                    for d, r in h.registry.devices.items()}})
    rotated.add("dev-a", public)
    rotated.revoke("dev-a", thief.key_id)
    h.coordinator.reload_registry(rotated)
    h.devices["dev-a"] = DeviceBundle(FLEET, "dev-a", seed, h.keys.public, h.keys.model_key_id, h.keys.model_key)
    genuine = envelope.seal_dataset(h.devices["dev-a"], DATASET, 1234, {"task": "unit"}, now=h.clock.t)
    assert h.coordinator.handle_registration(TOPICS.register("dev-a"), genuine).accepted
    assert h.send("dev-a", h.update("dev-a", 1, weights(1))).accepted
    assert verify_file(h.tmp / "ledger.log").ok


def test_a_crash_right_after_the_aggregate_block_is_completed_at_restart(h: Harness,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed between appending round 1's aggregate and opening round 2 (and before removing
    round 1's spool): the restart opens round 2, records model.published for it, and clears
    the closed round's spool."""
    def crash(*args: Any, **kwargs: Any) -> None:
        raise SystemExit("killed")

    monkeypatch.setattr(Coordinator, "open_round", crash)
    assert h.send("dev-a", h.update("dev-a", 1, weights(1))).accepted
    with pytest.raises(SystemExit):
        h.send("dev-b", h.update("dev-b", 1, weights(3)))
    assert h.ledger.head.data["type"] == "aggregate"
    leftover = h.tmp / "spool" / "round-000001"
    leftover.mkdir(parents=True, exist_ok=True)
    (leftover / "dev-a.update").write_bytes(b"left by the crash")
    monkeypatch.undo()

    h.coordinator = h.build(register=False)
    tail = [(b.data["type"], b.data.get("round")) for b in h.ledger][-3:]
    assert tail == [("aggregate", 1), ("round.opened", 2), ("model.published", 2)]
    assert not leftover.exists()
    assert h.send("dev-a", h.update("dev-a", 2, weights(1))).accepted
    assert verify_file(h.tmp / "ledger.log").ok


def test_each_round_has_exactly_one_model_published_record_across_restarts(h: Harness) -> None:
    """The first start records the initial model once; restarts and rounds add no duplicates
    (a monitor or auditor reading the chain sees one publication per round)."""
    def published_rounds() -> list[Any]:
        return [b.data["round"] for b in h.ledger if b.data["type"] == "model.published"]

    assert published_rounds() == [1]
    h.coordinator = h.build(register=False)
    assert published_rounds() == [1]
    assert h.send("dev-a", h.update("dev-a", 1, weights(1))).accepted
    assert h.send("dev-b", h.update("dev-b", 1, weights(3))).accepted
    h.coordinator = h.build(register=False)
    assert published_rounds() == [1, 2]


# -- hostile members (issue 13) ------------------------------------------------------------------------
def test_a_scaled_update_is_excluded_recorded_and_the_fleet_goes_on(tmp_path: Path) -> None:
    h = Harness(tmp_path, RoundPolicy(min_clients=3, quorum=1, deadline_s=0))
    for round_number in (1, 2):
        base = float(round_number)
        assert h.send("dev-a", h.update("dev-a", round_number, weights(base + 0.1))).accepted
        assert h.send("dev-b", h.update("dev-b", round_number, weights(base + 0.2))).accepted
        assert h.send("dev-c", h.update("dev-c", round_number, weights((base + 0.1) * 1e6))).accepted
    # Each round averaged the two honest updates only (global 0 -> 1.15 -> 2.15).
    np.testing.assert_allclose(h.coordinator.global_model["w"], 2.15, rtol=1e-6)
    aggregates = [b.data for b in h.ledger if b.data["type"] == "aggregate"]
    for data in aggregates:
        assert data["participants"] == ["dev-a", "dev-b"] and list(data["excluded"]) == ["dev-c"]
        why = data["excluded"]["dev-c"]
        assert why["reason"] == "distance" and why["factor"] > 1e5 and why["threshold"] < why["distance"]
        assert data["strategy"] == "clipped-fedavg" and data["strategy_params"]["exclude_factor"] == 10.0
    assert verify_file(tmp_path / "ledger.log").ok


def test_restore_republishes_an_earlier_model_as_a_new_round(tmp_path: Path) -> None:
    from coordinator.restore import ModelMismatch, RestoreError

    h = Harness(tmp_path, strategy="fedavg")  # unbounded: the poisoning gets through
    assert h.send("dev-a", h.update("dev-a", 1, weights(1.0))).accepted
    assert h.send("dev-b", h.update("dev-b", 1, weights(1.0))).accepted
    assert h.send("dev-a", h.update("dev-a", 2, weights(1e6))).accepted
    assert h.send("dev-b", h.update("dev-b", 2, weights(1.0))).accepted  # round 3 trains from a poisoned model
    assert h.send("dev-a", h.update("dev-a", 3, weights(2.0))).accepted  # round 3 open, one update in
    with pytest.raises(RestoreError, match="no global model for round 0"):
        h.coordinator.restore_model(0, "typo")
    with pytest.raises(RestoreError, match="not before"):
        h.coordinator.restore_model(9, "typo")
    block = h.coordinator.restore_model(2, "dev-a poisoned round 2", request_id="r1")
    assert block.data["type"] == "model.published" and block.data["round"] == 4 and block.data["restores"] == 2
    assert block.data["abandoned_round"] == 3
    assert h.coordinator.round is not None and h.coordinator.round.number == 4
    np.testing.assert_allclose(h.coordinator.global_model["w"], 1.0)
    assert h.coordinator.restore_model(2, "again", request_id="r1") is None  # a request applies once
    header, body = envelope.open_model([p for t, p, r in h.published if t == TOPICS.model][-1], h.devices["dev-b"],
                                       max_bytes=1 << 20)  # agents accept it: a genuine, higher round
    assert header.round == 4 and decode_tensors(body)["w"][0, 0] == 1.0
    assert verify_file(tmp_path / "ledger.log").ok
    h.coordinator = h.build()  # a restart resumes from the restored model
    assert h.coordinator.round is not None and h.coordinator.round.number == 4
    np.testing.assert_allclose(h.coordinator.global_model["w"], 1.0)
    assert h.send("dev-b", h.update("dev-b", 4, weights(1.5))).accepted
    # A model file that is not the ledger's is refused.
    path = h.coordinator.models.path(1)
    h.coordinator.models.save(1, weights(7.0))
    with pytest.raises(ModelMismatch):
        h.coordinator.restore_model(1, "tampered file")
    assert path.exists()


def test_a_restore_record_must_name_a_recorded_model(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    digest = hashlib.sha256(encode_tensors(h.coordinator.global_model)).digest()
    from federation import records
    from ledger import VerifyError

    with pytest.raises(VerifyError, match="restores round 1"):
        h.ledger.append(records.model_published(2, bytes(32), restores=1))
    with pytest.raises(VerifyError, match="new round"):
        h.ledger.append(records.model_published(1, digest, restores=1))
    h.ledger.append(records.model_published(2, digest, restores=1))
    assert verify_file(tmp_path / "ledger.log").ok


def _seal_v1_update(bundle: DeviceBundle, round_number: int, model: dict[str, np.ndarray], n: int) -> bytes:
    """An update as an agent before update envelope v2 sealed it: full weights, no base."""
    eph_seed, eph_public = crypto.x25519_generate()
    msg_id, iv = crypto.random_bytes(16), crypto.random_bytes(crypto.GCM_NONCE_BYTES)
    body = encode_tensors(model)
    header = msgpack.packb({
        "fleet": bundle.fleet, "device": bundle.device_id, "round": round_number, "key_id": bundle.key_id,
        "msg_id": msg_id, "epk": eph_public, "to": bundle.coordinator.enc_key_id, "iv": iv,
        "weights_sha256": hashlib.sha256(body).digest(), "num_samples": n, "metrics": {}, "codec": 1,
        "created": time.time(), "dataset_sha256": DATASET}, use_bin_type=True)
    key = crypto.x25519_shared_key(eph_seed, bundle.coordinator.enc_public, msg_id, envelope.UPDATE_KDF_CONTEXT)
    ciphertext, tag = crypto.aes_gcm_encrypt(key, iv, body, header)
    return msgpack.packb({"fmt": "fledger.update", "v": 1, "hdr": header, "sig": bundle.sign(header),
                          "ct": ciphertext, "tag": tag}, use_bin_type=True)


def test_an_older_agents_full_weights_update_is_refused_by_name_counted_recorded_and_answered(h: Harness) -> None:
    before = encode_tensors(h.coordinator.global_model)
    payload = _seal_v1_update(h.devices["dev-a"], 1, weights(5.0), 10)
    outcome = h.send("dev-a", payload)
    assert not outcome.accepted and outcome.reason == "unsupported_version"
    assert h.coordinator.rejections["unsupported_version"] == 1
    record = h.ledger.head.data
    assert record["type"] == "update.rejected" and record["reason"] == "unsupported_version"
    # The device's acknowledgement names the reason, which the agent logs (and drops the update).
    acks = [p for t, p, r in h.published if t == TOPICS.ack("dev-a")]
    body = envelope.open_ack(acks[-1], h.keys.public.sign_public, fleet=FLEET, device="dev-a")
    assert [v["verdict"] for v in body["updates"].values()] == ["unsupported_version"]
    assert "unsupported_version" in FINAL_REASONS and "upgrade the agent" in EXPLANATIONS["unsupported_version"]
    assert encode_tensors(h.coordinator.global_model) == before and verify_file(h.tmp / "ledger.log").ok


def test_a_delta_against_another_base_is_refused_as_wrong_base(h: Harness) -> None:
    other_base = weights(0.5)  # not the model the coordinator published for round 1
    payload = deltas.seal_trained(h.devices["dev-a"], 1, weights(1.0), other_base, 10, {}, dataset_sha256=DATASET)
    assert h.send("dev-a", payload).reason == "wrong_base"
    assert h.ledger.head.data["reason"] == "wrong_base"
    # The same change against the published base counts, and the model moves by the delta.
    assert h.send("dev-a", h.update("dev-a", 1, weights(1.0))).accepted


def test_each_rounds_deltas_are_added_to_the_model_that_round_trained_from(tmp_path: Path) -> None:
    h = Harness(tmp_path, strategy="fedavg")
    assert h.send("dev-a", h.update("dev-a", 1, weights(2.0))).accepted
    assert h.send("dev-b", h.update("dev-b", 1, weights(4.0))).accepted  # round 2 trains from 3.0
    np.testing.assert_allclose(h.coordinator.global_model["w"], 3.0)
    assert h.send("dev-a", h.update("dev-a", 2, weights(5.0))).accepted  # delta +2 against 3.0
    assert h.send("dev-b", h.update("dev-b", 2, weights(3.0))).accepted  # delta 0
    np.testing.assert_allclose(h.coordinator.global_model["w"], 4.0)
    assert verify_file(h.tmp / "ledger.log").ok


def test_async_mode_counts_a_late_update_down_weighted_and_refuses_one_beyond_the_staleness_limit(
        tmp_path: Path) -> None:
    """FedBuff: every 2 updates, whatever version each trained from; stale ones weighted 1/sqrt(1+s)."""
    h = Harness(tmp_path, strategy="fedavg", mode={"mode": "async", "max_staleness": 1})
    assert h.coordinator.settings.mode == "async"
    late_c = h.update("dev-c", 1, weights(3.0), n=10)  # trained from version 1, arrives after it closed
    late_b = h.update("dev-b", 1, weights(9.0), n=10)
    assert h.send("dev-a", h.update("dev-a", 1, weights(1.0), n=10)).accepted
    assert h.send("dev-b", h.update("dev-b", 1, weights(2.0), n=10)).accepted  # buffer full: version 2
    np.testing.assert_allclose(h.coordinator.global_model["w"], 1.5)
    assert h.send("dev-c", late_c).accepted  # staleness 1: counts, with weight 1/sqrt(2)
    assert h.send("dev-a", h.update("dev-a", 2, weights(2.5), n=10)).accepted  # delta +1, fresh
    weight = 1 / np.sqrt(2)
    expected = 1.5 + (10 * weight * (3.0 - 0.0) + 10 * 1.0) / 20  # dev-c's delta is against version 1 (zeros)
    np.testing.assert_allclose(h.coordinator.global_model["w"], expected, rtol=1e-6)
    assert h.send("dev-b", late_b).reason == "too_stale"  # version 3 now: 2 behind, limit 1
    aggregate = [b.data for b in h.ledger if b.data["type"] == "aggregate"][-1]
    assert aggregate["mode"] == "async" and aggregate["staleness"] == {"dev-c": 1, "dev-a": 0}
    assert aggregate["weights"] == {"dev-c": pytest.approx(weight), "dev-a": 1.0}
    updates = [b.data for b in h.ledger if b.data["type"] == "update" and b.data["device"] == "dev-c"]
    assert (updates[0]["round"], updates[0]["version"], updates[0]["staleness"]) == (1, 2, 1)
    assert verify_file(h.tmp / "ledger.log").ok
    # dev-c can prove its late update is in version 2's aggregate.
    proof = h.ledger.inclusion_proof(2, "dev-c")
    assert proof.verify(h.ledger.block(proof.aggregate_index), h.keys.public.sign_public)
    # The fold's rules (ledger verify) refuse an update record that claims another weight or staleness.
    blocks = list(h.ledger)
    index = next(b.index for b in blocks if b.data is updates[0] or b.data == updates[0])
    before, chain = FleetState.of(blocks[:index]), ChainState()
    chain.fleet = FLEET
    before.check(blocks[index], chain)  # the genuine record passes
    for forged in ({"weight": 1.0}, {"staleness": 0}, {"version": 1}):
        with pytest.raises(ValueError, match=r"weight|staleness|version"):
            before.check(dataclasses.replace(blocks[index], data={**updates[0], **forged}), chain)
    # A restart rebuilds the buffer with its weights: one more fresh update aggregates the same way.
    assert h.send("dev-c", h.update("dev-c", 3, weights(expected + 2.0), n=10)).accepted
    h.coordinator = h.build()
    assert h.send("dev-b", h.update("dev-b", 2, weights(1.5), n=10)).accepted  # staleness 1, delta 0
    np.testing.assert_allclose(h.coordinator.global_model["w"], expected + 1.0, rtol=1e-6)
    assert verify_file(h.tmp / "ledger.log").ok


def test_a_gateway_sends_its_aggregate_upstream_and_trains_next_from_the_upstream_model(tmp_path: Path) -> None:
    h = Harness(tmp_path, strategy="fedavg", gateway=True)
    assert h.send("dev-a", h.update("dev-a", 1, weights(1.0), n=10)).accepted
    assert h.send("dev-b", h.update("dev-b", 1, weights(3.0), n=30)).accepted
    (change, samples), = h.upstream
    assert samples == 40
    np.testing.assert_allclose(change["w"], 2.5)  # the aggregated delta, (10 x 1 + 30 x 3) / 40, against zeros
    assert h.coordinator.awaiting_upstream and not h.coordinator.maybe_close_round()
    assert h.send("dev-c", h.update("dev-c", 1, weights(2.0))).reason == "stale_round"
    upstream_model = weights(2.0)  # the upstream's FedAvg over all its gateways
    assert h.coordinator.adopt_upstream_model(upstream_model, {"round": 2})
    assert h.coordinator.round is not None and h.coordinator.round.number == 2
    np.testing.assert_allclose(h.coordinator.global_model["w"], 2.0)
    header, _ = envelope.open_model([p for t, p, r in h.published if t == TOPICS.model][-1], h.devices["dev-a"],
                                    max_bytes=1 << 20)
    assert header.round == 2 and header.model_sha256 == deltas.model_sha256(upstream_model)
    # A restart after the aggregate, before the upstream's answer: still waiting for it (the update
    # is in the daemon's upstream outbox); the aggregate is not published to the devices.
    assert h.send("dev-a", h.update("dev-a", 2, weights(3.0))).accepted
    assert h.send("dev-b", h.update("dev-b", 2, weights(3.0))).accepted
    published = len([t for t, p, r in h.published if t == TOPICS.model])
    h.coordinator = h.build(register=False)
    assert h.coordinator.awaiting_upstream and h.coordinator.round is not None and h.coordinator.round.number == 3
    assert len([t for t, p, r in h.published if t == TOPICS.model]) == published
    assert 3 not in h.coordinator.fleet_state.published_rounds
    assert h.send("dev-a", h.update("dev-a", 3, weights(3.0))).reason == "wrong_base"  # round 3 has no model yet
    assert h.coordinator.adopt_upstream_model(weights(2.5), {"round": 3})
    assert h.coordinator.round.number == 3 and not h.coordinator.awaiting_upstream
    # A restart while a round is open and the upstream moved on: the open round is replaced by one
    # on the upstream's model.
    assert h.send("dev-a", h.update("dev-a", 3, weights(3.0))).accepted
    h.coordinator = h.build(register=False)
    assert not h.coordinator.awaiting_upstream
    assert h.coordinator.adopt_upstream_model(weights(2.75), {"round": 4}, replace_open_round=True)
    assert h.coordinator.round is not None and h.coordinator.round.number == 4
    assert h.send("dev-a", h.update("dev-a", 4, weights(3.0))).accepted  # a delta against the upstream's model
    assert verify_file(h.tmp / "ledger.log").ok
