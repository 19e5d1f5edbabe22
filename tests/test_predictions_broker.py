"""Paid predictions on mosquitto with the deploy config (TLS, passwords, deploy/mosquitto/fledger.acl
plus the lines `fledger keys add-client` prints): roles kept apart by the broker, and the whole
path (owner deposit, client request, signed reply) with real processes, over MQTT 5 (response
topic and correlation data) and over MQTT 3.1.1."""

from __future__ import annotations

import queue
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from federation import prediction_wire as wire
from federation.mqtt import BrokerConfig, Message, MqttLink
from federation.topics import Topics
from fledger import keytool
from tests.conftest import Mosquitto
from tests.federation_run import Federation
from tests.test_broker_security import ACL, Client, SecureBroker, make_pki, test_config_from_deploy, token

FLEET = "shop"
USERS = ("coordinator", "owner", "alice", "pump-01")
BASE = f"fledger/{FLEET}"


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureBroker]:
    base = tmp_path_factory.mktemp("predictions-broker")
    pki = make_pki(base / "pki", *USERS)
    keys = base / "keys"
    keytool.init_fleet(keys, FLEET)
    keytool.add_device(keys, "pump-01")
    acl = base / "fledger.acl"  # the deploy ACL plus what `fledger keys add-client alice` prints
    acl.write_text(ACL.read_text() + "\nuser alice\ntopic write fledger/+/predict/alice/request\n"
                   "topic read fledger/+/predict/alice/reply\n")
    state = base / "state"
    state.mkdir()
    config = test_config_from_deploy(pki, state).replace(str(ACL), str(acl))
    mosquitto = Mosquitto(base / "mosquitto", extra_config=config).start()
    try:
        yield SecureBroker(mosquitto.host, mosquitto.port, pki, pki / "ca.crt")
    finally:
        mosquitto.stop()


def test_only_clients_reach_their_own_request_topic_and_only_the_owner_orders(broker: SecureBroker) -> None:
    genuine, order = token("alice"), token("owner")
    with Client(broker, "coordinator") as coordinator, Client(broker, "alice") as alice, \
            Client(broker, "pump-01") as device, Client(broker, "owner") as owner:
        coordinator.subscribe(f"{BASE}/predict/+/request")
        coordinator.subscribe(f"{BASE}/credits/order")
        device.publish(f"{BASE}/predict/pump-01/request", token("device"))  # a device buys nothing
        alice.publish(f"{BASE}/predict/bob/request", token("as-bob"))  # nor on another's topic
        device.publish(f"{BASE}/credits/order", token("device-order"))
        alice.publish(f"{BASE}/credits/order", token("alice-order"))
        owner.publish(f"{BASE}/credits/order", order)
        alice.publish(f"{BASE}/predict/alice/request", genuine)  # the sentinel
        got = coordinator.collect_until(genuine)
    assert sorted((t, p) for t, p, _ in got) == sorted([(f"{BASE}/credits/order", order),
                                                       (f"{BASE}/predict/alice/request", genuine)])


def test_replies_reach_only_their_client(broker: SecureBroker) -> None:
    reply = token("reply")
    with Client(broker, "coordinator") as coordinator, Client(broker, "alice") as alice, \
            Client(broker, "pump-01") as device:
        alice.subscribe(f"{BASE}/predict/+/reply")
        device.subscribe(f"{BASE}/predict/+/reply")
        alice.publish(f"{BASE}/predict/alice/reply", token("forged"))  # only the coordinator answers
        coordinator.publish(f"{BASE}/predict/alice/reply", reply)
        got = alice.collect_until(reply)
        assert [p for _, p, _ in got] == [reply]
        assert device.messages.empty()


def test_paid_prediction_over_mosquitto(broker: SecureBroker, tmp_path: Path) -> None:
    def login(user: str) -> list[str]:
        return ["--broker-host", broker.host, "--broker-port", str(broker.port), "--username", user,
                "--password-file", str(broker.pki / f"{user}.password"), "--tls-ca", str(broker.pki / "ca.crt")]

    fed = Federation(tmp_path, broker.host, broker.port, fleet=FLEET, devices=("pump-01",), rounds=0)
    keytool.add_client(fed.keys, "alice")
    fed.broker_args = lambda: login("coordinator")  # type: ignore[method-assign]
    fed.extra_coordinator = ["--clients", str(fed.keys / keytool.CLIENTS_FILE), "--predict-fee", "3"]
    rows = tmp_path / "rows.csv"
    rows.write_text("MedInc,HouseAge,AveRooms,AveBedrms,Population,AveOccup,Latitude,Longitude\n"
                    "8.3252,41.0,6.98,1.02,322.0,2.56,37.88,-122.23\n")
    cli = [sys.executable, "-m", "fledger.cli", "--log-level", "WARNING"]
    try:
        fed.start_coordinator()
        deposit = subprocess.run([*cli, "credits", "deposit", "alice", "20", "--keys",
                                  str(fed.keys / keytool.COORDINATOR_FILE), *login("owner"), "--timeout", "120"],
                                 capture_output=True, text=True, timeout=240)
        assert deposit.returncode == 0, deposit.stderr + fed.log_tail()
        answered = subprocess.run([*cli, "predict", "--remote", "--data", str(rows), "--bundle",
                                   str(keytool.client_bundle_path(fed.keys, "alice")), *login("alice"),
                                   "--timeout", "120"], capture_output=True, text=True, timeout=240)
        assert answered.returncode == 0, answered.stderr + fed.log_tail()
        assert answered.stdout.splitlines()[0] == "row,prediction" and "fee 3, balance 17" in answered.stderr

        bundle = wire.ClientBundle.load(keytool.client_bundle_path(fed.keys, "alice"))
        topics = Topics(FLEET)
        own, request = wire.reply_topic(topics, "alice"), wire.request_topic(topics, "alice")
        row = np.array([[8.3252, 41.0, 6.98, 1.02, 322.0, 2.56, 37.88, -122.23]], np.float32)

        def ask(link: MqttLink, response_topic: str | None) -> tuple[Message, wire.PredictionReply]:
            pending = wire.seal_request(bundle, row)
            link.publish(request, pending.payload, response_topic=response_topic, correlation=pending.request_id)
            message = link.inbox.get(timeout=60)
            return message, wire.open_reply(message.payload, bundle, pending)

        config = {"broker_host": broker.host, "broker_port": broker.port, "username": "alice",
                  "password_file": broker.pki / "alice.password", "tls_ca": broker.pki / "ca.crt"}
        v5 = MqttLink(BrokerConfig(**config, mqtt_version="5"), "alice-v5", subscriptions=[own], persistent=False)
        assert v5.start(timeout=30) and v5.mqtt5
        try:
            time.sleep(0.5)  # the subscription is made right after the connect
            message, reply = ask(v5, own)  # MQTT 5: answered on the response topic, correlation echoed
            assert reply.status == "ok" and reply.balance == 14 and message.topic == own
            assert message.correlation == reply.request_id
            # Another client's reply topic as the response topic: the answer still comes to alice.
            message, reply = ask(v5, wire.reply_topic(topics, "bob"))
            assert reply.status == "ok" and reply.balance == 11 and message.topic == own
            assert message.correlation == reply.request_id
        finally:
            v5.stop()
        v3 = MqttLink(BrokerConfig(**config, mqtt_version="3.1.1"), "alice-v3", subscriptions=[own],
                      persistent=False)
        assert v3.start(timeout=30) and not v3.mqtt5
        try:
            time.sleep(0.5)  # the subscription is made right after the connect
            message, reply = ask(v3, own)  # MQTT 3.1.1: no properties, the fixed topic
            assert reply.status == "ok" and reply.balance == 8 and message.correlation is None
            with pytest.raises(queue.Empty):
                v3.inbox.get(timeout=1)  # one request, one answer
        finally:
            v3.stop()
        assert "names the response topic" in (fed.logs / "coordinator.log").read_text()
    finally:
        fed.stop()
