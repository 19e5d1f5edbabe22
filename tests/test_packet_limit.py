"""A broker with a packet limit below the model's size (issue 21).

Pure parts (the payload limit, the refusal, the disconnect diagnosis) without a network;
then a real mosquitto with ``max_packet_size 10000`` (the csv/California model is ~19.8 KB)
and real coordinator and agent processes with every fledger setting at its default.
"""

from __future__ import annotations

import os
import queue
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Mosquitto, running
from federation_run import Federation

from federation.chunking import split
from federation.fleet_state import verify_file
from federation.mqtt import BrokerConfig, MqttLink
from federation.packet_limit import (
    DEFAULT_MAX_PAYLOAD,
    OversizeWatch,
    payload_limit,
    publish_overhead,
    refusal,
)
from federation.topics import Topics
from fledger.broker import EmbeddedBroker
from fledger.keytool import write_broker_password

LIMIT = 10_000
LONGEST_MODEL_TOPIC = Topics("f" * 64, "p" * 64).model  # names are at most 64 characters


# -- pure ------------------------------------------------------------------------------------------

def test_default_frame_fits_the_strictest_common_broker() -> None:
    # AWS IoT Core: 128 KB per message, whether KB means 1,000 or 1,024 bytes.
    topic = LONGEST_MODEL_TOPIC + "/chunk/999999999"
    for mqtt5 in (False, True):
        assert DEFAULT_MAX_PAYLOAD + publish_overhead(topic, DEFAULT_MAX_PAYLOAD, mqtt5=mqtt5) <= 128_000
    assert BrokerConfig().max_payload == DEFAULT_MAX_PAYLOAD  # chunking is on by default


@pytest.mark.parametrize("mqtt5", [False, True])
def test_limit_follows_the_broker_and_every_frame_fits(mqtt5: bool) -> None:
    limit = payload_limit(DEFAULT_MAX_PAYLOAD, LIMIT, LONGEST_MODEL_TOPIC, mqtt5=mqtt5)
    assert 9_500 < limit < LIMIT
    for frame in split(os.urandom(50_000), limit):
        chunk_topic = LONGEST_MODEL_TOPIC + "/chunk/0"
        assert len(frame) + publish_overhead(chunk_topic, len(frame), mqtt5=mqtt5) <= LIMIT
    assert payload_limit(4_000, LIMIT, "t", mqtt5=mqtt5) == 4_000  # a lower setting wins
    assert payload_limit(DEFAULT_MAX_PAYLOAD, None, "t", mqtt5=mqtt5) == DEFAULT_MAX_PAYLOAD  # no stated limit
    assert payload_limit(0, LIMIT, "t", mqtt5=mqtt5) == 0  # chunking switched off stays off
    with pytest.raises(ValueError, match="maximum packet size of 200 bytes"):
        payload_limit(DEFAULT_MAX_PAYLOAD, 200, "t", mqtt5=mqtt5)


def test_refusal_names_the_size_and_the_setting() -> None:
    assert refusal(9_000, "a/b", LIMIT, mqtt5=True) is None
    assert refusal(50_000, "a/b", None, mqtt5=True) is None  # the broker said nothing
    reason = refusal(19_873, "fledger/x/model/global", LIMIT, mqtt5=True)
    assert reason is not None
    assert "19,873-byte" in reason and "fledger/x/model/global" in reason and "10,000" in reason
    assert "--max-payload" in reason and "it is 0: chunking is off" in reason


def test_a_disconnect_after_a_large_publish_is_diagnosed_and_a_repeat_detected() -> None:
    watch = OversizeWatch(configured=0)
    watch.connected()
    model = watch.sending("fledger/x/model/global", 19_873)
    assert watch.sending("fledger/x/presence/a", 200) is None  # small: never blamed
    diagnosis, repeat = watch.disconnected()  # dropped before paho's publish() even returned
    assert diagnosis is not None and not repeat  # once may be the network
    assert "19,873-byte publish on fledger/x/model/global" in diagnosis and "--max-payload" in diagnosis
    assert "it is 0: chunking is off" in diagnosis  # says what the setting is now
    watch.sent(model, 1)
    watch.sent(watch.sending("fledger/x/model/global", 19_873), 3)  # republished on reconnect
    assert watch.disconnected() == (None, False)  # refused or dropped before CONNACK: nothing was re-sent
    watch.connected()
    assert watch.disconnected()[1]  # dropped again over the same message, once accepted: a loop
    for mid in (1, 3):
        watch.acknowledged(mid)
    watch.connected()
    assert watch.disconnected() == (None, False)  # nothing large outstanding: not ours to explain

    certain = OversizeWatch(configured=120_000)
    certain.sent(certain.sending("t", 50_000), 7)  # "Packet too large" is certain, accepted or not
    diagnosis, repeat = certain.disconnected(too_large=True)  # MQTT 5 "Packet too large"
    assert repeat and diagnosis is not None and "it is 120,000" in diagnosis

    recovered = OversizeWatch(configured=0)
    recovered.connected()
    first = recovered.sending("t", 50_000)
    recovered.disconnected()
    recovered.acknowledged(1)  # acknowledged before paho's publish() returned its id
    recovered.sent(first, 1)
    recovered.sent(recovered.sending("t", 50_000), 2)
    recovered.connected()
    assert not recovered.disconnected()[1]  # the first got through: not a loop

    flapping = OversizeWatch(configured=0)  # a cluster node drops every reconnect before accepting it
    flapping.connected()
    flapping.sent(flapping.sending("t", 19_895), 5)
    assert flapping.disconnected()[0] is not None  # the first drop, on an accepted connection
    for _ in range(3):
        assert flapping.disconnected() == (None, False)  # refused reconnects: no blame, no give-up


def test_a_message_no_larger_than_one_acknowledged_is_never_blamed() -> None:
    """A NATS cluster that lost a node closed the coordinator's connection twice while its
    retained model (20,406 bytes) was outstanding; models of that size had gone through all
    along, so the broker's limit cannot be the cause, and the link must keep reconnecting."""
    watch = OversizeWatch(configured=120_000)
    watch.connected()
    watch.sent(watch.sending("fledger/x/model/global", 20_406), 1)
    watch.acknowledged(1)  # earlier rounds' models went through
    for mid in (2, 3, 4):  # the same model outstanding at each drop, on accepted connections
        watch.sent(watch.sending("fledger/x/model/global", 20_406), mid)
        watch.connected()
        assert watch.disconnected() == (None, False)
    watch.sent(watch.sending("fledger/x/model/global", 20_407), 5)  # one byte larger: may be the limit
    watch.connected()
    assert watch.disconnected()[0] is not None
    watch.connected()
    assert watch.disconnected()[1]  # and dropped again over it: a loop, as before


# -- a real mosquitto with a small packet limit ----------------------------------------------------

@pytest.fixture
def small_broker(tmp_path: Path) -> Iterator[Mosquitto]:
    with running(Mosquitto(tmp_path / "mosquitto", extra_config=f"max_packet_size {LIMIT}")) as broker:
        yield broker


def _oversize_disconnects(broker: Mosquitto) -> int:
    return (broker.directory / "mosquitto.log").read_text(errors="replace").count("oversize packet")


def _link(broker: Mosquitto, client_id: str, *subscriptions: str) -> MqttLink:
    """A started link with every setting at its default."""
    link = MqttLink(BrokerConfig(broker_host=broker.host, broker_port=broker.port), client_id,
                    subscriptions=list(subscriptions))
    link.start(timeout=20)
    return link


def test_mqtt5_link_learns_the_limit_and_keeps_its_session(small_broker: Mosquitto) -> None:
    """Defaults on mosquitto: MQTT 5, the CONNACK limit applied, and QoS 1 messages sent while a
    subscriber was offline still delivered (clean_start=False, a session that never expires)."""
    receiver = _link(small_broker, "t-receiver", "t/update/+")
    sender = _link(small_broker, "t-sender")
    try:
        assert receiver.mqtt5 and receiver.broker_max_packet == LIMIT
        receiver.stop()  # offline: the broker keeps its session and queues for it
        message = os.urandom(60_000)
        assert sender.publish("t/update/dev", message, wait=10)
        receiver = _link(small_broker, "t-receiver", "t/update/+")
        got = receiver.inbox.get(timeout=20)
        assert got.payload == message and got.topic == "t/update/dev"
        assert sender.failed is None and _oversize_disconnects(small_broker) == 0
    finally:
        receiver.stop()
        sender.stop()


@pytest.mark.parametrize("login", [False, True])
def test_amqtt_gets_mqtt_3_1_1_in_auto_mode(tmp_path: Path, login: bool) -> None:
    """With the fleet's logins (the embedded broker's default) as without: amqtt misreads an
    MQTT 5 CONNECT that carries a login and never answers it, so the probe must not carry one."""
    passwords = tmp_path / "passwords"
    write_broker_password(passwords, "coordinator", "coordinator-password")
    (tmp_path / "coordinator.password").write_text("coordinator-password\n")
    (tmp_path / "acl").write_text("user coordinator\ntopic readwrite t/#\n")  # the test's topic
    with EmbeddedBroker(password_file=passwords if login else None,
                        acl_file=tmp_path / "acl" if login else None) as broker:
        config = BrokerConfig(broker_host=broker.host, broker_port=broker.port,
                              **({"username": "coordinator", "password_file": tmp_path / "coordinator.password"}
                                 if login else {}))
        _auto_link_on_amqtt(config)


def _auto_link_on_amqtt(config: BrokerConfig) -> None:
    link = MqttLink(config, "t-auto", subscriptions=["t/x"])
    started = time.monotonic()
    link.start(timeout=20)
    try:
        assert not link.mqtt5 and link.broker_max_packet is None
        assert time.monotonic() - started < 4  # refused at once, not found out by a timeout
        message = os.urandom(300_000)  # three frames at the default limit
        assert link.publish("t/x", message, wait=10)
        assert link.inbox.get(timeout=10).payload == message
    finally:
        link.stop()


def test_full_run_with_default_settings_under_a_small_packet_limit(small_broker: Mosquitto, tmp_path: Path) -> None:
    fed = Federation(tmp_path, small_broker.host, small_broker.port, rounds=1, limit=200)
    try:
        fed.start_all()
        assert fed.wait("coordinator", 180) == 0, fed.log_tail()
        for device in fed.devices:
            assert fed.wait(device, 60) == 0, fed.log_tail()
    finally:
        fed.stop()
    assert verify_file(fed.state / "ledger.log").ok
    assert (fed.state / "models" / "global-000002.safetensors").stat().st_size > LIMIT  # really too big whole
    assert "maximum packet size 10,000 bytes" in (fed.logs / "coordinator.log").read_text()
    assert _oversize_disconnects(small_broker) == 0


def _the_oversize_error(log: str) -> str:
    """The one ERROR line of a process whose publish was over the broker's limit: it names a size
    above that limit."""
    errors = [line for line in log.splitlines() if " ERROR " in line and "-byte" in line]
    assert len(errors) == 1, log
    size = re.search(r"(\d[\d,]*)-byte", errors[0])
    assert size and int(size.group(1).replace(",", "")) > LIMIT
    return errors[0]


@pytest.mark.parametrize(("version", "max_payload"), [("auto", "0"), ("3.1.1", "0"), ("3.1.1", None)])
def test_chunking_off_one_error_with_size_and_setting_and_no_loop(
    small_broker: Mosquitto, tmp_path: Path, version: str, max_payload: str | None,
) -> None:
    """MQTT 5 (auto on mosquitto): the broker's stated limit refuses the model before sending it.
    MQTT 3.1.1: the broker drops the connection; the re-send is dropped too and the coordinator
    stops, instead of publishing the model ~100 times a minute. The same with chunking on at
    its default over 3.1.1, where the broker's limit (10,000) is below the default frame size
    and nothing tells fledger: the line then says what the setting is now."""
    fed = Federation(tmp_path, small_broker.host, small_broker.port, rounds=1,
                     extra_coordinator=[*(["--max-payload", max_payload] if max_payload else []),
                                        "--mqtt-version", version])
    try:
        fed.start_coordinator()
        code = fed.wait("coordinator", 90)
    finally:
        fed.stop()
    log = (fed.logs / "coordinator.log").read_text()
    error = _the_oversize_error(log)
    assert "fledger/test/model/global" in error and "--max-payload" in error
    # the setting's current value: the user knows what to change
    assert ("it is 0: chunking is off" if max_payload == "0" else f"it is {DEFAULT_MAX_PAYLOAD:,}") in error
    assert code == 4, log  # stopped with the broker's exit code
    # At most one reconnect of its link, then it stopped (the start-up probe of the retained
    # head is a separate, short-lived client: "-probe").
    assert log.count("as fledger-coordinator-test (") <= 2, log
    assert _oversize_disconnects(small_broker) == (0 if version == "auto" else 2)  # sent twice, not in a loop


def test_an_agent_with_chunking_off_stops_on_its_oversized_update(small_broker: Mosquitto, tmp_path: Path) -> None:
    """The device side of the diagnosis: its update is over the broker's unstated limit (MQTT
    3.1.1, chunking off), so the broker drops it; the agent says so once, with the size and the
    setting, and exits with the broker's code instead of re-sending the update for ever."""
    fed = Federation(tmp_path, small_broker.host, small_broker.port, rounds=1, devices=("edge-1",), limit=200,
                     extra_agent=["--max-payload", "0", "--mqtt-version", "3.1.1"])
    try:
        fed.start_all()
        code = fed.wait("edge-1", 120)
    finally:
        fed.stop()
    log = (fed.logs / "edge-1.log").read_text()
    error = _the_oversize_error(log)
    assert "fledger/test/update/edge-1" in error and "it is 0: chunking is off" in error, error
    assert code == 4, log
    assert _oversize_disconnects(small_broker) == 2  # sent twice, not in a loop
    # nothing of the device reached the ledger: the coordinator never got the update
    assert "accepted update from edge-1" not in (fed.logs / "coordinator.log").read_text()


def test_replayed_ledger_blocks_are_framed_too(small_broker: Mosquitto) -> None:
    """publish_all (the coordinator's ledger replays) frames every message: one bigger than the
    broker's limit arrives whole."""
    receiver = _link(small_broker, "t-monitor", "t/ledger/blocks")
    sender = _link(small_broker, "t-coordinator")
    try:
        blocks = [os.urandom(n) for n in (100, 25_000, 3_000)]
        acknowledged = sender.publish_all("t/ledger/blocks", blocks)
        got = []
        while len(got) < len(blocks):
            try:
                got.append(receiver.inbox.get(timeout=20).payload)
            except queue.Empty:
                break
        assert got == blocks
        # The broker may deliver before the sender's network thread has read every PUBACK.
        deadline = time.monotonic() + 20
        while not acknowledged() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert acknowledged()
    finally:
        receiver.stop()
        sender.stop()
