"""Catch-up requests: a device or monitor that joins asks for the model or status instead of
depending on retained messages (which a RabbitMQ cluster keeps on one node)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from coordinator.catch_up import MAX_REQUEST_BYTES, CatchUp, CatchUpLimits, FleetNow, parse_request
from federation.catch_up import CatchUpSchedule, request_body
from federation.topics import Topics
from fledger import keytool
from fledger.broker import free_port
from tests.conftest import BrokerInfo, Mosquitto, running
from tests.federation_run import Federation
from tests.test_reliability import check_final_ledger, finish, ledger_records, log_text, wait_for

TOPICS = Topics("plant")
MODEL = b"sealed-model" * 100


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Sent:
    """A stand-in for MqttLink.publish_all: records what would go out, acknowledged or not."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self.acknowledged = True

    def __call__(self, topic: str, payloads: Iterable[bytes]) -> Callable[[], bool]:
        self.messages.extend((topic, p) for p in payloads)
        return lambda: self.acknowledged


def fleet(acks: list[str], model: bytes = MODEL) -> FleetNow:
    return FleetNow(model=lambda: model, is_device=lambda name: name.startswith("dev"),
                    publish_ack=acks.append, status=lambda: b"signed-status", head=lambda: b"head-block")


def test_a_device_gets_the_model_and_its_ack_a_monitor_the_status_and_head() -> None:
    sent, acks = Sent(), []
    server = CatchUp(TOPICS, clock=Clock())
    assert server.serve("dev-1", b"{}", fleet(acks), sent)
    assert server.serve("monitor", b"", fleet(acks), sent)
    assert sent.messages == [(TOPICS.catch_up_reply("dev-1", "model"), MODEL),
                             (TOPICS.catch_up_reply("monitor", "status"), b"signed-status"),
                             (TOPICS.catch_up_reply("monitor", "head"), b"head-block")]
    assert acks == ["dev-1"]  # the device's own acknowledgement, republished; none for a monitor


def test_a_device_holding_the_current_model_gets_only_its_ack() -> None:
    sent, acks = Sent(), []
    server = CatchUp(TOPICS, clock=Clock())
    assert server.serve("dev-1", request_body(MODEL), fleet(acks), sent)
    assert sent.messages == [] and acks == ["dev-1"]
    assert server.serve("dev-2", request_body(b"an older model"), fleet(acks), sent)
    assert sent.messages == [(TOPICS.catch_up_reply("dev-2", "model"), MODEL)]


def test_requests_are_bounded_per_requester_and_in_total() -> None:
    clock, sent, acks = Clock(), Sent(), []
    limits = CatchUpLimits(interval_s=5.0, window_s=10.0, window_requests=3, window_bytes=10 * len(MODEL))
    server = CatchUp(TOPICS, limits, clock)
    assert server.serve("dev-1", b"{}", fleet(acks), sent)
    assert not server.serve("dev-1", b"{}", fleet(acks), sent)  # again at once: too often
    clock.now += 1
    sent.acknowledged = False
    assert not server.serve("dev-2", b"{}", fleet(acks), sent)  # the last answer is still queued
    sent.acknowledged = True
    assert server.serve("dev-2", b"{}", fleet(acks), sent)
    assert server.serve("dev-3", b"{}", fleet(acks), sent)
    assert not server.serve("dev-4", b"{}", fleet(acks), sent)  # 3 per window for everyone together
    assert server.refused == {"too_often": 1, "previous_reply_in_flight": 1, "busy": 1}
    clock.now += 10  # a new window
    assert server.serve("dev-4", b"{}", fleet(acks), sent)
    assert len(sent.messages) == 4 and acks == ["dev-1", "dev-2", "dev-3", "dev-4"]


def test_the_byte_budget_is_shared_by_all_requesters() -> None:
    clock, sent, acks = Clock(), Sent(), []
    server = CatchUp(TOPICS, CatchUpLimits(window_bytes=2 * len(MODEL) + 10), clock)
    assert server.serve("dev-1", b"{}", fleet(acks), sent)
    assert server.serve("dev-2", b"{}", fleet(acks), sent)
    assert not server.serve("dev-3", b"{}", fleet(acks), sent)
    assert server.refused == {"byte_budget": 1} and acks == ["dev-1", "dev-2"]


def test_every_answer_is_counted_for_the_metrics() -> None:
    clock, sent, acks, heard = Clock(), Sent(), [], []
    server = CatchUp(TOPICS, CatchUpLimits(window_requests=1), clock, counted=heard.append)
    assert server.serve("dev-1", b"{}", fleet(acks), sent)
    assert not server.serve("dev-1", b"{}", fleet(acks), sent)
    assert not server.serve("dev-2", b"{}", fleet(acks), sent)
    assert not server.serve("dev-3", b"[", fleet(acks), sent)
    assert heard == ["served", "too_often", "busy", "malformed"]
    with pytest.raises(ValueError, match="catch_up_window_requests must be > 0"):
        CatchUpLimits(window_requests=0).check()


@pytest.mark.parametrize("payload", [b"[1]", b"{not json", b'{"have": "abc"}', b'{"have": 7}',
                                     b'{"have": "' + b"A" * 64 + b'"}', b" " * (MAX_REQUEST_BYTES + 1)])
def test_a_malformed_request_is_refused_and_counted(payload: bytes) -> None:
    sent, acks = Sent(), []
    server = CatchUp(TOPICS, clock=Clock())
    assert parse_request(payload) is None
    assert not server.serve("dev-1", payload, fleet(acks), sent)
    assert server.refused == {"malformed": 1} and not sent.messages and not acks


def test_no_model_yet_means_only_the_ack() -> None:
    sent, acks = Sent(), []
    assert CatchUp(TOPICS, clock=Clock()).serve("dev-1", b"{}", fleet(acks, model=b""), sent)
    assert sent.messages == [] and acks == ["dev-1"]


def test_an_agent_asks_when_nothing_came_after_connecting_and_after_every_reconnect() -> None:
    schedule = CatchUpSchedule(wait_s=3.0, retry_s=(5.0, 20.0))
    assert not schedule.due(0.0, 0, lacking=True)  # not connected
    assert not schedule.due(10.0, 1, lacking=True)  # just connected: retained messages come first
    assert not schedule.due(12.9, 1, lacking=True)
    asked = [t for t in range(13, 80) if schedule.due(float(t), 1, lacking=True)]
    assert asked == [13, 18, 28, 48, 68]  # then again, backing off to the maximum
    assert not schedule.due(90.0, 1, lacking=False)  # it has the model now
    assert not schedule.due(100.0, 2, lacking=False)  # reconnected: wait first ...
    assert schedule.due(103.0, 2, lacking=False)  # ... then ask once, it may have missed a model
    assert not schedule.due(200.0, 2, lacking=False)
    first = CatchUpSchedule(wait_s=3.0)
    assert not first.due(0.0, 1, lacking=False) and not first.due(5.0, 1, lacking=False)  # retained did it


def test_request_body_names_the_model_held() -> None:
    assert json.loads(request_body()) == {}
    assert json.loads(request_body(MODEL)) == {"have": hashlib.sha256(MODEL).hexdigest()}
    assert parse_request(request_body(MODEL)) == {"have": hashlib.sha256(MODEL).hexdigest()}


def test_topics() -> None:
    assert TOPICS.catch_up("pump-01") == "fledger/plant/catchup/pump-01"
    assert TOPICS.catch_up_requester_of("fledger/plant/catchup/pump-01") == "pump-01"
    assert TOPICS.catch_up_requester_of("fledger/plant/catchup/pump-01/model") is None
    assert TOPICS.catch_up_requester_of("fledger/plant/ledger/replay/x") is None
    assert TOPICS.catch_up_kind_of("monitor", TOPICS.catch_up_reply("monitor", "head")) == "head"
    with pytest.raises(ValueError):
        TOPICS.catch_up_reply("monitor", "secrets")


def clear_retained(host: str, port: int, topics: list[str]) -> None:
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="clear-retained")
    client.connect(host, port)
    client.loop_start()
    try:
        for topic in topics:
            client.publish(topic, b"", qos=1, retain=True).wait_for_publish(5)
    finally:
        client.disconnect()
        client.loop_stop()


def test_agents_get_the_model_by_asking_when_the_broker_hands_them_no_retained_one(tmp_path: Path) -> None:
    """What a device on another RabbitMQ node sees: the model was published, but the broker it
    is connected to has no retained copy. The agents ask, train, and the rounds complete."""
    with running(Mosquitto(tmp_path / "broker")) as broker:
        # A long heartbeat: no status is republished on its own while `fledger status` waits.
        fed = Federation(tmp_path, broker.host, broker.port, rounds=2, extra_coordinator=["--heartbeat", "60"])
        topics = Topics(fed.fleet)
        try:
            fed.start_coordinator()
            wait_for("the first model", lambda: any(r["type"] == "model.published" for r in ledger_records(fed)),
                     60, fed)
            time.sleep(1.0)  # published to the broker just after its ledger record
            # The retained model, its chunks and the status are gone, as on a node that never got them.
            clear_retained(broker.host, broker.port, [topics.model, topics.status,
                                                      *(f"{topics.model}/chunk/{i}" for i in range(8))])
            status = subprocess.run([*fed._cli(), "status", *fed.broker_args(), "--fleet", fed.fleet,
                                     "--coordinator-key", str(fed.keys / keytool.COORDINATOR_FILE), "--json",
                                     "--timeout", "8"], capture_output=True, timeout=60)
            assert status.returncode == 0, status.stderr.decode()
            assert json.loads(status.stdout)["status"]["round"] == 1  # the answer to its catch-up request
            for i in range(len(fed.devices)):
                fed.start_agent(i)
            finish(fed, timeout=90)
        finally:
            fed.stop()
    check_final_ledger(fed, 2)
    for device in fed.devices:
        assert "asked the coordinator to catch us up (no model yet)" in log_text(fed, device)


def test_a_limit_set_by_flag_is_enforced_and_the_refusal_is_a_metric(embedded_broker: BrokerInfo,
                                                                     tmp_path: Path) -> None:
    """`--catch-up-window-requests 1` on a real coordinator and broker: of two monitors asking at
    once, the first gets the status and ledger head, the second nothing (the default allows 2,000),
    and Prometheus counts one served and one refused as `busy`."""
    from tests.test_observability import scrape, value

    metrics_port = free_port()
    fed = Federation(tmp_path, embedded_broker.host, embedded_broker.port, rounds=0,
                     extra_coordinator=["--metrics-port", str(metrics_port), "--catch-up-window-requests", "1"])
    topics = Topics(fed.fleet)
    received: list[str] = []
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="catch-up-asker")
    client.on_message = lambda _c, _u, message: received.append(message.topic)
    client.connect(embedded_broker.host, embedded_broker.port)
    client.loop_start()
    try:
        for topic in (topics.status, topics.catch_up_replies("monitor-a"), topics.catch_up_replies("monitor-b")):
            client.subscribe(topic, qos=1)
        fed.start_coordinator()
        # Its retained status: it is connected and subscribed to the catch-up requests.
        wait_for("the coordinator's status", lambda: topics.status in received, 120, fed)
        for asker in ("monitor-a", "monitor-b"):
            client.publish(topics.catch_up(asker), b"{}", qos=1).wait_for_publish(10)
        refused = "fledger_coordinator_catch_up_refused_total"
        wait_for("one refusal counted", lambda: value(scrape(metrics_port), refused, reason="busy") == 1, 60, fed)
        samples = scrape(metrics_port)
        assert value(samples, "fledger_coordinator_catch_up_served_total") == 1
        wait_for("the first monitor's answer", lambda: topics.catch_up_reply("monitor-a", "head") in received, 30, fed)
        assert topics.catch_up_reply("monitor-a", "status") in received
        assert not [t for t in received if t.startswith(topics.catch_up("monitor-b"))]
        assert "catch-up request from monitor-b refused: busy" in log_text(fed, "coordinator")
        # Ledger replays are counted the same way: of two requests at once, the second is too soon.
        for _ in range(2):
            client.publish(topics.ledger_replay("monitor"), b'{"from": 0}', qos=1).wait_for_publish(10)
        wait_for("the replay refusal counted",
                 lambda: value(scrape(metrics_port), "fledger_coordinator_replay_refused_total",
                               reason="too_often") == 1, 60, fed)
        assert value(scrape(metrics_port), "fledger_coordinator_replay_served_total") == 1
    finally:
        client.loop_stop()
        client.disconnect()
        fed.stop()
