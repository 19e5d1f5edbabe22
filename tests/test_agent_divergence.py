"""An agent whose training diverges skips the round and keeps running: no exception, no crash
loop, no update for the coordinator to refuse for ever; the next (or a restored) model is trained.

The agent core gets its link passed in; here the link is an in-memory inbox and a list of what
was published (the MQTT behaviour is tested on real brokers elsewhere)."""

from __future__ import annotations

import hashlib
import logging
import queue
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from edge_agent.agent import EdgeAgent
from edge_agent.registration import Fingerprint
from federation import crypto, envelope, records
from federation.codec import encode_tensors
from federation.fleet_state import FleetLedger
from federation.keys import CoordinatorKeys, DeviceBundle
from federation.mqtt import Message
from federation.tasks import LocalData, get_task
from federation.topics import Topics
from ledger import Ed25519Signer

FLEET = "diverge"
TOPICS = Topics(FLEET)


class MemoryLink:
    def __init__(self) -> None:
        self.inbox: queue.Queue[Message] = queue.Queue()
        self.sent: list[tuple[str, bytes]] = []
        self.connect_count = 1

    def publish(self, topic: str, payload: bytes, *, retain: bool = False, qos: int = 1,
                wait: float | None = None, chunked: bool = False) -> bool:
        self.sent.append((topic, payload))
        return True


def test_divergence_skips_the_round_and_the_next_model_is_trained(tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    keys = CoordinatorKeys.generate(FLEET)
    seed, _ = crypto.ed25519_generate()
    bundle = DeviceBundle(FLEET, "dev-1", seed, keys.public, keys.model_key_id, keys.model_key)
    task = get_task("csv", n_features=3)
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal((64, 3)).astype(np.float32))
    y = torch.from_numpy(rng.standard_normal(64).astype(np.float32))
    data = LocalData(x, y, x[:16], y[:16], "regression")
    link = MemoryLink()
    agent = EdgeAgent(bundle, task, data, link, TOPICS, tmp_path / "agent",
                      dataset=Fingerprint(hashlib.sha256(b"d").digest(), 1, {}), register=False)
    healthy = {k: v.detach().numpy().copy() for k, v in task.build_model().state_dict().items()}
    ledger = FleetLedger.open(tmp_path / "ledger.log", signer=Ed25519Signer(keys.sign_seed), fleet=FLEET)

    def deliver(round_number: int, weights: dict[str, Any], **extra: Any) -> None:
        body = encode_tensors(weights)
        block = ledger.append(records.model_published(round_number, hashlib.sha256(body).digest(), **extra))
        sealed = envelope.seal_model(keys, round_number, body, block=block.to_bytes())
        link.inbox.put(Message(TOPICS.model, sealed, True, 0.0))

    def updates() -> list[int]:
        return [envelope.parse_update(p, max_bytes=1 << 24).header.round for t, p in link.sent
                if t == TOPICS.update("dev-1")]

    # Round 1's model was healthy (this agent was not around); round 2's is poisoned: finite, but
    # its loss is astronomically large.
    ledger.append(records.model_published(1, hashlib.sha256(encode_tensors(healthy)).digest()))
    deliver(2, {k: (v * 1e12).astype(np.float32) for k, v in healthy.items()})
    with caplog.at_level(logging.ERROR):
        for _ in range(3):
            agent.step(timeout=0.01)  # no exception, and the round is not retried
    assert agent.skipped_rounds == [2] and updates() == []
    assert any("round 2: training diverged" in r.getMessage() and "skipping" in r.getMessage()
               for r in caplog.records)
    assert (tmp_path / "agent" / "last_trained_round").read_text() == "2"  # survives a restart
    # The operator restores round 1's model as round 3: the agent trains it and sends its update.
    deliver(3, healthy, restores=1, abandoned_round=2, reason="poisoned")
    agent.step(timeout=0.01)
    assert updates() == [3] and agent.trained_rounds == [3]
    ledger.close()


class SmallFleet:
    """One agent on a tiny CSV task, its in-memory link, and the coordinator's keys and ledger."""

    def __init__(self, tmp_path: Path) -> None:
        self.keys = CoordinatorKeys.generate(FLEET)
        seed, _ = crypto.ed25519_generate()
        bundle = DeviceBundle(FLEET, "dev-1", seed, self.keys.public, self.keys.model_key_id, self.keys.model_key)
        self.task = get_task("csv", n_features=3)
        x = torch.zeros((8, 3))
        self.link = MemoryLink()
        self.agent = EdgeAgent(bundle, self.task, LocalData(x, torch.zeros(8), x, torch.zeros(8), "regression"),
                               self.link, TOPICS, tmp_path / "agent",
                               dataset=Fingerprint(hashlib.sha256(b"d").digest(), 1, {}), register=False)
        self.ledger = FleetLedger.open(tmp_path / "ledger.log", signer=Ed25519Signer(self.keys.sign_seed),
                                       fleet=FLEET)

    def deliver(self, round_number: int, **extra: Any) -> None:
        body = encode_tensors({k: v.detach().numpy().copy() for k, v in self.task.build_model().state_dict().items()})
        block = self.ledger.append(records.model_published(round_number, hashlib.sha256(body).digest(), **extra))
        sealed = envelope.seal_model(self.keys, round_number, body, block=block.to_bytes())
        self.link.inbox.put(Message(TOPICS.model, sealed, True, 0.0))


def test_an_unreadable_outbox_entry_of_a_closed_round_is_dropped_with_a_log_line(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    fleet = SmallFleet(tmp_path)
    fleet.agent.outbox.put(1, b"damaged")  # e.g. a disk error: not an update we can name
    fleet.deliver(2)
    with caplog.at_level(logging.WARNING):
        fleet.agent.step(timeout=0.01)
    assert fleet.agent.outbox.rounds() == [2]  # round 1's entry gone, round 2 trained
    assert any("dropped our update for round 1 from the outbox" in r.getMessage() for r in caplog.records)
    fleet.ledger.close()


@pytest.mark.parametrize("verdict, words, kept", [
    ("bad_metrics", "did not count our update: bad_metrics (its reported metrics are not finite", False),
    ("halted", "did not count our update yet: halted (it may be temporary); will send it again", True),
])
def test_the_device_logs_why_its_update_was_not_counted(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                       verdict: str, words: str, kept: bool) -> None:
    fleet = SmallFleet(tmp_path)
    fleet.deliver(1, initial=True)
    fleet.agent.step(timeout=0.01)
    sent = [p for t, p in fleet.link.sent if t == TOPICS.update("dev-1")]
    assert len(sent) == 1
    msg_id = envelope.parse_update(sent[0], max_bytes=1 << 24).header.msg_id.hex()
    ack = {"fleet": FLEET, "device": "dev-1", "registered": hashlib.sha256(b"d").hexdigest(),
           "updates": {msg_id: {"round": 1, "verdict": verdict}}, "time": 1.0}
    fleet.link.inbox.put(Message(TOPICS.ack("dev-1"), envelope.seal_ack(fleet.keys, ack), False, 0.0))
    with caplog.at_level(logging.WARNING):
        fleet.agent.step(timeout=0.01)
    assert [r.getMessage() for r in caplog.records if words in r.getMessage()], caplog.text
    assert (fleet.agent.outbox.rounds() == [1]) == kept
    fleet.ledger.close()
