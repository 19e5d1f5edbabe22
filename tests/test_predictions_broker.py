"""Paid predictions on mosquitto with the deploy config (TLS, passwords, deploy/mosquitto/fledger.acl
plus the lines `fledger keys add-client` prints): roles kept apart by the broker, and the whole
path (owner deposit, client request, signed reply) over MQTT 3.1.1 with real processes."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

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
        deposit = subprocess.run([*cli, "credits", "deposit", "alice", "5", "--keys",
                                  str(fed.keys / keytool.COORDINATOR_FILE), *login("owner"), "--timeout", "120"],
                                 capture_output=True, text=True, timeout=240)
        assert deposit.returncode == 0, deposit.stderr + fed.log_tail()
        answered = subprocess.run([*cli, "predict", "--remote", "--data", str(rows), "--bundle",
                                   str(keytool.client_bundle_path(fed.keys, "alice")), *login("alice"),
                                   "--timeout", "120"], capture_output=True, text=True, timeout=240)
        assert answered.returncode == 0, answered.stderr + fed.log_tail()
        assert answered.stdout.splitlines()[0] == "row,prediction" and "fee 3, balance 2" in answered.stderr
    finally:
        fed.stop()
