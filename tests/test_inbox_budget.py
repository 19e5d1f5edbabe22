"""The link's inbox is bounded in bytes by backpressure: a receiver that falls behind holds a
bounded amount in memory, the broker keeps the rest, and nothing is lost (real mosquitto)."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Mosquitto, running

from federation.mqtt import RECEIVE_MAXIMUM, BrokerConfig, MqttLink

BUDGET = 2 * 1024 * 1024
MESSAGES = 150
MESSAGE_BYTES = 300_000  # three frames at the default max_payload: chunks are held back too
BROKER_INFLIGHT = 16  # mosquitto's window for MQTT 3.1.1 clients (MQTT 5 clients state theirs)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    # Unlimited queue for a session: with backpressure the broker is where the backlog waits.
    extra = f"max_queued_messages 0\nmax_inflight_messages {BROKER_INFLIGHT}\n"
    with running(Mosquitto(tmp_path / "mosquitto", extra_config=extra)) as mosquitto:
        yield mosquitto


@pytest.mark.parametrize("version", ["5", "3.1.1"])
def test_a_slow_reader_holds_a_bounded_inbox_and_loses_nothing(broker: Mosquitto, version: str) -> None:
    config = BrokerConfig(broker_host=broker.host, broker_port=broker.port, mqtt_version=version,
                          inbox_bytes=BUDGET)
    receiver = MqttLink(config, f"slow-{version}", subscriptions=["t/update/+"])
    sender = MqttLink(config, f"fast-{version}")
    receiver.start(timeout=20)
    sender.start(timeout=20)
    try:
        sent = {}
        for i in range(MESSAGES):
            payload = os.urandom(MESSAGE_BYTES)
            sent[hashlib.sha256(payload).hexdigest()] = f"t/update/d{i}"
            sender.publish(f"t/update/d{i}", payload)
        # The reader is busy: everything it would have read at once is offered now.
        deadline = time.monotonic() + 20
        while receiver.held_acks == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.0)
        window = RECEIVE_MAXIMUM if version == "5" else BROKER_INFLIGHT
        bound = BUDGET + window * MESSAGE_BYTES
        assert receiver.held_acks > 0
        assert BUDGET < receiver.inbox_peak_bytes <= bound < MESSAGES * MESSAGE_BYTES // 4
        received = {}
        while len(received) < MESSAGES:
            message = receiver.inbox.get(timeout=20)  # a lost message would time out here
            received[hashlib.sha256(message.payload).hexdigest()] = message.topic
        assert received == sent
        assert receiver.inbox_peak_bytes <= bound and receiver.inbox_bytes == 0
    finally:
        receiver.stop()
        sender.stop()
