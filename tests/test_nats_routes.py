"""Routes between NATS nodes are authenticated: a 3-node cluster (tests/broker_clusters.py) whose
nodes include the routes file `fledger keys nats-config --routes` generates, as
deploy/nats/nats-node.conf does. The nodes form a cluster; a nats-server that tries to join as a
route without the fleet's route password, or with a wrong one, is refused: what is published
through it reaches no subscriber of the cluster, and it receives nothing of the cluster's. The
same rogue with the password joins (the control: the test would see a leak).
"""

from __future__ import annotations

import contextlib
import json
import queue
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from test_broker_security import make_pki

from fledger.nats_auth import ROUTE_USER, RouteTls, new_route_password, render_route_tls, route_secret
from tests import broker_clusters
from tests.broker_clusters import HOST, NATS_SERVER, Cluster, free_port, routes_between

TOPIC = "fledger/plant7/status"
INJECTED_TOPIC = "fledger/plant7/model/global"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, Path]]:
    if not broker_clusters.nats_available():
        pytest.fail("nats-server is not installed (scripts/setup.sh installs it)")
    directory = tmp_path_factory.mktemp("nats")
    with broker_clusters.running(broker_clusters.nats_cluster(directory), timeout=60) as running:
        yield running, directory


class CoreClient:
    """A NATS core protocol client (on a rogue node's client port, which has no logins)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=10)
        self.reader = self.sock.makefile("rb")
        assert self.reader.readline().startswith(b"INFO ")
        self.messages: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.sock.sendall(b'CONNECT {"verbose":false,"pedantic":false,"echo":false}\r\nSUB fledger.> 1\r\nPING\r\n')
        assert self.reader.readline().strip() == b"PONG"
        self.sock.settimeout(None)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            while line := self.reader.readline():
                if line.startswith(b"PING"):
                    self.sock.sendall(b"PONG\r\n")
                elif line.startswith(b"MSG "):
                    words = line.split()
                    payload = self.reader.read(int(words[-1]) + 2)[:-2]
                    self.messages.put((words[1].decode(), payload))

    def publish(self, subject: str, payload: bytes) -> None:
        self.sock.sendall(f"PUB {subject} {len(payload)}\r\n".encode() + payload + b"\r\n")

    def received(self) -> list[tuple[str, bytes]]:
        got = []
        with contextlib.suppress(queue.Empty):
            while True:
                got.append(self.messages.get_nowait())
        return got

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


@contextlib.contextmanager
def rogue_node(directory: Path, target_route_port: int, credentials: str, tls: str = "") -> Iterator[CoreClient]:
    """A nats-server of its own (no logins on its client port) that dials the cluster's node as a
    route with ``credentials`` ("" or "user:password@") and ``tls`` (a cluster ``tls { }`` block,
    or none), with a core client subscribed to ``fledger.>`` on it."""
    directory.mkdir(parents=True)
    client_port, route_port = free_port(), free_port()
    (directory / "nats.conf").write_text(
        f"server_name: rogue-{directory.name}\nlisten: {HOST}:{client_port}\n"
        f"cluster {{\n  name: fledger-test\n  listen: {HOST}:{route_port}\n{tls}"
        f"  routes: [{json.dumps(f'nats-route://{credentials}{HOST}:{target_route_port}')}]\n}}\n")
    with open(directory / "nats.log", "wb") as log:
        proc = subprocess.Popen([NATS_SERVER, "-c", str(directory / "nats.conf")], stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    spy = None
    try:
        from tests.conftest import wait_port

        wait_port(HOST, client_port, timeout=20)
        spy = CoreClient(client_port)
        yield spy
    finally:
        if spy is not None:
            spy.close()
        proc.terminate()
        proc.wait(timeout=20)


def mqtt_client(port: int, subscribe: str | None = None) -> tuple[paho.Client, queue.Queue[tuple[str, bytes]]]:
    got: queue.Queue[tuple[str, bytes]] = queue.Queue()
    subscribed: queue.Queue[int] = queue.Queue()
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"routes-{port}-{uuid.uuid4().hex[:6]}")
    client.on_message = lambda c, u, m: got.put((m.topic, m.payload))
    client.on_subscribe = lambda c, u, mid, rc, p: subscribed.put(mid)
    client.connect(HOST, port, keepalive=30)
    client.loop_start()
    if subscribe is not None:
        client.subscribe(subscribe, qos=0)
        subscribed.get(timeout=10)
    return client, got


def drain(got: queue.Queue[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    out = []
    with contextlib.suppress(queue.Empty):
        while True:
            out.append(got.get_nowait())
    return out


def test_the_nodes_form_a_cluster_over_the_generated_authenticated_routes(cluster: tuple[Cluster, Path]) -> None:
    nodes, directory = cluster
    password = route_secret(directory / "keys")
    for i, node in enumerate(nodes.nodes):
        config = (node.log.parent / "nats.conf").read_text()
        assert "include ./fledger-routes.conf" in config and "routes:" not in config
        routes = (node.log.parent / "fledger-routes.conf").read_text()
        assert f"nats-route://{ROUTE_USER}:{password}@{HOST}:{nodes.nodes[(i + 1) % 3].route_port}" in routes
    # An MQTT message published on node 1 reaches a subscriber on node 2 (and on node 3).
    routes_between([n.mqtt_port for n in nodes.nodes], timeout=10)
    routes_between([nodes.nodes[1].mqtt_port, nodes.nodes[0].mqtt_port], timeout=10)


@dataclass
class RogueTrial:
    """What rogue servers dialling one node as a route saw and got through (see :func:`try_rogues`)."""

    spied: dict[str, list[tuple[str, bytes]]]  # per rogue: what its core client received
    delivered: list[list[tuple[str, bytes]]]  # per cluster node: what its MQTT subscriber received
    refused: set[str]  # the rogues whose own log shows the refusal
    control_joined: bool
    target_log: str  # the target node's log since the rogues started


def try_rogues(nodes: Cluster, tmp_path: Path, rogues: dict[str, tuple[str, str]], control: str,
               refusals: dict[str, str]) -> RogueTrial:
    """Start a rogue nats-server per ``rogues`` entry (kind -> credentials, cluster TLS block), all
    dialling node 0 as a route, while the cluster carries MQTT traffic and every rogue publishes on
    the model topic. Runs until every other rogue logged its refusal (``refusals``: kind -> the
    line its own log shows) and the control
    joined (it receives the cluster's messages, its own reaches node 0's subscriber), then one
    more second, so the refused ones had every chance the control had."""
    target = nodes.nodes[0]
    subscribers = [mqtt_client(node.mqtt_port, subscribe="fledger/plant7/#") for node in nodes.nodes]
    publisher, _ = mqtt_client(target.mqtt_port)
    log_before = target.log.read_text()
    spied: dict[str, list[tuple[str, bytes]]] = {kind: [] for kind in rogues}
    delivered: list[list[tuple[str, bytes]]] = [[] for _ in subscribers]
    with contextlib.ExitStack() as stack:
        spies = {kind: stack.enter_context(rogue_node(tmp_path / kind, target.route_port, credentials, tls))
                 for kind, (credentials, tls) in rogues.items()}

        def control_joined() -> bool:
            return any(p.startswith(b"cluster-") for _, p in spied[control]) and \
                (INJECTED_TOPIC, f"from-{control}".encode()) in delivered[0]

        def refused() -> set[str]:  # in the rogues' own logs
            # (not asked of the control: it dials the nodes it learns by gossip without the
            # password (its own cluster block has none) and is refused there; node 0 accepts it)
            return {kind for kind, line in refusals.items() if line in (tmp_path / kind / "nats.log").read_text()}

        began, settled = time.monotonic(), None
        while time.monotonic() - began < 30:
            publisher.publish(TOPIC, f"cluster-{time.monotonic():.3f}".encode(), qos=0)
            for kind, spy in spies.items():
                spy.publish(INJECTED_TOPIC.replace("/", "."), f"from-{kind}".encode())
            time.sleep(0.2)
            for kind, spy in spies.items():
                spied[kind] += spy.received()
            for i, (_, got) in enumerate(subscribers):
                delivered[i] += drain(got)
            if settled is None and control_joined() and refused() == set(refusals):
                settled = time.monotonic()
            if settled is not None and time.monotonic() - settled > 1:
                break
        trial = RogueTrial(spied, delivered, refused(), control_joined(), target.log.read_text()[len(log_before):])
    for client, _ in subscribers:
        client.disconnect()
        client.loop_stop()
    publisher.disconnect()
    publisher.loop_stop()
    return trial


def assert_kept_out(trial: RogueTrial, kinds: tuple[str, ...]) -> None:
    for kind in kinds:
        assert trial.spied[kind] == [], kind  # the rogue receives nothing from the cluster
        for got in trial.delivered:  # and what it publishes reaches no subscriber on any node
            assert (INJECTED_TOPIC, f"from-{kind}".encode()) not in got, kind
    # The cluster itself kept routing between its nodes.
    assert all(any(t == TOPIC for t, _ in got) for got in trial.delivered)


def test_a_server_without_the_route_password_cannot_join_the_cluster(cluster: tuple[Cluster, Path],
                                                                     tmp_path: Path) -> None:
    nodes, directory = cluster
    # The nodes' own routes authenticated (every node is configured: none is dialled by gossip).
    assert not any("Authentication Failure" in node.log.read_text() for node in nodes.nodes)
    trial = try_rogues(nodes, tmp_path, {
        "no-password": ("", ""),
        "wrong-password": (f"{ROUTE_USER}:{new_route_password()}@", ""),
        "with-password": (f"{ROUTE_USER}:{route_secret(directory / 'keys')}@", ""),
    }, control="with-password", refusals=dict.fromkeys(("no-password", "wrong-password"),
                                                       "Route Error 'Authorization Violation'"))
    assert trial.control_joined, f"the control (with the password) did not join: {trial.spied['with-password'][:3]}"
    assert trial.refused == {"no-password", "wrong-password"}, trial.target_log
    assert trial.target_log.count("Router connection closed: Authentication Failure") >= 2
    assert_kept_out(trial, ("no-password", "wrong-password"))


def route_tls(directory: Path) -> RouteTls:
    """A test CA and a node certificate (scripts/make-test-pki.sh), as a node's route TLS."""
    make_pki(directory)
    return RouteTls(str(directory / "server.crt"), str(directory / "server.key"), str(directory / "ca.crt"))


def tls_block(tls: RouteTls) -> str:
    """The cluster TLS block a fleet node's routes file carries, for a rogue's own cluster block."""
    return "".join(f"  {line}\n" for line in render_route_tls(tls))


def test_routes_over_mutual_tls_need_a_certificate_of_the_fleets_ca(tmp_path: Path) -> None:
    """`nats-config --routes ... --route-tls-*`: two nodes route over mutual TLS. A server with the
    route password but no TLS, or with a certificate of another CA, is refused; the control, with
    the password and a certificate of the fleet's CA, joins."""
    if not broker_clusters.nats_available():
        pytest.fail("nats-server is not installed (scripts/setup.sh installs it)")
    fleet_tls, foreign_tls = route_tls(tmp_path / "pki"), route_tls(tmp_path / "foreign-pki")
    directory = tmp_path / "nats"
    directory.mkdir()
    with broker_clusters.running(broker_clusters.nats_cluster(directory, size=2, tls=fleet_tls), timeout=60) as nodes:
        routes = (directory / "fledger-routes.conf").read_text()
        assert "tls {" in routes and f'ca_file: "{fleet_tls.ca_file}"' in routes and "verify: true" in routes
        routes_between([n.mqtt_port for n in nodes.nodes], timeout=10)
        password = f"{ROUTE_USER}:{route_secret(directory / 'keys')}@"
        trial = try_rogues(nodes, tmp_path / "rogues", {
            "password-no-tls": (password, ""),
            "password-foreign-ca": (password, tls_block(foreign_tls)),
            "password-and-certificate": (password, tls_block(fleet_tls)),
        }, control="password-and-certificate", refusals={
            "password-no-tls": "Router connection closed: Read Error",  # the node wants a TLS handshake
            "password-foreign-ca": "Router connection closed: TLS Handshake Failure"})
    assert trial.control_joined, f"the control rogue did not join: {trial.target_log[-2000:]}"
    assert trial.refused == {"password-no-tls", "password-foreign-ca"}, trial.target_log
    assert "TLS route handshake error: tls: first record does not look like a TLS handshake" in trial.target_log
    # the foreign one's certificate, checked against the other CA by each end, fails the handshake
    assert "tls: bad certificate" in trial.target_log or "unknown authority" in trial.target_log
    assert_kept_out(trial, ("password-no-tls", "password-foreign-ca"))
