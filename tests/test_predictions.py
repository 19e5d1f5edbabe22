"""Paid predictions without a network: admission, charging, receipts, owner orders, the ledger fold."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import torch

from coordinator.inference import RegressionPredictor, scaler_digest
from coordinator.predictions import CurrentModel, PredictionService, PredictionSettings
from federation import credits, crypto
from federation import prediction_wire as wire
from federation.codec import encode_tensors
from federation.datasets import Standardizer
from federation.fleet_state import FleetLedger, verify_file
from federation.keys import CoordinatorKeys, DeviceRegistry
from federation.tasks import get_task
from federation.topics import Topics
from ledger import Ed25519Signer

FLEET = "shop"
N_FEATURES = 3


class Rig:
    """A coordinator's prediction service on a real ledger file, and a client."""

    def __init__(self, tmp: Path, *, fee: int = 2, fee_per: str = "request", clock: list[float] | None = None):
        self.tmp = tmp
        self.keys = CoordinatorKeys.generate(FLEET)
        self.topics = Topics(FLEET)
        self.clock = clock or [1_000_000.0]
        self.clients = DeviceRegistry()
        seed, public = crypto.ed25519_generate()
        self.clients.add("alice", public)
        self.bundle = wire.ClientBundle(FLEET, "alice", seed, self.keys.public)
        torch.manual_seed(0)
        task = get_task("csv", n_features=N_FEATURES)
        self.weights = {k: v.detach().numpy().copy() for k, v in task.build_model().state_dict().items()}
        self.model = CurrentModel(1, hashlib.sha256(encode_tensors(self.weights)).digest(), self.weights)
        self.x_scaler = Standardizer(np.array([1.0, 2.0, 3.0], np.float32), np.array([2.0, 2.0, 2.0], np.float32))
        self.y_scaler = Standardizer(np.array([100.0], np.float32), np.array([10.0], np.float32))
        self.task = task
        self.settings = PredictionSettings(fee=fee, fee_per=fee_per, max_rows=16, max_request_bytes=64 * 1024)
        self.published: list[tuple[str, bytes]] = []
        self.correlations: list[bytes | None] = []  # the MQTT 5 Correlation Data of each published message
        self.ledger = FleetLedger.open(tmp / "ledger.log", signer=Ed25519Signer(self.keys.sign_seed), fleet=FLEET)
        self.service = self.new_service()

    def new_service(self) -> PredictionService:
        """A fresh service over the same ledger: what a restarted coordinator builds."""
        predictor = RegressionPredictor(self.task, self.x_scaler, self.y_scaler)
        return PredictionService(self.settings, self.keys, self.clients, self.ledger.state.accounts,
                                 append=self.ledger.append,
                                 model=lambda: self.model, predictor=predictor,
                                 publish=self._publish, topics=self.topics, now=lambda: self.clock[0],
                                 block=self.ledger.block)

    def _publish(self, topic: str, payload: bytes, correlation: bytes | None = None) -> None:
        self.published.append((topic, payload))
        self.correlations.append(correlation)

    def order(self, action: str, amount: int, client: str | None = None, keys: CoordinatorKeys | None = None
              ) -> dict[str, Any]:
        _, message = wire.seal_order(keys or self.keys, action, amount, client, now=self.clock[0])
        body = self.service.handle_order(message)
        topic, reply = self.published[-1]
        assert topic == wire.order_reply_topic(self.topics)
        assert wire.open_order_reply(reply, self.keys.public.sign_public) == body
        return body

    def request(self, rows: np.ndarray, **kwargs: Any) -> wire.PendingRequest:
        return wire.seal_request(self.bundle, rows, now=self.clock[0], **kwargs)

    def send(self, pending: wire.PendingRequest | bytes,
             client: str = "alice") -> tuple[str, wire.PredictionReply | None]:
        payload = pending.payload if isinstance(pending, wire.PendingRequest) else pending
        before = len(self.published)
        outcome = self.service.handle_request(wire.request_topic(self.topics, client), payload)
        assert len(self.published) == before + 1, "every request gets exactly one reply"
        topic, reply = self.published[-1]
        assert topic == wire.reply_topic(self.topics, client)
        if isinstance(pending, wire.PendingRequest):
            return outcome.status, wire.open_reply(reply, self.bundle, pending)
        return outcome.status, None

    def receipts(self) -> list[dict[str, Any]]:
        return [b.data for b in self.ledger if b.data["type"] == credits.RECEIPT]


ROWS = np.array([[1.0, 2.0, 3.0], [5.0, 0.0, -1.0]], np.float32)


def expected_values(rig: Rig, rows: np.ndarray) -> np.ndarray:
    model = rig.task.build_model()
    model.load_state_dict({k: torch.from_numpy(v) for k, v in rig.weights.items()})
    with torch.no_grad():
        out = model(torch.from_numpy(rig.x_scaler.transform(rows))).reshape(-1).numpy()
    return rig.y_scaler.inverse_transform(out)


def test_answered_request_is_charged_once_with_a_receipt_bound_to_the_reply(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    assert rig.order("deposit", 5, "alice")["balance"] == 5
    pending = rig.request(ROWS)
    status, reply = rig.send(pending)
    assert status == "ok" and reply is not None and reply.status == "ok"
    assert reply.predictions is not None
    np.testing.assert_allclose(reply.predictions, expected_values(rig, ROWS), rtol=1e-5)  # original units
    assert reply.fee == 2 and reply.balance == 3 and reply.round == 1 and reply.model_sha256 == rig.model.sha256
    assert reply.output == "values"
    [receipt] = rig.receipts()
    assert receipt["client"] == "alice" and receipt["request_id"] == pending.request_id and receipt["rows"] == 2
    assert receipt["reply_sha256"] == hashlib.sha256(wire.encode_predictions(reply.predictions)).digest()
    # The scaler that gave original units is named beside the model, in the receipt and the reply.
    assert receipt["scaler_sha256"] == reply.scaler_sha256 == scaler_digest(rig.x_scaler, rig.y_scaler)
    assert scaler_digest(rig.x_scaler, Standardizer(np.array([0.0], np.float32), np.array([1.0], np.float32))) \
        != reply.scaler_sha256
    assert reply.receipt is not None and reply.receipt.hash == rig.ledger.head.hash  # in the chain, signed
    assert verify_file(rig.ledger.path).ok
    assert credits.fold(rig.ledger).balance("alice") == 3


def test_per_row_fee(tmp_path: Path) -> None:
    rig = Rig(tmp_path, fee=3, fee_per="row")
    rig.order("deposit", 10, "alice")
    status, reply = rig.send(rig.request(ROWS))
    assert status == "ok" and reply is not None and reply.fee == 6 and reply.balance == 4
    status, reply = rig.send(rig.request(ROWS))  # 6 > 4: refused, nothing charged
    assert status == "insufficient_balance" and reply is not None and reply.status == "refused"
    assert reply.balance == 4 and reply.predictions is None
    assert len(rig.receipts()) == 1


def test_insufficient_balance_gets_a_signed_refusal_and_no_prediction(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.order("deposit", 1, "alice")
    height = rig.ledger.height
    status, reply = rig.send(rig.request(ROWS))
    assert status == "insufficient_balance" and reply is not None
    assert reply.reason == "insufficient_balance" and "exceeds the balance 1" in reply.detail
    assert reply.predictions is None and rig.ledger.height == height
    assert rig.service.accounts.balance("alice") == 1


def test_replayed_request_is_answered_with_the_same_receipt_and_never_charged_twice(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.order("deposit", 10, "alice")
    pending = rig.request(ROWS)
    _, first = rig.send(pending)
    status, again = rig.send(pending)
    assert status == "duplicate" and again is not None and again.receipt is not None and first is not None
    assert first.receipt is not None and again.receipt.hash == first.receipt.hash
    assert len(rig.receipts()) == 1 and rig.service.accounts.balance("alice") == 8


def test_a_charged_request_whose_reply_was_lost_in_a_crash_is_answered_again_with_its_receipt(tmp_path: Path
                                                                                             ) -> None:
    rig = Rig(tmp_path)
    rig.order("deposit", 10, "alice")
    pending, stale = rig.request(ROWS), rig.request(ROWS)
    _, first = rig.send(pending)
    rig.send(stale)
    assert first is not None and first.receipt is not None and first.predictions is not None
    # A restart: no reply is kept. The resend gets the same predictions bound to the same receipt.
    rig.service = rig.new_service()
    status, again = rig.send(pending)
    assert status == "duplicate" and again is not None and again.status == "ok" and again.receipt is not None
    assert again.receipt.hash == first.receipt.hash and again.predictions is not None
    np.testing.assert_array_equal(again.predictions, first.predictions)
    assert again.balance == 6 and len(rig.receipts()) == 2
    # Past the freshness window, or with another model now, or if the answer would differ from
    # the receipt's digest: a refusal naming the receipt, still no second charge.
    rig.clock[0] += 301
    rig.service = rig.new_service()
    status, refused = rig.send(stale)
    assert status == "duplicate" and refused is not None and refused.status == "refused"
    assert f"receipt in ledger block {first.receipt.index + 1}" in refused.detail
    rig.clock[0] -= 301
    rig.service = rig.new_service()
    old_model = rig.model
    rig.model = CurrentModel(2, bytes(32), rig.weights)
    status, refused = rig.send(pending)
    assert status == "duplicate" and refused is not None and "no longer the current one" in refused.detail
    rig.model = old_model
    rig.service = rig.new_service()
    rig.service.predictor = RegressionPredictor(rig.task, rig.x_scaler, Standardizer(
        np.array([0.0], np.float32), np.array([1.0], np.float32)))  # another target scaler: other values
    status, refused = rig.send(pending)
    assert status == "duplicate" and refused is not None and refused.status == "refused"
    assert len(rig.receipts()) == 2 and rig.service.accounts.balance("alice") == 6
    assert credits.fold(rig.ledger).balance("alice") == 6


def test_mqtt5_requests_are_answered_on_their_response_topic_with_their_correlation_data(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.order("deposit", 10, "alice")
    own = wire.reply_topic(rig.topics, "alice")
    request = wire.request_topic(rig.topics, "alice")
    pending = rig.request(ROWS)
    assert rig.service.handle_request(request, pending.payload, response_topic=own,
                                      correlation=pending.request_id).status == "ok"
    assert rig.published[-1][0] == own and rig.correlations[-1] == pending.request_id
    first = wire.open_reply(rig.published[-1][1], rig.bundle, pending)
    # The replay (the client resending) is answered with the same reply and echoes its own data.
    assert rig.service.handle_request(request, pending.payload, response_topic=own,
                                      correlation=b"resend").status == "duplicate"
    assert rig.correlations[-1] == b"resend"
    again = wire.open_reply(rig.published[-1][1], rig.bundle, pending)
    assert again.receipt is not None and first.receipt is not None and again.receipt.hash == first.receipt.hash
    # A response topic that is not the client's own (another client's replies, the fleet's model
    # topic) is not followed: the answer, a refusal here, goes to the client's own reply topic.
    for foreign in (wire.reply_topic(rig.topics, "bob"), rig.topics.model):
        refused = rig.request(np.ones((2, 4), np.float32))
        assert rig.service.handle_request(request, refused.payload, response_topic=foreign,
                                          correlation=refused.request_id).status == "wrong_shape"
        assert rig.published[-1][0] == own and rig.correlations[-1] == refused.request_id
    assert rig.service.foreign_response_topics == 2
    # Over MQTT 3.1.1 there are no properties: the fixed reply topic, no correlation data.
    assert rig.send(rig.request(ROWS))[0] == "ok" and rig.correlations[-1] is None
    # Correlation data too long to echo is dropped; the signed request id still matches the reply.
    pending = rig.request(ROWS)
    rig.service.handle_batch([_Delivery(request, pending.payload, own, bytes(257))])
    assert rig.correlations[-1] is None and wire.open_reply(rig.published[-1][1], rig.bundle, pending).status == "ok"
    assert len(rig.receipts()) == 3 and rig.service.accounts.balance("alice") == 4


class _Delivery:
    def __init__(self, topic: str, payload: bytes, response_topic: str | None, correlation: bytes | None) -> None:
        self.topic, self.payload, self.response_topic, self.correlation = topic, payload, response_topic, correlation


def _tampered_signature(rig: Rig) -> bytes:
    outer = msgpack.unpackb(rig.request(ROWS).payload, raw=False)
    outer["sig"] = bytes(64)
    return msgpack.packb(outer, use_bin_type=True)


def _unsigned(rig: Rig) -> bytes:
    outer = msgpack.unpackb(rig.request(ROWS).payload, raw=False)
    del outer["sig"]
    return msgpack.packb(outer, use_bin_type=True)


def _tampered_inputs(rig: Rig) -> bytes:
    outer = msgpack.unpackb(rig.request(ROWS).payload, raw=False)
    outer["ct"] = bytes([outer["ct"][0] ^ 1]) + outer["ct"][1:]
    return msgpack.packb(outer, use_bin_type=True)


@pytest.mark.parametrize(("make", "reason"), [
    (lambda rig: b"\x00not msgpack", "malformed"),
    (lambda rig: b"x" * (64 * 1024 + 1), "oversized"),
    (_unsigned, "malformed"),
    (_tampered_signature, "bad_signature"),
    (_tampered_inputs, "decrypt_failed"),
    (lambda rig: rig.request(np.ones((2, 4), np.float32)).payload, "wrong_shape"),
    (lambda rig: rig.request(np.ones((17, 3), np.float32)).payload, "wrong_shape"),
    (lambda rig: rig.request(np.array([[1.0, np.nan, 2.0]], np.float32)).payload, "wrong_shape"),
    (lambda rig: rig.request(np.ones((2, 3), np.int64)).payload, "wrong_shape"),
    (lambda rig: wire.seal_request(rig.bundle, ROWS, now=rig.clock[0] - 3600).payload, "stale"),
    (lambda rig: wire.seal_request(wire.ClientBundle(FLEET, "alice", crypto.ed25519_generate()[0],
                                                     rig.keys.public), ROWS, now=rig.clock[0]).payload,
     "unknown_client"),
])
def test_bad_requests_are_refused_with_a_reason_and_never_charged(tmp_path: Path, make: Any, reason: str) -> None:
    rig = Rig(tmp_path)
    rig.order("deposit", 10, "alice")
    height = rig.ledger.height
    status, _ = rig.send(make(rig))
    assert status == reason
    _, body = rig.published[-1]
    hdr = msgpack.unpackb(msgpack.unpackb(body, raw=False)["hdr"], raw=False)
    assert hdr["status"] == "refused" and hdr["reason"] == reason and hdr["detail"]
    assert rig.ledger.height == height and rig.service.accounts.balance("alice") == 10
    assert rig.service.rejections[reason] == 1


def test_a_request_on_another_clients_topic_or_from_a_device_is_refused(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.order("deposit", 10, "alice")
    status, _ = rig.send(rig.request(ROWS).payload, client="bob")  # alice's request on bob's topic
    assert status == "wrong_topic"
    # A fleet device (its key is in devices.json, not in the client registry) gets nothing.
    seed, _public = crypto.ed25519_generate()
    device = wire.ClientBundle(FLEET, "pump-01", seed, rig.keys.public)
    status, _ = rig.send(wire.seal_request(device, ROWS, now=rig.clock[0]).payload, client="pump-01")
    assert status == "unknown_client"
    assert not rig.receipts()


def test_balances_never_go_negative_under_many_requests(tmp_path: Path) -> None:
    rig = Rig(tmp_path, fee=2)
    rig.order("deposit", 7, "alice")
    statuses = [rig.send(rig.request(ROWS))[0] for _ in range(6)]
    assert statuses.count("ok") == 3 and statuses.count("insufficient_balance") == 3
    assert rig.service.accounts.balance("alice") == 1 == credits.fold(rig.ledger).balance("alice")


def test_owner_orders_withdrawal_limits_and_signatures(tmp_path: Path) -> None:
    rig = Rig(tmp_path, fee=2)
    assert rig.order("deposit", 10, "alice")["ok"]
    assert not rig.order("deposit", 10, "mallory")["ok"]  # not a registered client
    rig.send(rig.request(ROWS))
    refused = rig.order("withdraw", 3)  # only 2 collected
    assert not refused["ok"] and "exceeds the fees held" in refused["reason"]
    assert rig.order("withdraw", 2)["ok"]
    stranger = CoordinatorKeys.generate(FLEET)
    forged = rig.order("deposit", 1000, "alice", keys=stranger)
    assert not forged["ok"] and "not signed by the owner" in forged["reason"]
    _, message = wire.seal_order(rig.keys, "deposit", 5, "alice", now=rig.clock[0])
    first = rig.service.handle_order(message)
    again = rig.service.handle_order(message)  # a resent order is confirmed again, recorded once
    assert first["ok"] and again["ok"] and again["duplicate"] and again["block_index"] == first["block_index"]
    accounts = credits.fold(rig.ledger)
    assert accounts.summary() == {"clients": {"alice": {"deposited": 15, "spent": 2, "balance": 13, "requests": 1}},
                                  "collected": 2, "withdrawn": 2, "held": 0}
    assert verify_file(rig.ledger.path).ok


def test_the_ledger_refuses_records_that_break_the_accounting_rules(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    digest = bytes(32)
    overdraft = credits.receipt("alice", bytes(16), 1, 5, 1, digest, digest, digest)
    with pytest.raises(ValueError, match="exceeds the balance"):
        rig.ledger.append(overdraft)
    message = msgpack.unpackb(wire.seal_order(rig.keys, "withdraw", 1)[1], raw=False)
    with pytest.raises(ValueError, match="exceeds the fees held"):
        rig.ledger.append(credits.owner_record(message["order"], message["sig"]))
    message = msgpack.unpackb(wire.seal_order(CoordinatorKeys.generate(FLEET), "deposit", 9, "alice")[1], raw=False)
    with pytest.raises(ValueError, match="not signed by the owner"):
        rig.ledger.append(credits.owner_record(message["order"], message["sig"]))
    with pytest.raises(ValueError, match="integer"):
        rig.ledger.append({**overdraft, "fee": 0.5})
    assert rig.ledger.height == 1 and verify_file(rig.ledger.path).ok


def test_unavailable_without_a_predictor(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.order("deposit", 10, "alice")
    rig.service.predictor = None
    status, reply = rig.send(rig.request(ROWS))
    assert status == "unavailable" and reply is not None and reply.predictions is None and not rig.receipts()


def test_a_batch_shares_one_fsync_and_publishes_only_after_it(tmp_path: Path) -> None:
    rig = Rig(tmp_path, fee=1)
    rig.order("deposit", 3, "alice")
    events: list[str] = []
    committed = [False]

    class Commit:
        def __enter__(self) -> None:
            events.append("begin")

        def __exit__(self, *exc: object) -> None:
            rig.ledger.sync()
            committed[0] = True
            events.append("synced")

    rig.service = PredictionService(
        rig.settings, rig.keys, rig.clients, rig.ledger.state.accounts, append=rig.ledger.append,
        model=lambda: rig.model,
        predictor=rig.service.predictor, topics=rig.topics, now=lambda: rig.clock[0],
        publish=lambda t, p: (events.append("reply" if committed[0] else "REPLY BEFORE SYNC"),
                              rig.published.append((t, p))),
        group_commit=Commit, announce=lambda blocks: events.extend(
            "block" if committed[0] else "BLOCK BEFORE SYNC" for _ in blocks))
    requests = [rig.request(ROWS) for _ in range(4)]
    topic = wire.request_topic(rig.topics, "alice")
    outcomes = rig.service.handle_batch([(topic, r.payload) for r in requests])
    assert [o.status for o in outcomes if not isinstance(o, dict)] == ["ok", "ok", "ok", "insufficient_balance"]
    assert events == ["begin", "synced", "block", "block", "block", "reply", "reply", "reply", "reply"]
    replies = [wire.open_reply(payload, rig.bundle, r) for (_, payload), r in zip(rig.published[-4:], requests,
                                                                                    strict=True)]
    assert [r.status for r in replies] == ["ok", "ok", "ok", "refused"]
    assert verify_file(rig.ledger.path).ok and credits.fold(rig.ledger).balance("alice") == 0


def test_mnist_requests_get_class_probabilities(tmp_path: Path) -> None:
    from coordinator.inference import ClassificationPredictor

    rig = Rig(tmp_path)
    task = get_task("mnist")
    torch.manual_seed(0)
    weights = {k: v.detach().numpy().copy() for k, v in task.build_model().state_dict().items()}
    rig.model = CurrentModel(1, hashlib.sha256(encode_tensors(weights)).digest(), weights)
    rig.service.predictor = ClassificationPredictor(task)
    rig.order("deposit", 10, "alice")
    images = np.random.default_rng(0).integers(0, 256, size=(3, 28, 28), dtype=np.uint8)
    status, reply = rig.send(rig.request(images))
    assert status == "ok" and reply is not None and reply.output == "probabilities"
    assert reply.scaler_sha256 == b"" and "scaler_sha256" not in rig.receipts()[-1]  # images: no scaler
    assert reply.predictions is not None and reply.predictions.shape == (3, 10)
    np.testing.assert_allclose(reply.predictions.sum(axis=1), 1.0, rtol=1e-5)
    model = task.build_model()
    model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
    with torch.no_grad():
        expected = torch.softmax(model(task.prepare(images)), dim=1).numpy()  # type: ignore[attr-defined]
    np.testing.assert_allclose(reply.predictions, expected, rtol=1e-4, atol=1e-6)
    for bad in (np.zeros((2, 28, 27), np.uint8), np.full((1, 28, 28), 300.0, np.float32)):
        assert rig.send(rig.request(bad))[0] == "wrong_shape"
    assert rig.service.accounts.balance("alice") == 8


def test_clients_and_devices_are_kept_apart_by_the_key_tool(tmp_path: Path) -> None:
    import json

    from fledger import keytool

    keys = tmp_path / "keys"
    keytool.init_fleet(keys, FLEET)
    keytool.add_device(keys, "pump-01")
    path, key_id = keytool.add_client(keys, "alice")
    bundle = wire.ClientBundle.load(path)
    assert bundle.key_id == key_id and "model_key" not in json.loads(path.read_text())  # buys, never sees
    assert DeviceRegistry.load(keys / keytool.CLIENTS_FILE).public_key("alice", key_id) is not None
    assert "alice" not in DeviceRegistry.load(keys / keytool.REGISTRY_FILE).devices
    with pytest.raises(ValueError, match="is a device"):
        keytool.add_client(keys, "pump-01")
    with pytest.raises(ValueError, match="prediction client"):
        keytool.add_device(keys, "alice")
    with pytest.raises(ValueError, match="another role"):
        keytool.add_client(keys, "owner")
    with pytest.raises(FileExistsError):
        keytool.add_client(keys, "alice")


def test_a_reply_is_bound_to_its_receipt_which_is_provably_in_the_chain(tmp_path: Path, capsys: Any) -> None:
    import json

    from fledger.cli import main
    from ledger import merkle

    rig = Rig(tmp_path)
    rig.order("deposit", 10, "alice")
    first, second = rig.request(ROWS), rig.request(ROWS[:1])
    rig.send(first)
    reply_first = rig.published[-1][1]
    rig.send(second)
    reply_second = rig.published[-1][1]
    # Another receipt block under the first reply (a genuine, signed block of the same client) is
    # refused: the reply names its receipt, which records the digest of exactly these predictions.
    outer = msgpack.unpackb(reply_first, raw=False)
    outer["block"] = msgpack.unpackb(reply_second, raw=False)["block"]
    with pytest.raises(wire.EnvelopeError) as refused:
        wire.open_reply(msgpack.packb(outer, use_bin_type=True), rig.bundle, first)
    assert refused.value.reason == "receipt_mismatch"
    outer = msgpack.unpackb(reply_first, raw=False)  # other predictions under the signed header
    outer["ct"] = bytes([outer["ct"][0] ^ 1]) + outer["ct"][1:]
    with pytest.raises(wire.EnvelopeError):
        wire.open_reply(msgpack.packb(outer, use_bin_type=True), rig.bundle, first)
    receipt = wire.open_reply(reply_first, rig.bundle, first).receipt
    assert receipt is not None

    # `fledger credits receipt` from the ledger file: a proof anyone checks against the chain root
    # (the root a monitor's signed checkpoint states), here recomputed from the printed JSON alone.
    capsys.readouterr()
    assert main(["credits", "receipt", str(rig.ledger.path), "--client", "alice", "--request-id",
                 first.request_id.hex()]) == 0
    proof = json.loads(capsys.readouterr().out)
    assert proof["verified"] and proof["block_hash"] == receipt.hash.hex() and proof["block_index"] == receipt.index
    assert proof["reply_sha256"] == receipt.data["reply_sha256"].hex() and proof["fee"] == 2
    assert bytes.fromhex(proof["chain_root"]) == rig.ledger.chain_root(proof["tree_size"])
    assert merkle.verify_inclusion(merkle.leaf_hash(bytes.fromhex(proof["block_hash"])), proof["block_index"],
                                   proof["tree_size"], [bytes.fromhex(p) for p in proof["path"]],
                                   bytes.fromhex(proof["chain_root"]))
    assert not merkle.verify_inclusion(merkle.leaf_hash(bytes(32)), proof["block_index"], proof["tree_size"],
                                       [bytes.fromhex(p) for p in proof["path"]], bytes.fromhex(proof["chain_root"]))
    assert main(["credits", "receipt", str(rig.ledger.path), "--client", "alice", "--request-id",
                 bytes(16).hex()]) == 1
    capsys.readouterr()
    assert main(["credits", "balance", str(rig.ledger.path), "--json"]) == 0  # the ledger file alone
    assert json.loads(capsys.readouterr().out) == {
        "clients": {"alice": {"deposited": 10, "spent": 4, "balance": 6, "requests": 2}},
        "collected": 4, "withdrawn": 0, "held": 4}
