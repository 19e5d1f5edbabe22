"""Broker-side security against a REAL mosquitto running deploy/mosquitto/fledger.conf + .acl.

The PKI (test CA, server certificate, password file, one random password per user) is made
at test time by scripts/make-test-pki.sh; nothing secret is committed. The production
config is used as written, with only paths, the listener port and logging rewritten to the
test's temporary directory, so these tests check what deploy/ ships.

ACL checks assert on DELIVERY, never on SUBACK/PUBACK: mosquitto 2.0.11 grants a denied
SUBSCRIBE and acknowledges a denied PUBLISH (MQTT 3.1.1). To prove that a forbidden message
was not delivered without long sleeps, each test sends it first and then an allowed
"sentinel" message over the same path: the broker keeps per-client order, so once the
sentinel arrives, the forbidden message would have arrived before it.
"""

from __future__ import annotations

import contextlib
import hashlib
import queue
import ssl
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from federation import codec
from federation.chunking import parse_frame
from federation.envelope import decrypt_update, parse_update, seal_update, verify_update_signature
from federation.keys import CoordinatorKeys, DeviceBundle
from federation.mqtt import BrokerConfig, MqttLink
from federation.topics import Topics
from fledger.broker import EmbeddedBroker, free_port
from fledger.keytool import write_broker_password
from tests.conftest import Mosquitto

ROOT = Path(__file__).resolve().parent.parent
PKI_SCRIPT = ROOT / "scripts" / "make-test-pki.sh"
CONF = ROOT / "deploy" / "mosquitto" / "fledger.conf"
ACL = ROOT / "deploy" / "mosquitto" / "fledger.acl"  # a link to fledger/fledger.acl, what amqtt enforces

FLEET = "plant7"
DEV_A, DEV_B = "pump-01", "pump-02"
USERS = ("coordinator", "monitor", "operator", "owner", DEV_A, DEV_B)
TOPICS = Topics(FLEET)
QUIET = 0.5  # seconds to keep listening after the sentinel, for stragglers


# -- fixtures ---------------------------------------------------------------------------------


def make_pki(directory: Path, *users: str) -> Path:
    subprocess.run(["bash", str(PKI_SCRIPT), str(directory), *users], check=True, capture_output=True, timeout=60)
    return directory


def test_config_from_deploy(pki: Path, state: Path, *, standalone: bool = True) -> str:
    """deploy/mosquitto/fledger.conf with paths pointed at ``pki``/``state``.

    The `listener 8883` line is dropped: conftest's Mosquitto writes its own listener line
    (free port, 127.0.0.1) first, and the TLS lines that follow attach to it."""
    paths = {
        "cafile": pki / "ca.crt", "certfile": pki / "server.crt", "keyfile": pki / "server.key",
        "password_file": pki / "passwd", "acl_file": ACL, "persistence_location": state,
    }
    lines: list[str] = []
    seen: set[str] = set()
    for raw in CONF.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, _, _value = line.partition(" ")
        if key in ("listener", "log_dest", "user", "pid_file"):
            continue
        if key in paths:
            line = f"{key} {paths[key]}{'/' if key == 'persistence_location' else ''}"
        seen.add(key)
        lines.append(line)
    missing = {"allow_anonymous", "password_file", "acl_file", "cafile", "certfile", "keyfile"} - seen
    assert not missing, f"deploy config lacks {missing}"
    if standalone:  # what Debian's main mosquitto.conf supplies when it includes ours
        lines.append(f"persistence_location {state}/")
    assert "allow_anonymous false" in lines
    # Running as root, mosquitto would drop to user `mosquitto`, which cannot read the 0600
    # test files; the production unit runs it as its packaged user with 0640 root:mosquitto.
    lines.append("user root")
    return "\n".join(lines) + "\n"


test_config_from_deploy.__test__ = False  # type: ignore[attr-defined]  # a helper, not a test


@dataclass
class SecureBroker:
    host: str
    port: int
    pki: Path
    wrong_ca: Path

    def password(self, user: str) -> str:
        return (self.pki / f"{user}.password").read_text().strip()

    def link_config(self, user: str | None, *, ca: Path | None = None) -> BrokerConfig:
        return BrokerConfig(
            broker_host=self.host, broker_port=self.port, username=user,
            password_file=self.pki / f"{user}.password" if user else None,
            tls_ca=ca or self.pki / "ca.crt",
        )


@pytest.fixture(scope="module")
def secure_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureBroker]:
    base = tmp_path_factory.mktemp("broker-security")
    pki = make_pki(base / "pki", *USERS)
    wrong = make_pki(base / "other-pki", "nobody")  # a different CA, same subject names
    for user in USERS:
        assert (pki / f"{user}.password").stat().st_mode & 0o777 == 0o600
    state = base / "state"
    state.mkdir()
    broker = Mosquitto(base / "mosquitto", extra_config=test_config_from_deploy(pki, state)).start()
    try:
        yield SecureBroker(broker.host, broker.port, pki, wrong / "ca.crt")
    finally:
        broker.stop()


def test_deploy_config_loads_as_debian_includes_it(tmp_path: Path) -> None:
    """deploy/README installs fledger.conf into conf.d, included by Debian's mosquitto.conf,
    which sets persistence and its location itself: the pair must load (a duplicate
    persistence_location is fatal) and the TLS listener must take a login."""
    from tests.conftest import MOSQUITTO, wait_port

    assert MOSQUITTO is not None, "mosquitto is not installed (scripts/setup.sh installs it)"
    pki = make_pki(tmp_path / "pki", "coordinator")
    state = tmp_path / "state"
    state.mkdir()
    conf_d = tmp_path / "conf.d"
    conf_d.mkdir()
    port = free_port()
    included = test_config_from_deploy(pki, state, standalone=False)
    (conf_d / "fledger.conf").write_text(f"listener {port} 127.0.0.1\n{included}")  # as deploy's `listener 8883`
    main = tmp_path / "mosquitto.conf"  # the parts of Debian's main file that matter here
    main.write_text(f"persistence true\npersistence_location {state}/\nlog_dest stderr\ninclude_dir {conf_d}\n")
    with open(tmp_path / "mosquitto.log", "wb") as log:
        proc = subprocess.Popen([MOSQUITTO, "-c", str(main)], stdout=log, stderr=subprocess.STDOUT)
    try:
        try:
            wait_port("127.0.0.1", port)
        except Exception:
            raise AssertionError((tmp_path / "mosquitto.log").read_text()) from None
        with Client(SecureBroker("127.0.0.1", port, pki, pki / "ca.crt"), "coordinator"):
            pass  # a TLS login as the coordinator works
    finally:
        proc.terminate()
        proc.wait(timeout=10)


# -- a small synchronous paho client (waits for CONNACK, SUBACK and PUBACK) ---------------------


class Client:
    def __init__(self, broker: SecureBroker | tuple[str, int], user: str | None, password: str | None = None,
                 *, ca: Path | None = None, own_password: bool = True) -> None:
        """``password`` None: the user's own password from the test PKI, or none at all if
        ``own_password`` is False."""
        self.messages: queue.Queue[tuple[str, bytes, bool]] = queue.Queue()
        self._connack = threading.Event()
        self._subacks: dict[int, threading.Event] = {}
        self._failed: set[int] = set()  # mids of SUBACKs that said failure
        self.refused: list[str] = []  # filters whose SUBACK said failure (0x80)
        self.reason: Any = None
        self._client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"t-{user}-{uuid.uuid4().hex[:8]}",
                                   clean_session=True, protocol=paho.MQTTv311)
        if isinstance(broker, SecureBroker):
            self.host, self.port = broker.host, broker.port
            if user is not None and password is None and own_password:
                password = broker.password(user)
            self._client.tls_set_context(ssl.create_default_context(cafile=str(ca or broker.pki / "ca.crt")))
        else:
            self.host, self.port = broker
        if user is not None:
            self._client.username_pw_set(user, password)
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = lambda c, u, m: self.messages.put((m.topic, bytes(m.payload), bool(m.retain)))

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        self.reason = reason
        self._connack.set()

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, reasons: Any, properties: Any) -> None:
        if any(reason.is_failure for reason in reasons):
            self._failed.add(mid)
        self._subacks.setdefault(mid, threading.Event()).set()

    def connect(self, timeout: float = 10.0) -> bool:
        """True if the broker accepted; False if it refused (CONNACK failure or closed)."""
        self._client.connect(self.host, self.port, keepalive=30)
        self._client.loop_start()
        self._connack.wait(timeout)
        if self.reason is None or self.reason.is_failure:
            self.close()
            return False
        return True

    def __enter__(self) -> Client:
        assert self.connect(), f"broker refused the connection: {self.reason}"
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def will(self, topic: str, payload: bytes, *, retain: bool = False) -> Client:
        """A Last Will, set before :meth:`connect`."""
        self._client.will_set(topic, payload, qos=1, retain=retain)
        return self

    def drop(self) -> None:
        """Lose the connection without a DISCONNECT (the broker then publishes the Last Will)."""
        self._client.loop_stop()  # no reconnect
        sock = self._client.socket()
        if sock is not None:
            sock.close()

    def subscribe(self, topic: str) -> None:
        result, mid = self._client.subscribe(topic, qos=1)
        assert result == paho.MQTT_ERR_SUCCESS and mid is not None
        event = self._subacks.setdefault(mid, threading.Event())
        assert event.wait(10), "no SUBACK"
        if mid in self._failed:
            self.refused.append(topic)

    def publish(self, topic: str, payload: bytes, *, retain: bool = False, wait: bool = True) -> Any:
        """Publish at QoS 1; unless ``wait`` is False, wait for the PUBACK (else: the caller waits
        with :meth:`acked`, e.g. for the last of a batch: a client's publishes stay in order)."""
        info = self._client.publish(topic, payload, qos=1, retain=retain)
        if wait:
            self.acked(info)
        return info

    @staticmethod
    def acked(info: Any) -> None:
        info.wait_for_publish(timeout=10)
        assert info.is_published(), "no PUBACK"

    def collect_until(self, sentinel: bytes, timeout: float = 10.0,
                      quiet: float = QUIET) -> list[tuple[str, bytes, bool]]:
        """All messages received up to and including ``sentinel``, then ``quiet`` seconds more."""
        got: list[tuple[str, bytes, bool]] = []
        wait = timeout
        while True:
            try:
                message = self.messages.get(timeout=wait)
            except queue.Empty:
                break
            got.append(message)
            if message[1] == sentinel:
                wait = quiet
        assert any(payload == sentinel for _, payload, _ in got), f"sentinel never arrived; got {got}"
        return got


def token(label: str) -> bytes:
    return f"{label}-{uuid.uuid4().hex}".encode()


# -- ACL: what a device may publish -----------------------------------------------------------


def test_device_cannot_publish_to_another_devices_update_topic(secure_broker: SecureBroker) -> None:
    forged, genuine = token("forged"), token("genuine")
    with Client(secure_broker, "coordinator") as coordinator, Client(secure_broker, DEV_A) as device:
        coordinator.subscribe(f"fledger/{FLEET}/update/#")
        coordinator.subscribe(f"fledger/{FLEET}/presence/#")
        device.publish(TOPICS.update(DEV_B), forged)  # PUBACKed (3.1.1) but dropped
        device.publish(TOPICS.presence(DEV_B), forged, retain=True)
        device.publish(TOPICS.update(DEV_A), genuine)  # own topic: allowed, the sentinel
        got = coordinator.collect_until(genuine)
    assert [(t, p) for t, p, _ in got] == [(TOPICS.update(DEV_A), genuine)]


def reader_of(topic: str) -> str:
    """A user the ACL lets read ``topic`` (devices read the model; monitors the ledger and status)."""
    return DEV_B if topic.startswith(TOPICS.model) else "monitor"


def drain(client: Client, quiet: float = 0.3) -> None:
    """Forget what is already queued (e.g. the retained message sent on subscribe)."""
    while True:
        try:
            client.messages.get(timeout=quiet)
        except queue.Empty:
            return


@pytest.mark.parametrize("topic", [
    TOPICS.model, f"{TOPICS.model}/chunk/0", TOPICS.status, TOPICS.ledger_blocks, TOPICS.ledger_head,
    TOPICS.ledger_checkpoint,
])
def test_only_the_coordinator_publishes_model_status_and_ledger(secure_broker: SecureBroker, topic: str) -> None:
    """Above all, nobody else can overwrite the retained global model that every device loads."""
    evil, legit = token("evil"), token("coordinator")
    with Client(secure_broker, "coordinator") as coordinator, Client(secure_broker, "monitor") as monitor, \
            Client(secure_broker, DEV_A) as device, Client(secure_broker, reader_of(topic)) as observer:
        observer.subscribe(topic)
        drain(observer)
        device.publish(topic, evil, retain=True)
        monitor.publish(topic, evil, retain=True)
        coordinator.publish(topic, legit, retain=True)  # the sentinel
        got = observer.collect_until(legit)
    assert [p for _, p, _ in got] == [legit]
    # A client connecting later is handed the coordinator's retained message, not a forgery.
    with Client(secure_broker, reader_of(topic)) as late:
        late.subscribe(topic)
        assert late.messages.get(timeout=10) == (topic, legit, True)


def test_ledger_replay_requests_come_from_monitors_only(secure_broker: SecureBroker) -> None:
    """A replay request names its requester by topic; nobody can ask in a monitor's name."""
    forged, genuine = token("device-replay"), token("monitor-replay")
    with Client(secure_broker, "coordinator") as coordinator, Client(secure_broker, "monitor") as monitor, \
            Client(secure_broker, DEV_A) as device:
        coordinator.subscribe(TOPICS.ledger_replays)
        device.publish(TOPICS.ledger_replay("monitor"), forged)
        device.publish(TOPICS.ledger_replay(DEV_A), forged)
        monitor.publish(TOPICS.ledger_replay("operator"), forged)
        monitor.publish(TOPICS.ledger_replay("monitor"), genuine)
        got = coordinator.collect_until(genuine)
    assert [(t, p) for t, p, _ in got] == [(TOPICS.ledger_replay("monitor"), genuine)]


# -- a real update over TLS: delivered to the coordinator, and to nobody else in clear --------


MARKER = b"FLEDGER-PLAINTEXT-MARKER"  # a uint8 tensor spelling this out
FLOAT_PATTERN = np.float32(1234.5678).tobytes() * 4  # 16 bytes of the repeated weight value


def sample_weights() -> bytes:
    weights = codec.encode_tensors({
        "secret_layer.weight": np.full((64, 64), 1234.5678, dtype=np.float32),
        "secret_layer.marker": np.frombuffer(MARKER, dtype=np.uint8).copy(),
    })
    assert FLOAT_PATTERN in weights and MARKER in weights and b"secret_layer" in weights
    return weights


def fleet_keys() -> tuple[CoordinatorKeys, DeviceBundle]:
    from federation import crypto

    keys = CoordinatorKeys.generate(FLEET)
    seed, _public = crypto.ed25519_generate()
    return keys, DeviceBundle(FLEET, DEV_A, seed, keys.public, keys.model_key_id, keys.model_key)


def test_device_update_over_tls_reaches_only_the_coordinator_and_never_in_clear(
        secure_broker: SecureBroker) -> None:
    """The device publishes its own update with fledger's own MqttLink (TLS + password file).

    The coordinator receives it and opens it. The monitor and another device, each
    subscribed to everything (``fledger/#``), receive no update at all (ACL); and the
    bytes that do cross the broker, i.e. what a broker operator, a tap behind TLS
    termination, or amqtt's retained-message leak would expose, hold no plaintext weights:
    neither the weight values, nor the marker tensor, nor the tensor names."""
    keys, bundle = fleet_keys()
    weights = sample_weights()
    envelope = seal_update(bundle, 3, weights, num_samples=128, metrics={"train_loss": 0.25}, dataset_sha256=bytes(32),
                           base_sha256=bytes(32))
    for secret in (FLOAT_PATTERN, MARKER, b"secret_layer"):
        assert secret not in envelope

    link = MqttLink(secure_broker.link_config(DEV_A), f"t-link-{uuid.uuid4().hex[:8]}")
    with Client(secure_broker, "coordinator") as coordinator, Client(secure_broker, "monitor") as monitor, \
            Client(secure_broker, DEV_B) as other_device:
        coordinator.subscribe(TOPICS.updates)
        for spy in (monitor, other_device):
            spy.subscribe("fledger/#")
            drain(spy)
        link.start(timeout=10)
        try:
            assert link.publish(TOPICS.update(DEV_A), envelope, wait=10)
        finally:
            link.stop()
        topic, payload, _ = coordinator.messages.get(timeout=10)
        drain(monitor, QUIET)  # anything the spies got was queued before the coordinator's copy
        spied = [m for spy in (monitor, other_device) for m in _all(spy)]

    frame = parse_frame(payload)  # fledger frames every message: this one fits whole (FLC1W + envelope)
    assert topic == TOPICS.update(DEV_A) and frame.kind == "whole" and frame.data == envelope
    sealed = parse_update(frame.data, max_bytes=1 << 20)
    verify_update_signature(sealed, bundle.sign_public)
    assert decrypt_update(sealed, keys) == weights
    assert sealed.header.weights_sha256 == hashlib.sha256(weights).digest()
    assert not [m for m in spied if "/update/" in m[0]], f"an update leaked to a spy: {spied}"


def _all(client: Client) -> list[tuple[str, bytes, bool]]:
    got = []
    while not client.messages.empty():
        got.append(client.messages.get_nowait())
    return got


# -- authentication ----------------------------------------------------------------------------


@pytest.mark.parametrize(("user", "password"), [
    (DEV_A, "not-the-password"),
    (DEV_A, "<password of pump-02>"),
    ("intruder", "whatever"),
    (DEV_A, None),  # user name without a password
    (None, None),  # anonymous
], ids=["wrong-password", "other-users-password", "unknown-user", "no-password", "anonymous"])
def test_bad_credentials_are_refused(secure_broker: SecureBroker, user: str | None, password: str | None) -> None:
    if password == "<password of pump-02>":
        password = secure_broker.password(DEV_B)
    client = Client(secure_broker, user, password, own_password=False)
    assert not client.connect(timeout=15), f"broker accepted {user!r}"
    assert client.reason is not None and client.reason.is_failure  # CONNACK says why (not authorised)


def test_mqtt_link_with_a_wrong_password_file_raises(secure_broker: SecureBroker, tmp_path: Path) -> None:
    wrong = tmp_path / "wrong.password"
    wrong.write_text("not-the-password\n")
    config = secure_broker.link_config(DEV_A)
    config.password_file = wrong
    link = MqttLink(config, f"t-link-{uuid.uuid4().hex[:8]}")
    with pytest.raises(ConnectionError, match="refused the connection: Not authorized"):
        link.start(timeout=10)  # a refusal returns at once; the margin is for a loaded machine


def test_tls_with_the_wrong_ca_is_refused(secure_broker: SecureBroker) -> None:
    """The broker's certificate does not chain to the CA the client trusts: no connection,
    and the password is never sent."""
    link = MqttLink(secure_broker.link_config(DEV_A, ca=secure_broker.wrong_ca), f"t-link-{uuid.uuid4().hex[:8]}")
    with pytest.raises(ConnectionError) as raised:
        link.start(timeout=1.5)
    assert isinstance(raised.value.__cause__, ssl.SSLCertVerificationError)
    with pytest.raises(ssl.SSLCertVerificationError):
        Client(secure_broker, DEV_A, ca=secure_broker.wrong_ca).connect(timeout=15)


def test_plaintext_mqtt_to_the_tls_port_is_refused(secure_broker: SecureBroker) -> None:
    client = Client((secure_broker.host, secure_broker.port), DEV_A, secure_broker.password(DEV_A))
    assert not client.connect(timeout=3)


# -- the embedded amqtt broker with a password file -----------------------------------------------


def test_embedded_amqtt_broker_password_file(tmp_path: Path) -> None:
    password_file = tmp_path / "broker" / "passwords"
    write_broker_password(password_file, DEV_A, "right-password-1")
    write_broker_password(password_file, "coordinator", "coordinator-password")
    write_broker_password(password_file, DEV_A, "right-password-2")  # replaces the first
    assert password_file.stat().st_mode & 0o777 == 0o600
    assert "right-password" not in password_file.read_text()  # hashes only
    with EmbeddedBroker(password_file=password_file) as broker:
        address = (broker.host, broker.port)
        for user, password in ((DEV_A, "wrong"), (DEV_A, "right-password-1"), ("intruder", "right-password-2"),
                               (DEV_A, "coordinator-password")):
            assert not Client(address, user, password).connect(timeout=15), (user, password)
        with Client(address, DEV_A, "right-password-2") as device, \
                Client(address, "coordinator", "coordinator-password") as coordinator:
            coordinator.subscribe(TOPICS.updates)
            device.publish(TOPICS.update(DEV_A), b"hello")
            assert coordinator.messages.get(timeout=10)[1] == b"hello"


# -- the same roles on the embedded broker and on mosquitto: every role x every topic ------------

ROLES = ("coordinator", "monitor", "operator", "owner", DEV_A, DEV_B)  # every `user` block and both devices
MATRIX_TOPICS = (
    TOPICS.model, f"{TOPICS.model}/chunk/0", TOPICS.status, f"{TOPICS.status}/chunk/0", TOPICS.ledger_blocks,
    TOPICS.ledger_head, f"{TOPICS.ledger_head}/chunk/0", TOPICS.ledger_checkpoint,
    TOPICS.ledger_replay("monitor"), TOPICS.ledger_replay(DEV_A), f"{TOPICS.base}/ledger/replay",
    TOPICS.update(DEV_A), TOPICS.update(DEV_B), TOPICS.register(DEV_A), TOPICS.register(DEV_B),
    TOPICS.presence(DEV_A), TOPICS.presence(DEV_B), f"{TOPICS.base}/ack/{DEV_A}", f"{TOPICS.base}/ack/{DEV_B}",
    Topics("otherfleet").update(DEV_A), Topics("otherfleet").model, f"{TOPICS.base}/junk", "outside/topic",
    TOPICS.catch_up(DEV_A), TOPICS.catch_up("monitor"), TOPICS.catch_up_reply(DEV_A, "model"),
    TOPICS.catch_up_reply(DEV_A, "status"), TOPICS.catch_up_reply("monitor", "status"),
    TOPICS.catch_up_reply("operator", "head"),
    f"{TOPICS.base}/credits/order", f"{TOPICS.base}/credits/reply", f"{TOPICS.base}/predict/{DEV_A}/request",
    f"{TOPICS.base}/predict/{DEV_A}/reply", f"{TOPICS.base}/predict/owner/request",
)


def embedded_with_passwords(passwords: dict[str, str], directory: Path) -> EmbeddedBroker:
    db = directory / "passwords"
    for user, password in passwords.items():
        write_broker_password(db, user, password)
    return EmbeddedBroker(password_file=db)


@dataclass
class Answers:
    """What one broker did with the role-by-topic matrix (see :func:`observe_matrix`)."""
    live: set[tuple[str, str, str]]  # (publisher, receiver, topic), exact subscriptions
    wildcard: set[tuple[str, str, str]]  # the same for subscribers to `#`
    refused: set[tuple[str, str]]  # (role, filter) whose SUBACK said failure


SPY_END = f"{TOPICS.model}/chunk/998"  # readable by every user: where `#` subscribers learn of the end


def observe_matrix(connect: Any, *, separate_publishers: bool = False) -> Answers:
    """(publisher, receiver, topic) for every message delivered when every role subscribes to
    every topic (one subscription each, exact names) and then publishes to every topic; and the
    same for a second client of every role subscribed to ``#`` (a wildcard subscriber); and the
    subscriptions the broker refused in its SUBACK.

    A delivery proves both that the publisher may write the topic and that the receiver may
    read it; the broker's SUBACK and PUBACK prove nothing (mosquitto 2.0.11 grants and acks
    denied ones). A final message from the coordinator on the model topic, which every user
    may read, marks the end for each receiver; the `#` subscribers also hold an exact
    subscription to SPY_END, where the same marker goes (a broker that refuses their `#`
    still tells them the end). ``separate_publishers``: every role publishes through a client of
    its own (RabbitMQ closes a client's connection on a denied publish; a receiver must not lose
    what it was about to be handed)."""
    run = uuid.uuid4().hex[:8]
    clients = {role: connect(role) for role in ROLES}
    spies = {role: connect(role) for role in ROLES}
    publishers = {role: connect(role) for role in ROLES} if separate_publishers else clients
    try:
        for client in clients.values():
            for topic in MATRIX_TOPICS:
                client.subscribe(topic)
        for spy in spies.values():
            spy.subscribe("#")
            spy.subscribe(SPY_END)
        for role, client in publishers.items():
            sent = [client.publish(topic, f"{run}|{role}|{topic}".encode(), wait=False) for topic in MATRIX_TOPICS]
            for info in sent:
                client.acked(info)
        end = f"{run}|end".encode()
        clients["coordinator"].publish(TOPICS.model, end)
        clients["coordinator"].publish(SPY_END, end)
        seen: tuple[set[tuple[str, str, str]], set[tuple[str, str, str]]] = (set(), set())
        quiet = QUIET  # after the first receiver's wait, the others' messages are long queued
        for into, group in zip(seen, (clients, spies), strict=True):
            for receiver, client in group.items():
                for topic, payload, retained in client.collect_until(end, quiet=quiet):
                    parts = payload.decode(errors="replace").split("|")
                    if retained or parts[0] != run or len(parts) != 3:
                        continue  # a retained message of another test, or the end marker
                    assert parts[2] == topic, f"{payload!r} arrived on {topic}"
                    into.add((parts[1], receiver, topic))
                quiet = 0.1
        refused = {(role, topic) for group in (clients, spies) for role, client in group.items()
                   for topic in client.refused}
        return Answers(seen[0], seen[1], refused)
    finally:
        for client in {id(c): c for c in (*clients.values(), *spies.values(), *publishers.values())}.values():
            client.close()


END_TOPIC = f"{TOPICS.model}/chunk/999"  # every user may read it, only the coordinator write it


def observe_retained(connect: Any, writers: dict[str, str],
                     filters: tuple[str, ...] = ("#",)) -> set[tuple[str, str, str]]:
    """(publisher, receiver, topic) for every RETAINED message a client is handed when it
    subscribes to ``filters`` (``#``, or each topic) after: each topic's one allowed writer
    (``writers``) retained a message there, and then every other role tried to overwrite it and
    to delete it (an empty retained payload), as the issue's device deleted the retained global
    model. The retained messages are cleared again afterwards."""
    run = uuid.uuid4().hex[:8]
    clients = {role: connect(role) for role in ROLES}
    try:
        for topic, writer in writers.items():
            clients[writer].publish(topic, f"{run}|{writer}|{topic}".encode(), retain=True)
        for role, client in clients.items():
            sent = []
            for topic in MATRIX_TOPICS:
                if writers.get(topic) != role:
                    sent.append(client.publish(topic, f"{run}|{role}|{topic}".encode(), retain=True, wait=False))
                    sent.append(client.publish(topic, b"", retain=True, wait=False))
            for info in sent:
                client.acked(info)
        end = f"{run}|end".encode()
        clients["coordinator"].publish(END_TOPIC, end, retain=True)
    finally:
        for client in clients.values():
            client.close()
    seen: set[tuple[str, str, str]] = set()
    late = {role: connect(role) for role in ROLES}  # subscribing after everything was retained
    try:
        for client in late.values():
            for topic_filter in (*filters, END_TOPIC):
                client.subscribe(topic_filter)
        for receiver, client in late.items():
            for topic, payload, retained in client.collect_until(end):
                parts = payload.decode(errors="replace").split("|")
                if parts[0] != run or len(parts) != 3:
                    continue  # the end marker, or another test's retained message
                assert retained, f"a live message {payload!r} after the publishers left"
                assert parts[2] == topic, f"{payload!r} arrived on {topic}"
                seen.add((parts[1], receiver, topic))
    finally:
        for client in late.values():
            client.close()
    cleaner = {role: connect(role) for role in {*writers.values(), "coordinator"}}
    try:
        for topic, writer in writers.items():
            cleaner[writer].publish(topic, b"", retain=True)
        cleaner["coordinator"].publish(END_TOPIC, b"", retain=True)
    finally:
        for client in cleaner.values():
            client.close()
    return seen


@dataclass
class MatrixOnMosquitto:
    acl: Any  # fledger.acl.Acl
    writers_by_acl: dict[str, str]  # topic -> its one allowed writer
    expected: set[tuple[str, str, str]]  # (publisher, receiver, topic) that fledger.acl allows
    answers: Answers
    retained: set[tuple[str, str, str]]


@pytest.fixture(scope="module")
def mosquitto_matrix(secure_broker: SecureBroker) -> MatrixOnMosquitto:
    """The role-by-topic matrix on the real mosquitto with deploy/'s config: the reference every
    other broker is held to."""
    from fledger.acl import Acl

    acl = Acl.load(ACL)
    allowed_writers = {t: [p for p in ROLES if acl.allows(p, t, "write")] for t in MATRIX_TOPICS}
    assert all(len(w) <= 1 for w in allowed_writers.values()), allowed_writers  # one owner per topic
    writers_by_acl = {t: w[0] for t, w in allowed_writers.items() if w}
    expected = {(p, r, t) for p in ROLES for r in ROLES for t in MATRIX_TOPICS
                if acl.allows(p, t, "write") and acl.allows(r, t, "read")}
    answers = observe_matrix(lambda role: Client(secure_broker, role).__enter__())
    retained = observe_retained(lambda role: Client(secure_broker, role).__enter__(), writers_by_acl)
    return MatrixOnMosquitto(acl, writers_by_acl, expected, answers, retained)


def test_embedded_broker_enforces_the_same_roles_as_mosquitto(mosquitto_matrix: MatrixOnMosquitto,
                                                              secure_broker: SecureBroker, tmp_path: Path) -> None:
    """The must-have: the zero-setup broker is as strict as the hardened deployment. Every role
    (coordinator, monitor, operator, two devices) publishes to and subscribes to every topic
    on both brokers; the deliveries are identical, and they are what fledger.acl says."""
    on_mosquitto, expected = mosquitto_matrix.answers, mosquitto_matrix.expected
    passwords = {user: secure_broker.password(user) for user in ROLES}
    with embedded_with_passwords(passwords, tmp_path) as embedded:
        address = (embedded.host, embedded.port)
        on_amqtt = observe_matrix(lambda role: Client(address, role, passwords[role]).__enter__())
        retained_on_amqtt = observe_retained(lambda role: Client(address, role, passwords[role]).__enter__(),
                                             mosquitto_matrix.writers_by_acl)

    assert on_amqtt.live == on_mosquitto.live
    assert on_mosquitto.live == expected
    # A subscriber to `#` receives exactly what it may read, live, on both brokers; neither refuses
    # a subscription (SUBACK), both filter each message.
    assert on_amqtt.wildcard == on_mosquitto.wildcard == expected
    assert on_amqtt.refused == on_mosquitto.refused == set()
    # Retained messages: a client subscribing to `#` later is handed exactly the retained messages
    # it may read, each still its one writer's (no other role overwrote or deleted one), on both.
    assert retained_on_amqtt == mosquitto_matrix.retained
    assert mosquitto_matrix.retained == expected
    writers = {t: {p for p, _, tt in on_amqtt.live if tt == t} for t in MATRIX_TOPICS}
    readers = {t: {r for _, r, tt in on_amqtt.live if tt == t} for t in MATRIX_TOPICS}
    for topic in (TOPICS.model, f"{TOPICS.model}/chunk/0", TOPICS.status, TOPICS.ledger_blocks, TOPICS.ledger_head):
        assert writers[topic] == {"coordinator"}, topic
    assert writers[TOPICS.update(DEV_A)] == {DEV_A} and readers[TOPICS.update(DEV_A)] == {"coordinator"}
    assert writers[TOPICS.ledger_replay("monitor")] == {"monitor"}
    assert readers[TOPICS.ledger_replay("monitor")] >= {"coordinator"}
    assert readers[f"{TOPICS.base}/ack/{DEV_A}"] == {DEV_A}  # a device learns about itself only
    assert readers[TOPICS.status] == {"coordinator", "monitor", "operator"}  # the fleet-wide status
    assert readers[TOPICS.ledger_blocks] == {"monitor", "operator"}
    assert not writers[f"{TOPICS.base}/junk"] and not writers["outside/topic"]
    # Catch-up requests name their asker; answers reach only it, and only what it may read anyway.
    assert writers[TOPICS.catch_up(DEV_A)] == {DEV_A} and readers[TOPICS.catch_up(DEV_A)] == {"coordinator"}
    assert writers[TOPICS.catch_up("monitor")] == {"monitor"}
    assert writers[TOPICS.catch_up_reply(DEV_A, "model")] == {"coordinator"}
    assert readers[TOPICS.catch_up_reply(DEV_A, "model")] == {DEV_A}
    assert readers[TOPICS.catch_up_reply(DEV_A, "status")] == set()  # a device never reads the fleet status
    assert readers[TOPICS.catch_up_reply("monitor", "status")] == {"monitor"}
    assert readers[TOPICS.catch_up_reply("operator", "head")] == {"operator"}
    assert writers[TOPICS.ledger_checkpoint] == {"coordinator"}
    assert readers[f"{TOPICS.status}/chunk/0"] == {"coordinator", "monitor", "operator"}  # chunks like the whole
    # The owner's orders reach the coordinator only; nobody may ask for predictions with the shipped
    # ACL (each client gets its own lines), and only the coordinator answers.
    assert writers[f"{TOPICS.base}/credits/order"] == {"owner"}
    assert readers[f"{TOPICS.base}/credits/order"] == {"coordinator"}
    assert readers[f"{TOPICS.base}/credits/reply"] == {"owner"}
    assert not writers[f"{TOPICS.base}/predict/{DEV_A}/request"] and not writers[f"{TOPICS.base}/predict/owner/request"]


# -- the same roles on NATS (deploy/nats, `fledger keys nats-config`) -------------------------------

NATS_CONF = ROOT / "deploy" / "nats" / "nats-node.conf"
NATS_AUTH_INCLUDE = "include ./fledger-auth.conf"


def nats_config_from_deploy(store: Path, client_port: int, mqtt_port: int) -> str:
    """deploy/nats/nats-node.conf as one node on loopback: the listen addresses and store_dir
    rewritten, the `cluster` block (routes to the example hosts) dropped, comments dropped;
    everything else, above all the include of the generated authorization, as shipped."""
    out: list[str] = []
    blocks: list[str] = []  # the names of the blocks we are in
    for raw in NATS_CONF.read_text().splitlines():
        line = raw.split("#", 1)[0].rstrip()
        if not line.strip():
            continue
        words = line.split()
        inside_cluster = "cluster" in blocks or (not blocks and words[0] == "cluster")
        if words[0] == "listen:":
            line = f"  listen: 127.0.0.1:{mqtt_port}" if blocks == ["mqtt"] else f"listen: 127.0.0.1:{client_port}"
        elif words[0] == "store_dir:":
            line = f'  store_dir: "{store}"'
        if not inside_cluster:
            out.append(line)
        if line.rstrip().endswith("{"):
            blocks.append(words[0])
        elif line.strip() == "}":
            blocks.pop()
    text = "\n".join(out) + "\n"
    assert NATS_AUTH_INCLUDE in text and "mqtt {" in text and "jetstream {" in text, text
    assert "cluster" not in text and "no_auth_user" not in text
    return text


@dataclass
class NatsNode:
    host: str
    mqtt_port: int
    client_port: int
    keys: Path
    auth_file: Path
    pid: int

    def password(self, user: str) -> str:
        return (self.keys / "broker" / f"{user}.password").read_text().strip()


@contextlib.contextmanager
def nats_running(directory: Path, keys: Path) -> Iterator[NatsNode]:
    """A nats-server running deploy/nats/nats-node.conf with the authorization that
    `fledger keys nats-config` generates for the fleet in ``keys``."""
    import sys

    from tests.broker_clusters import NATS_SERVER, nats_available
    from tests.conftest import wait_port

    assert nats_available(), "nats-server is not installed (scripts/setup.sh installs it)"
    (directory / "js").mkdir(parents=True)
    auth = directory / "fledger-auth.conf"
    generated = subprocess.run([sys.executable, "-m", "fledger.cli", "keys", "--dir", str(keys), "nats-config",
                                "--out", str(auth)], capture_output=True, text=True, timeout=60)
    assert generated.returncode == 0, generated.stderr
    assert auth.stat().st_mode & 0o777 == 0o600
    client_port, mqtt_port = free_port(), free_port()
    (directory / "nats.conf").write_text(nats_config_from_deploy(directory / "js", client_port, mqtt_port))
    with open(directory / "nats.log", "wb") as log:
        proc = subprocess.Popen([NATS_SERVER, "-c", str(directory / "nats.conf")], stdout=log, stderr=subprocess.STDOUT)
    try:
        try:
            wait_port("127.0.0.1", mqtt_port, timeout=20)
        except TimeoutError:
            raise AssertionError((directory / "nats.log").read_text()) from None
        yield NatsNode("127.0.0.1", mqtt_port, client_port, keys, auth, proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=20)


@pytest.fixture
def nats_node(tmp_path: Path) -> Iterator[NatsNode]:
    """:func:`nats_running` for a fleet made by `fledger keys` with both devices."""
    from fledger import keytool

    keys = tmp_path / "keys"
    keytool.init_fleet(keys, FLEET)
    keytool.add_devices(keys, [DEV_A, DEV_B])
    with nats_running(tmp_path / "nats", keys) as node:
        yield node


def nats_core_login(host: str, port: int, user: str, password: str) -> str:
    """The server's answer to a NATS core protocol CONNECT with this login ("+OK"/"PONG" or "-ERR ...")."""
    import json
    import socket

    with socket.create_connection((host, port), timeout=10) as sock:
        reader = sock.makefile("rb")
        assert reader.readline().startswith(b"INFO ")
        connect = {"user": user, "pass": password, "verbose": False, "pedantic": False}
        sock.sendall(f"CONNECT {json.dumps(connect)}\r\nPING\r\n".encode())
        return reader.readline().decode().strip()


def test_nats_enforces_the_same_roles_as_mosquitto(mosquitto_matrix: MatrixOnMosquitto, nats_node: NatsNode) -> None:
    """The broker docs/deploy.md recommends past one machine, with the authorization generated
    from the same ACL: every role publishes to and subscribes to every topic, as on mosquitto.

    Live deliveries and retained messages are the same as on mosquitto, and what fledger.acl
    says. NATS differs in how it says no (docs/security.md, "Which broker enforces what"): it
    REFUSES a subscription its user may not read (SUBACK failure) where mosquitto grants it and
    delivers nothing; so a subscriber to `#` gets nothing at all on NATS (no user may read
    everything), where mosquitto filters each message."""
    acl, expected = mosquitto_matrix.acl, mosquitto_matrix.expected
    passwords = {role: nats_node.password(role) for role in ROLES}
    address = (nats_node.host, nats_node.mqtt_port)
    connect = lambda role: Client(address, role, passwords[role]).__enter__()  # noqa: E731
    on_nats = observe_matrix(connect)
    retained_exact = observe_retained(connect, mosquitto_matrix.writers_by_acl, ("#", *MATRIX_TOPICS))

    assert on_nats.live == mosquitto_matrix.answers.live == expected
    # Each exact subscription is refused exactly when the ACL does not let its user read the topic.
    unreadable = {(r, t) for r in ROLES for t in MATRIX_TOPICS if not acl.allows(r, t, "read")}
    assert {(r, t) for r, t in on_nats.refused if t != "#"} == unreadable
    # `#` is refused for every role (mosquitto grants it and filters), so nothing arrives through it.
    assert {(r, t) for r, t in on_nats.refused if t == "#"} == {(r, "#") for r in ROLES}
    assert on_nats.wildcard == set()
    # Retained: a later subscriber to each topic is handed exactly the retained messages it may read,
    # each still its one writer's: nobody else overwrote or deleted one (mosquitto: the same via `#`).
    assert retained_exact == mosquitto_matrix.retained == expected

    # Logins: anonymous, a wrong password and another user's password are refused over MQTT ...
    assert not Client(address, None).connect(timeout=15)
    assert not Client(address, DEV_A, "not-the-password").connect(timeout=15)
    assert not Client(address, DEV_A, passwords[DEV_B]).connect(timeout=15)
    # ... and no fleet user may log in as a NATS core client (that could call the JetStream API
    # of the account that holds every MQTT session and retained message).
    assert nats_core_login(nats_node.host, nats_node.client_port, "coordinator",
                           passwords["coordinator"]).startswith("-ERR")
    # An MQTT client cannot reach the server's internal QoS 1 delivery subjects ($MQTT.sub.<id>),
    # which every user may subscribe to internally (nats-server 2.9).
    with Client(address, DEV_A, passwords[DEV_A]) as spy:
        for topic_filter in ("$MQTT/sub/#", "$MQTT/#"):
            spy.subscribe(topic_filter)
        assert set(spy.refused) == {"$MQTT/sub/#", "$MQTT/#"}


def test_nats_reload_cuts_off_a_revoked_device_and_keeps_the_others(nats_node: NatsNode) -> None:
    """docs/deploy.md: after `fledger keys revoke`, regenerate and `nats-server --signal reload`.
    The revoked device, connected at the time, is disconnected and cannot log in again; the
    other device's connection and the coordinator's stay up and keep working."""
    import sys

    from fledger import keytool
    from tests.broker_clusters import NATS_SERVER

    address = (nats_node.host, nats_node.mqtt_port)
    passwords = {user: nats_node.password(user) for user in ("coordinator", DEV_A, DEV_B)}
    lost, after = threading.Event(), token("after-reload")
    with Client(address, "coordinator", passwords["coordinator"]) as coordinator, \
            Client(address, DEV_A, passwords[DEV_A]) as device, Client(address, DEV_B, passwords[DEV_B]) as revoked:
        revoked._client.on_disconnect = lambda *args: lost.set()
        coordinator.subscribe(TOPICS.updates)
        registry = keytool.DeviceRegistry.load(nats_node.keys / keytool.REGISTRY_FILE)
        for key_id in keytool.active_keys(registry, DEV_B):
            keytool.revoke_device_key(nats_node.keys, DEV_B, key_id)
        generated = subprocess.run([sys.executable, "-m", "fledger.cli", "keys", "--dir", str(nats_node.keys),
                                    "nats-config", "--out", str(nats_node.auth_file)],
                                   capture_output=True, text=True, timeout=60)
        assert generated.returncode == 0, generated.stderr
        subprocess.run([NATS_SERVER, "--signal", f"reload={nats_node.pid}"], check=True, timeout=30)
        assert lost.wait(10), "the revoked device's connection survived the reload"
        device.publish(TOPICS.update(DEV_A), after)
        assert coordinator.messages.get(timeout=10)[1] == after
        revoked._client.loop_stop()  # no reconnect attempts of its own
    assert not Client(address, DEV_B, passwords[DEV_B]).connect(timeout=15)


@pytest.mark.parametrize("broker_kind", ["mosquitto", "embedded", "nats", "rabbitmq"])
def test_a_last_will_is_held_to_the_acl_like_any_publish(secure_broker: SecureBroker, tmp_path: Path,
                                                        broker_kind: str, request: pytest.FixtureRequest) -> None:
    """A device that sets its Last Will to the global model (retained) or to another device's
    presence, then drops its connection, changes nothing: on mosquitto, on the embedded broker
    (amqtt on its own broadcasts and retains a will unchecked; FledgerBroker checks it), and on NATS
    and RabbitMQ with the generated permissions. Its will
    to its own presence topic is delivered, and marks the end."""
    model, evil = token("model"), token("will")
    embedded = None
    if broker_kind == "mosquitto":
        connect: Any = lambda user: Client(secure_broker, user)  # noqa: E731
    elif broker_kind in ("nats", "rabbitmq"):
        node: NatsNode | RabbitNode = request.getfixturevalue("nats_node" if broker_kind == "nats" else "rabbitmq")
        connect = lambda user: Client((node.host, node.mqtt_port), user, node.password(user))  # noqa: E731
    else:
        passwords = {user: f"pw-{user}-{uuid.uuid4().hex}" for user in ("coordinator", DEV_A, DEV_B)}
        embedded = embedded_with_passwords(passwords, tmp_path).start()
        connect = lambda user: Client((embedded.host, embedded.port), user, passwords[user])  # noqa: E731
    try:
        with connect("coordinator") as coordinator:
            coordinator.publish(TOPICS.model, model, retain=True)
            coordinator.subscribe(TOPICS.model)
            coordinator.subscribe(f"{TOPICS.base}/presence/#")
            drain(coordinator)
            forbidden = [connect(DEV_A).will(TOPICS.model, evil, retain=True),
                         connect(DEV_A).will(TOPICS.presence(DEV_B), evil, retain=True)]
            own = connect(DEV_A).will(TOPICS.presence(DEV_A), b"own-will-" + evil)
            for client in (*forbidden, own):
                assert client.connect(), client.reason
            for client in (*forbidden, own):
                client.drop()
            got = coordinator.collect_until(b"own-will-" + evil, timeout=30)
        with connect(DEV_B) as late:  # the model is still the coordinator's
            late.subscribe(TOPICS.model)
            assert late.messages.get(timeout=10) == (TOPICS.model, model, True)
    finally:
        if embedded is not None:
            embedded.stop()
    assert [(t, p) for t, p, _ in got] == [(TOPICS.presence(DEV_A), b"own-will-" + evil)]


def test_embedded_broker_hands_retained_messages_only_to_matching_readable_subscriptions(tmp_path: Path) -> None:
    """amqtt 0.12.1 on its own sends a connecting client the retained messages of EVERY
    client's subscriptions, with no read check (docs/security.md). FledgerBroker does not."""
    passwords = {user: f"pw-{user}-{uuid.uuid4().hex}" for user in ("coordinator", "monitor", DEV_A)}
    model, head = token("model"), token("head")
    with embedded_with_passwords(passwords, tmp_path) as broker:
        address = (broker.host, broker.port)
        with Client(address, "coordinator", passwords["coordinator"]) as coordinator, \
                Client(address, "monitor", passwords["monitor"]) as monitor:
            monitor.subscribe(TOPICS.ledger_head)
            monitor.subscribe(TOPICS.model)  # a subscription the monitor may hold (the ACL lets all read it)
            coordinator.publish(TOPICS.ledger_head, head, retain=True)
            coordinator.publish(TOPICS.model, model, retain=True)
            assert {monitor.messages.get(timeout=10)[1] for _ in range(2)} == {head, model}
            # A device connects while the monitor's subscriptions exist and subscribes to everything:
            # it gets the model it may read, once, and not the ledger head of the monitor's
            # subscription (amqtt would send both on CONNECT, and the head again on SUBSCRIBE).
            with Client(address, DEV_A, passwords[DEV_A]) as device:
                device.subscribe(f"fledger/{FLEET}/#")
                got = device.collect_until(model)
    assert got == [(TOPICS.model, model, True)]


def test_fledger_broker_uses_the_fleets_logins_and_runs_open_only_when_asked(tmp_path: Path) -> None:
    """`fledger broker` as a user runs it: with no password file it refuses to start (exit 2,
    saying how to get one) unless --anonymous; in a fleet made by `fledger keys init` it checks
    logins against keys/broker/passwords."""
    import sys

    from fledger import keytool
    from tests.conftest import wait_port

    cli = [sys.executable, "-m", "fledger.cli", "broker", "--keys", str(tmp_path / "keys")]
    refused = subprocess.run([*cli, "--port", str(free_port())], capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "fledger keys" in refused.stderr and "--anonymous" in refused.stderr
    keytool.init_fleet(tmp_path / "keys", FLEET)
    keytool.add_device(tmp_path / "keys", DEV_A)
    keytool.add_client(tmp_path / "keys", "alice")
    port = free_port()
    with open(tmp_path / "broker.log", "wb") as log:
        proc = subprocess.Popen([*cli, "--port", str(port)], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_port("127.0.0.1", port, timeout=30)
        address = ("127.0.0.1", port)

        def password(user: str) -> str:
            return (tmp_path / "keys" / "broker" / f"{user}.password").read_text().strip()

        assert not Client(address, None).connect(timeout=15)  # anonymous
        assert not Client(address, DEV_A, "wrong").connect(timeout=15)
        # The fleet's prediction client may ask on its own request topic (clients.json gives it
        # its ACL block, as `fledger keys add-client` printed it), not in another's name; a
        # device may not ask at all.
        request = f"{TOPICS.base}/predict/alice/request"
        with Client(address, DEV_A, password(DEV_A)) as device, Client(address, "alice", password("alice")) as alice, \
                Client(address, "coordinator", password("coordinator")) as coordinator:
            coordinator.subscribe(f"{TOPICS.base}/predict/+/request")
            device.publish(request, b"from a device")
            alice.publish(f"{TOPICS.base}/predict/bob/request", b"in bob's name")
            alice.publish(request, b"from alice")
            got = coordinator.collect_until(b"from alice", timeout=15)
            assert [(topic, payload) for topic, payload, _ in got] == [(request, b"from alice")]
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def run_a_fleet_with_its_own_logins(running: Any, fleet_dir: Path, broker_dir: Path) -> None:
    """A coordinator and two agents, each logged in as its own user, on the broker ``running``
    (a context manager: directory, keys -> a node with ``mqtt_port``) starts for the fleet's keys:
    two rounds complete and the ledger verifies."""
    from tests.federation_run import Federation
    from tests.test_reliability import check_final_ledger, finish

    fed = Federation(fleet_dir, "127.0.0.1", 0, fleet=FLEET, rounds=2)
    with running(broker_dir, fed.keys) as node:
        fed.port = node.mqtt_port
        fed.logins = {user: fed.keys / "broker" / f"{user}.password" for user in ("coordinator", *fed.devices)}
        try:
            fed.start_all()
            finish(fed, timeout=120)
        finally:
            fed.stop()
    check_final_ledger(fed, 2, participants=sorted(fed.devices))


def test_a_fleet_runs_on_nats_with_the_generated_logins(tmp_path: Path) -> None:
    """Real coordinator and agent processes, each logged in as its own user, on a nats-server with
    the authorization `fledger keys nats-config` generated: the rounds complete and the ledger
    verifies, so no fledger process needs a right the ACL does not give it (NATS refuses a
    subscription beyond its user's rights, where mosquitto would grant it)."""
    run_a_fleet_with_its_own_logins(nats_running, tmp_path / "fleet", tmp_path / "nats")
    # Every process logged in (the node refuses anonymous logins) and none was refused a publish or
    # a subscription ("Publish Violation" / "Subscription Violation" in the server's log).
    log = (tmp_path / "nats" / "nats.log").read_text()
    assert "Violation" not in log, [line for line in log.splitlines() if "Violation" in line]


# -- the same roles on RabbitMQ (deploy/rabbitmq, `fledger keys rabbitmq-definitions`) -------------

RABBITMQ_CONF = ROOT / "deploy" / "rabbitmq" / "rabbitmq.conf"
RABBITMQ_BASE_DEFINITIONS = ROOT / "deploy" / "rabbitmq" / "definitions.json"


class ClosingClient:
    """A :class:`Client` for a broker that CLOSES the connection on a denied publish or subscribe
    (RabbitMQ 3.10): such a subscribe is recorded in ``refused``, such a publish in ``denied``, and
    the client logs in again with a new connection (no re-sent publish) and re-subscribes what was
    granted, so the matrix harness runs unchanged. Every publish waits for its PUBACK or the close."""

    def __init__(self, address: tuple[str, int], user: str, password: str) -> None:
        self.address, self.user, self.password = address, user, password
        self.messages: queue.Queue[tuple[str, bytes, bool]] = queue.Queue()
        self.refused: list[str] = []
        self.denied: list[str] = []  # topics whose publish closed the connection
        self.granted: list[str] = []
        self.reconnects = 0
        self._open()

    def _open(self) -> None:
        self.lost = threading.Event()
        self.inner = Client(self.address, self.user, self.password)
        self.inner.messages = self.messages  # one queue across connections
        self.inner._client.on_disconnect = lambda *args: self.lost.set()
        self.inner._client._reconnect_on_failure = False  # paho would wait 1 s before retrying: we log in anew
        assert self.inner.connect(), f"{self.user}: login refused ({self.inner.reason})"
        if self.granted:  # all in one SUBSCRIBE: one round trip
            result, mid = self.inner._client.subscribe([(topic_filter, 1) for topic_filter in self.granted])
            assert result == paho.MQTT_ERR_SUCCESS and mid is not None
            assert self.inner._subacks.setdefault(mid, threading.Event()).wait(10) and mid not in self.inner._failed

    def _reopen(self) -> None:
        self.inner._client.loop_stop()  # its loop has ended: nothing is re-sent
        self.reconnects += 1
        self._open()

    def _wait(self, done: Any) -> bool:
        """True once ``done()``; False if the broker closed the connection first."""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if done():
                return True
            if self.lost.is_set():
                return False
            time.sleep(0.002)
        raise AssertionError(f"{self.user}: neither an acknowledgement nor a close in 10 s")

    def subscribe(self, topic_filter: str) -> None:
        result, mid = self.inner._client.subscribe(topic_filter, qos=1)
        assert result == paho.MQTT_ERR_SUCCESS and mid is not None
        event = self.inner._subacks.setdefault(mid, threading.Event())
        if self._wait(event.is_set):
            assert mid not in self.inner._failed, f"{topic_filter}: SUBACK failure instead of a close"
            self.granted.append(topic_filter)
        else:
            self.refused.append(topic_filter)
            self._reopen()

    def publish(self, topic: str, payload: bytes, *, retain: bool = False, wait: bool = True) -> Any:
        info = self.inner._client.publish(topic, payload, qos=1, retain=retain)

        def published() -> bool:
            try:
                return bool(info.is_published())
            except RuntimeError:  # paho: the connection went while the message was in flight
                return False

        if not self._wait(published):
            self.denied.append(topic)
            self._reopen()
        return info

    @staticmethod
    def acked(info: Any) -> None:
        """Nothing to wait for: :meth:`publish` waited for the PUBACK or the close."""

    def collect_until(self, sentinel: bytes, timeout: float = 10.0,
                      quiet: float = QUIET) -> list[tuple[str, bytes, bool]]:
        return Client.collect_until(self, sentinel, timeout, quiet)  # type: ignore[arg-type]

    def close(self) -> None:
        self.inner.close()


@dataclass
class RabbitNode:
    host: str
    mqtt_port: int
    keys: Path
    definitions: Path
    node: Any  # tests.broker_clusters.Node

    def password(self, user: str) -> str:
        return (self.keys / "broker" / f"{user}.password").read_text().strip()

    def generate_definitions(self) -> None:
        """`fledger keys rabbitmq-definitions` as docs/deploy.md says: merged into the shipped file
        the first time, then into itself."""
        import sys

        base = [] if self.definitions.exists() else ["--base", str(RABBITMQ_BASE_DEFINITIONS)]
        generated = subprocess.run([sys.executable, "-m", "fledger.cli", "keys", "--dir", str(self.keys),
                                    "rabbitmq-definitions", "--out", str(self.definitions), *base],
                                   capture_output=True, text=True, timeout=60)
        assert generated.returncode == 0, generated.stderr
        assert self.definitions.stat().st_mode & 0o777 == 0o600


def rabbitmq_config_from_deploy(mqtt_port: int, definitions: Path) -> str:
    """deploy/rabbitmq/rabbitmq.conf as one node on loopback: the MQTT listener and the
    definitions path rewritten, cluster formation (the example hosts) and comments dropped;
    everything else (no anonymous logins, no AMQP listener, the definitions import) as shipped."""
    out = []
    for raw in RABBITMQ_CONF.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line or line.startswith("cluster_formation."):
            continue
        key = line.split("=", 1)[0].strip()
        if key == "mqtt.listeners.tcp.default":
            line = f"mqtt.listeners.tcp.default = 127.0.0.1:{mqtt_port}"
        elif key == "definitions.local.path":
            line = f"definitions.local.path = {definitions}"
        out.append(line)
    text = "\n".join(out) + "\n"
    assert "mqtt.allow_anonymous = false" in text and "listeners.tcp = none" in text, text
    assert "definitions.import_backend = local_filesystem" in text, text
    return text


@contextlib.contextmanager
def rabbitmq_running(directory: Path, keys: Path) -> Iterator[RabbitNode]:
    """One RabbitMQ node running deploy/rabbitmq/rabbitmq.conf with the definitions that
    `fledger keys rabbitmq-definitions` generates for the fleet in ``keys`` (~10 s to start)."""
    from tests.broker_clusters import _rabbitmq_base, free_port, rabbitmq_available, rabbitmq_node

    assert rabbitmq_available(), "rabbitmq-server is not installed (scripts/setup.sh installs it)"
    cluster, epmd_port, cookie = _rabbitmq_base(directory)
    mqtt_port = free_port()
    node_dir = directory / "node"
    node_dir.mkdir(parents=True, exist_ok=True)
    rabbit = RabbitNode("127.0.0.1", mqtt_port, keys, directory / "definitions.json", None)
    rabbit.generate_definitions()
    rabbit.node = rabbitmq_node(node_dir, "rabbit", f"fltest{uuid.uuid4().hex[:6]}@localhost",
                                rabbitmq_config_from_deploy(mqtt_port, rabbit.definitions), mqtt_port, epmd_port,
                                cookie)
    cluster.nodes.append(rabbit.node)
    try:
        rabbit.node.start()
        deadline = time.monotonic() + 90
        while True:  # ready: the coordinator logs in over MQTT
            assert rabbit.node.proc.poll() is None, (node_dir / "stdout.log").read_text()[-3000:]
            with contextlib.suppress(OSError):
                if Client((rabbit.host, mqtt_port), "coordinator", rabbit.password("coordinator")).connect(5):
                    break
            assert time.monotonic() < deadline, (node_dir / "stdout.log").read_text()[-3000:]
            time.sleep(0.5)
        yield rabbit
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def rabbitmq(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitNode]:
    """One node for the module (it takes ~10 s to start), for a fleet with both devices."""
    from fledger import keytool

    base = tmp_path_factory.mktemp("rabbitmq")
    keys = base / "keys"
    keytool.init_fleet(keys, FLEET)
    keytool.add_devices(keys, [DEV_A, DEV_B])
    with rabbitmq_running(base / "rabbit", keys) as node:
        yield node


def test_rabbitmq_enforces_the_same_roles_as_mosquitto(mosquitto_matrix: MatrixOnMosquitto,
                                                       rabbitmq: RabbitNode) -> None:
    """RabbitMQ with the definitions generated from the same ACL: every role publishes to and
    subscribes to every topic, as on mosquitto.

    Who receives what, live and retained, is the same as on mosquitto and what fledger.acl says.
    RabbitMQ differs in how it says no (docs/security.md, "Which broker enforces what"): it CLOSES
    the connection of a client that publishes where it may not write (the message reaches nobody)
    or subscribes where it may not read, `#` included (no SUBACK); mosquitto drops the message,
    grants the subscription and delivers nothing."""
    acl, expected = mosquitto_matrix.acl, mosquitto_matrix.expected
    passwords = {role: rabbitmq.password(role) for role in ROLES}
    address = (rabbitmq.host, rabbitmq.mqtt_port)
    made: list[ClosingClient] = []

    def connect(role: str) -> ClosingClient:
        made.append(ClosingClient(address, role, passwords[role]))
        return made[-1]

    on_rabbitmq = observe_matrix(connect, separate_publishers=True)
    assert on_rabbitmq.live == mosquitto_matrix.answers.live == expected
    # Each exact subscription closed the connection exactly when the ACL does not let its user read
    # the topic; `#` did for every role, so nothing arrives through it.
    unreadable = {(r, t) for r in ROLES for t in MATRIX_TOPICS if not acl.allows(r, t, "read")}
    assert {(r, t) for r, t in on_rabbitmq.refused if t != "#"} == unreadable
    assert {(r, t) for r, t in on_rabbitmq.refused if t == "#"} == {(r, "#") for r in ROLES}
    assert on_rabbitmq.wildcard == set()
    # Each publish closed the connection exactly when the ACL does not let its user write the topic.
    denied = {(c.user, t) for c in made for t in c.denied}
    assert denied == {(r, t) for r in ROLES for t in MATRIX_TOPICS if not acl.allows(r, t, "write")}
    # Retained: a later subscriber to each topic is handed exactly the retained messages it may read,
    # each still its one writer's: nobody else overwrote or deleted one (mosquitto: the same via `#`).
    retained_exact = observe_retained(connect, mosquitto_matrix.writers_by_acl, ("#", *MATRIX_TOPICS))
    assert retained_exact == mosquitto_matrix.retained == expected

    # Logins: anonymous, a wrong password and another user's password are refused.
    assert not Client(address, None).connect(timeout=15)
    assert not Client(address, DEV_A, "not-the-password").connect(timeout=15)
    assert not Client(address, DEV_A, passwords[DEV_B]).connect(timeout=15)


def test_rabbitmq_import_adds_a_device_and_locks_out_a_revoked_one(rabbitmq: RabbitNode) -> None:
    """docs/deploy.md: after `fledger keys add-device` or `revoke`, regenerate the definitions and
    `rabbitmqctl import_definitions` them on the running node. The new device logs in and publishes
    its update; once revoked, it cannot log in again (its user keeps an empty hash: an import adds
    and updates, never deletes), yet its open connection stays until `rabbitmqctl delete_user`.
    The other device and the coordinator are untouched."""
    from fledger import keytool
    from tests.broker_clusters import rabbitmqctl

    new = "pump-03"
    address = (rabbitmq.host, rabbitmq.mqtt_port)
    assert not Client(address, new, "x").connect(timeout=15)
    keytool.add_device(rabbitmq.keys, new)
    rabbitmq.generate_definitions()
    imported = rabbitmqctl(rabbitmq.node, "import_definitions", str(rabbitmq.definitions))
    assert imported.returncode == 0, imported.stderr + imported.stdout
    password = rabbitmq.password(new)
    before, after = token("before"), token("after")
    with Client(address, "coordinator", rabbitmq.password("coordinator")) as coordinator, \
            Client(address, DEV_A, rabbitmq.password(DEV_A)) as device, Client(address, new, password) as revoked:
        lost = threading.Event()
        revoked._client.on_disconnect = lambda *args: lost.set()
        coordinator.subscribe(TOPICS.updates)
        revoked.publish(TOPICS.update(new), before)
        assert coordinator.messages.get(timeout=10)[1] == before
        for key_id in keytool.active_keys(keytool.DeviceRegistry.load(rabbitmq.keys / keytool.REGISTRY_FILE), new):
            keytool.revoke_device_key(rabbitmq.keys, new, key_id)
        rabbitmq.generate_definitions()
        imported = rabbitmqctl(rabbitmq.node, "import_definitions", str(rabbitmq.definitions))
        assert imported.returncode == 0, imported.stderr + imported.stdout
        assert not lost.wait(1), "the import itself closed the revoked device's connection"
        assert not Client(address, new, password).connect(timeout=15)  # locked out ...
        # ... but still connected: delete_user ends its connection (3.10.8's close_all_user_connections
        # does not find MQTT connections), and the next import brings the user back, locked.
        deleted = rabbitmqctl(rabbitmq.node, "delete_user", new)
        assert deleted.returncode == 0, deleted.stderr + deleted.stdout
        assert lost.wait(10), "the revoked device's connection survived delete_user"
        revoked._client.loop_stop()  # no reconnect attempts of its own
        imported = rabbitmqctl(rabbitmq.node, "import_definitions", str(rabbitmq.definitions))
        assert imported.returncode == 0, imported.stderr + imported.stdout
        device.publish(TOPICS.update(DEV_A), after)
        assert coordinator.messages.get(timeout=10)[1] == after
    assert not Client(address, new, password).connect(timeout=15)
    users = rabbitmqctl(rabbitmq.node, "list_users", "--silent")
    assert new in users.stdout, users.stdout + users.stderr


def test_a_fleet_runs_on_rabbitmq_with_the_generated_definitions(tmp_path: Path) -> None:
    """Real coordinator and agent processes, each logged in as its own user, on a RabbitMQ node with
    the definitions `fledger keys rabbitmq-definitions` generated: the rounds complete and the
    ledger verifies, so no fledger process needs a right the ACL does not give it (RabbitMQ would
    close its connection at the first denied publish or subscription)."""
    run_a_fleet_with_its_own_logins(rabbitmq_running, tmp_path / "fleet", tmp_path / "rabbit")
    logs = "".join(path.read_text(errors="replace") for path in (tmp_path / "rabbit").rglob("*.log"))
    # Every process logged in (the node refuses anonymous logins) and none was refused a publish or
    # a subscription (RabbitMQ logs each refusal as an access_refused before it closes the connection).
    assert "access_refused" not in logs and "ACCESS_REFUSED" not in logs, \
        [line for line in logs.splitlines() if "refused" in line.lower()]
