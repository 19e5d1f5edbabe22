"""The link's inbox is bounded in bytes by backpressure: a receiver that falls behind holds a
bounded amount in memory, the broker keeps the rest, and nothing is lost (real brokers)."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import BrokerInfo, Mosquitto, running

from federation.mqtt import MESSAGE_OVERHEAD_BYTES, BrokerConfig, MqttLink

BUDGET = 2 * 1024 * 1024
MESSAGES = 150
MESSAGE_BYTES = 300_000  # three frames at the default max_payload
SENDERS = 4  # chunks of several messages interleave at the receiver


@pytest.fixture
def queueing_mosquitto(tmp_path: Path) -> Iterator[BrokerInfo]:
    # Unlimited queue for a session: with backpressure the broker is where the backlog waits.
    with running(Mosquitto(tmp_path / "mosquitto", extra_config="max_queued_messages 0\n")) as broker:
        yield BrokerInfo("mosquitto", broker.host, broker.port)


@pytest.mark.parametrize(("broker_fixture", "version"), [
    ("queueing_mosquitto", "5"), ("queueing_mosquitto", "3.1.1"), ("embedded_broker", "3.1.1"),
])
def test_a_slow_reader_holds_a_bounded_inbox_and_loses_nothing(request: pytest.FixtureRequest, broker_fixture: str,
                                                               version: str) -> None:
    broker: BrokerInfo = request.getfixturevalue(broker_fixture)
    config = BrokerConfig(broker_host=broker.host, broker_port=broker.port, mqtt_version=version,
                          inbox_bytes=BUDGET)
    receiver = MqttLink(config, f"slow-{version}", subscriptions=["t/update/+"])
    senders = [MqttLink(config, f"fast-{version}-{i}") for i in range(SENDERS)]
    receiver.start(timeout=20)
    for sender in senders:
        sender.start(timeout=20)
    try:
        sent = {}
        for i in range(MESSAGES):
            payload = os.urandom(MESSAGE_BYTES)
            sent[hashlib.sha256(payload).hexdigest()] = f"t/update/d{i}"
            senders[i % SENDERS].publish(f"t/update/d{i}", payload)
        # The reader is busy: everything it would have read at once is offered now.
        deadline = time.monotonic() + 20
        while receiver.backpressure_waits == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.0)
        # The message that went over the budget is the last one in until the reader takes some,
        # but for one more per wait that ended without room (BACKPRESSURE_WAIT_S: on a loaded
        # machine the test itself may take that long to look).
        per_message = MESSAGE_BYTES + len("t/update/d000") + MESSAGE_OVERHEAD_BYTES
        assert receiver.backpressure_waits > 0
        bound = BUDGET + (1 + receiver.backpressure_overruns) * per_message
        assert BUDGET < receiver.inbox_peak_bytes <= bound
        received = {}
        while len(received) < MESSAGES:
            message = receiver.inbox.get(timeout=20)  # a lost message would time out here
            received[hashlib.sha256(message.payload).hexdigest()] = message.topic
        assert received == sent
        bound = BUDGET + (1 + receiver.backpressure_overruns) * per_message
        assert receiver.inbox_peak_bytes <= bound and receiver.inbox_bytes == 0
    finally:
        receiver.stop()
        for sender in senders:
            sender.stop()


def test_messages_read_ahead_and_held_still_count_against_the_budget(queueing_mosquitto: BrokerInfo) -> None:
    """The coordinator takes the next batch out of the inbox to open it early but keeps it in
    memory (MqttLink.hold): while held, the link reads no more than the budget allows; once the
    owner lets go of them, the rest comes in and nothing is lost."""
    broker = queueing_mosquitto
    config = BrokerConfig(broker_host=broker.host, broker_port=broker.port, inbox_bytes=BUDGET)
    receiver = MqttLink(config, "holder", subscriptions=["t/update/+"])
    sender = MqttLink(config, "sender")
    receiver.start(timeout=20)
    sender.start(timeout=20)
    try:
        sent = set()
        for i in range(30):
            payload = os.urandom(MESSAGE_BYTES)
            sent.add(hashlib.sha256(payload).hexdigest())
            sender.publish(f"t/update/d{i:03d}", payload)
        deadline = time.monotonic() + 20
        while receiver.backpressure_waits == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        held = [receiver.inbox.get(timeout=20) for _ in range(5)]  # read ahead, still in memory
        receiver.hold(held)
        time.sleep(1.0)
        per_message = MESSAGE_BYTES + len("t/update/d000") + MESSAGE_OVERHEAD_BYTES
        bound = BUDGET + (1 + receiver.backpressure_overruns) * per_message
        assert receiver.inbox_peak_bytes <= bound  # taking them out made no room while they are held
        assert receiver.inbox.qsize() * per_message + len(held) * per_message <= bound
        receiver.hold(held, held=False)
        received = {hashlib.sha256(m.payload).hexdigest() for m in held}
        while len(received) < len(sent):
            received.add(hashlib.sha256(receiver.inbox.get(timeout=20).payload).hexdigest())
        assert received == sent and receiver.inbox_bytes == 0
        assert receiver.inbox_peak_bytes <= BUDGET + (1 + receiver.backpressure_overruns) * per_message
    finally:
        receiver.stop()
        sender.stop()
