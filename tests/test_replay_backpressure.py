"""Ledger replay requests cannot pile blocks up in the coordinator's MQTT client faster than
the broker takes them: a request while the previous replay is unacknowledged is refused.
A real mosquitto, frozen with SIGSTOP (connected but acknowledging nothing, like a congested
link); the coordinator core from test_coordinator."""

from __future__ import annotations

import logging
import signal
import time
from pathlib import Path

import pytest
from conftest import Mosquitto
from test_coordinator import TOPICS, Harness

from coordinator.replay import ReplayLimiter, ReplayLimits
from federation.mqtt import BrokerConfig, MqttLink


def test_a_replay_waits_for_the_previous_one_to_be_delivered(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    limiter = ReplayLimiter(ReplayLimits(interval_s=0.0), clock=time.monotonic)  # the rate is not under test
    h = Harness(tmp_path)
    broker = Mosquitto(tmp_path / "mosquitto").start()
    assert broker.proc is not None
    link = MqttLink(BrokerConfig(broker_host=broker.host, broker_port=broker.port, keepalive=60), "replayer")
    link.start(timeout=10)
    request = b'{"from": 0}'
    try:
        broker.proc.send_signal(signal.SIGSTOP)
        with caplog.at_level(logging.INFO, logger="coordinator.daemon"):
            limiter.serve("monitor", request, h.coordinator.ledger, link.publish_all, TOPICS.ledger_blocks)
            time.sleep(0.5)
            limiter.serve("monitor", request, h.coordinator.ledger, link.publish_all, TOPICS.ledger_blocks)
        messages = [r.getMessage() for r in caplog.records]
        assert sum("replayed" in m for m in messages) == 1, messages
        assert limiter.refused["previous_replay_in_flight"] == 1, messages

        broker.proc.send_signal(signal.SIGCONT)  # acknowledgements flow again
        deadline = time.monotonic() + 20
        while not limiter._delivered() and time.monotonic() < deadline:
            time.sleep(0.05)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="coordinator.daemon"):
            limiter.serve("monitor", request, h.coordinator.ledger, link.publish_all, TOPICS.ledger_blocks)
        assert any("replayed" in r.getMessage() for r in caplog.records)
    finally:
        broker.proc.send_signal(signal.SIGCONT)
        link.stop()
        broker.stop()
