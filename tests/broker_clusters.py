"""Broker clusters for tests: a 3-node NATS cluster (JetStream, MQTT on every node) and a 2-node
RabbitMQ cluster (rabbitmq_mqtt), each on free loopback ports with its own directories, beside
whatever brokers the machine runs (nothing shared is touched: own ports, node names, Erlang
cookie and epmd). Each node is its own process group, killed by its id.

Both servers are Debian packages (`nats-server`, `rabbitmq-server`); scripts/setup.sh installs them.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import queue
import random
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

if TYPE_CHECKING:
    from fledger.nats_auth import RouteTls

NATS_SERVER = shutil.which("nats-server") or "/usr/sbin/nats-server"
RABBITMQ_SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"  # the real script; /usr/sbin's wrapper su's to rabbitmq
EPMD = shutil.which("epmd") or "/usr/bin/epmd"
HOST = "127.0.0.1"


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


_taken: set[int] = set()


def free_port() -> int:
    """A free port below the kernel's ephemeral range. A cluster's ports are all chosen before
    its nodes start, one by one, over several seconds: a port from the ephemeral range (what
    binding port 0 gives) can meanwhile become the source port of any outgoing connection,
    and the node then fails with eaddrinuse (seen on RabbitMQ's AMQP listener)."""
    low = _ephemeral_range()[0]
    for _ in range(1000):
        port = random.randrange(10_000, low)
        if port in _taken:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((HOST, port))
            except OSError:
                continue
        _taken.add(port)
        return port
    raise RuntimeError("no free port below the ephemeral range")


def nats_available() -> bool:
    return Path(NATS_SERVER).is_file()


def rabbitmq_available() -> bool:
    return Path(RABBITMQ_SERVER).is_file() and Path(EPMD).is_file()


@dataclass
class Node:
    name: str
    mqtt_port: int
    command: list[str]
    env: dict[str, str]
    log: Path
    route_port: int = 0  # NATS: its cluster port
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        out = open(self.log, "ab")  # noqa: SIM115 (the process owns it)
        # Its own process group: the server script's children (beam) die with it.
        self.proc = subprocess.Popen(self.command, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                     start_new_session=True)
        out.close()

    def kill(self) -> None:
        """SIGKILL, as a crash or power cut: nothing is flushed or handed over."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.kill()


@dataclass
class Cluster:
    nodes: list[Node] = field(default_factory=list)
    helpers: list[subprocess.Popen[bytes]] = field(default_factory=list)  # e.g. our own epmd
    # Start each node only once the one before serves MQTT. RabbitMQ's MQTT plugin elects a Raft
    # leader at boot; two nodes booting at once sometimes both wait for it and never listen
    # (seen here: "leader_call ... state_query members" timed out after 100 s).
    one_by_one: bool = False

    def start(self, timeout: float) -> float:
        """Start every node; returns the seconds until the cluster routes messages between all nodes."""
        began = time.monotonic()
        for node in self.nodes:
            node.start()
            if self.one_by_one:
                self.wait_ready(timeout, [node])
        self.wait_ready(timeout)
        return time.monotonic() - began

    def wait_ready(self, timeout: float, nodes: list[Node] | None = None) -> None:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            for node in self.nodes:
                if node.proc is not None and node.proc.poll() is not None:
                    raise RuntimeError(f"{node.name} exited with {node.proc.returncode}; see {node.log}")
            try:
                routes_between([n.mqtt_port for n in (nodes or self.nodes)], timeout=3)
                return
            except (OSError, TimeoutError) as exc:
                last = exc
                time.sleep(0.5)
        raise TimeoutError(f"cluster not ready in {timeout:.0f}s: {last}")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        for helper in self.helpers:
            if helper.poll() is None:
                helper.terminate()
                try:
                    helper.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    helper.kill()


def routes_between(ports: list[int], timeout: float) -> None:
    """A message published through the first node reaches a subscriber on every node (OSError,
    TimeoutError otherwise): the nodes are up, accept MQTT and route to each other."""
    probe = f"probe/{uuid.uuid4().hex[:8]}"
    clients: list[paho.Client] = []
    got: queue.Queue[int] = queue.Queue()
    try:
        for port in ports:
            client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"probe-{port}-{uuid.uuid4().hex[:6]}")
            subscribed = queue.Queue[int]()
            client.on_subscribe = lambda c, u, mid, rc, p, q=subscribed: q.put(mid)
            client.on_message = lambda c, u, m, port=port: got.put(port)
            client.connect(HOST, port, keepalive=10)
            client.loop_start()
            clients.append(client)
            client.subscribe(probe, qos=1)
            subscribed.get(timeout=timeout)  # raises queue.Empty (a TimeoutError below) if never acknowledged
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            clients[0].publish(probe, b"ping", qos=1)
            seen: set[int] = set()
            with contextlib.suppress(queue.Empty):
                while seen != set(ports):
                    seen.add(got.get(timeout=0.5))
            if seen == set(ports):
                return
        raise TimeoutError(f"a message through port {ports[0]} did not reach every node ({ports})")
    except queue.Empty:
        raise TimeoutError("subscription not acknowledged") from None
    finally:
        for client in clients:
            with contextlib.suppress(Exception):
                client.disconnect()
                client.loop_stop()


def nats_cluster(directory: Path, size: int = 3, tls: RouteTls | None = None) -> Cluster:
    """``size`` nats-server processes routed to each other, JetStream and MQTT on each. The routes
    are authenticated as deploy/nats/nats-node.conf ships them: each node includes the routes
    file `fledger keys nats-config --routes` writes (its route secret: ``directory/keys``), with
    ``tls`` over mutual TLS."""
    from fledger.nats_auth import write_routes_config

    client_ports = [free_port() for _ in range(size)]
    route_ports = [free_port() for _ in range(size)]
    mqtt_ports = [free_port() for _ in range(size)]
    routes_conf = directory / "fledger-routes.conf"
    write_routes_config(directory / "keys", [f"{HOST}:{p}" for p in route_ports], routes_conf, tls=tls)
    cluster = Cluster()
    for i in range(size):
        node_dir = directory / f"nats-{i}"
        (node_dir / "js").mkdir(parents=True, exist_ok=True)
        shutil.copy(routes_conf, node_dir / "fledger-routes.conf")  # installed on every node
        conf = node_dir / "nats.conf"
        conf.write_text(NATS_NODE_CONFIG.format(name=f"fledger-test-{i}", host=HOST, client=client_ports[i],
                                                store=node_dir / "js", route=route_ports[i], mqtt=mqtt_ports[i]))
        cluster.nodes.append(Node(f"nats-{i}", mqtt_ports[i], [NATS_SERVER, "-c", str(conf)], dict(os.environ),
                                  node_dir / "nats.log", route_port=route_ports[i]))
    return cluster


NATS_NODE_CONFIG = """\
server_name: {name}
listen: {host}:{client}
jetstream {{
  store_dir: "{store}"
  max_memory_store: 64MB
  max_file_store: 1GB
}}
cluster {{
  name: fledger-test
  listen: {host}:{route}
  include ./fledger-routes.conf
}}
mqtt {{
  listen: {host}:{mqtt}
}}
"""


def rabbitmq_cluster(directory: Path, size: int = 2) -> Cluster:
    """``size`` RabbitMQ nodes with the MQTT plugin that form one cluster at boot (classic peer
    discovery), with their own node names, ports, data and log directories, Erlang cookie and
    epmd (started here in the foreground, so it is ours to stop)."""
    tag = uuid.uuid4().hex[:6]
    names = [f"fltest{tag}{i}@localhost" for i in range(size)]
    cluster, epmd_port, cookie = _rabbitmq_base(directory)
    peers = "\n".join(f"cluster_formation.classic_config.nodes.{i + 1} = {name}" for i, name in enumerate(names))
    for i, name in enumerate(names):
        node_dir = directory / f"rabbit-{i}"
        node_dir.mkdir(parents=True, exist_ok=True)
        mqtt_port, amqp_port = free_port(), free_port()
        (node_dir / "definitions.json").write_text(json.dumps(rabbitmq_definitions()))
        config = RABBITMQ_NODE_CONFIG.format(host=HOST, amqp=amqp_port, mqtt=mqtt_port, peers=peers,
                                             definitions=node_dir / "definitions.json")
        cluster.nodes.append(rabbitmq_node(node_dir, f"rabbit-{i}", name, config, mqtt_port, epmd_port, cookie,
                                           amqp_port=amqp_port))
    return cluster


def _rabbitmq_base(directory: Path) -> tuple[Cluster, int, str]:
    """A cluster with our own epmd (on a free port) running, and a fresh Erlang cookie."""
    epmd_port = free_port()
    cookie = uuid.uuid4().hex
    cluster = Cluster(one_by_one=True)
    directory.mkdir(parents=True, exist_ok=True)
    epmd_log = open(directory / "epmd.log", "ab")  # noqa: SIM115
    cluster.helpers.append(subprocess.Popen([EPMD, "-port", str(epmd_port), "-address", HOST],
                                            stdout=epmd_log, stderr=subprocess.STDOUT, start_new_session=True))
    epmd_log.close()
    return cluster, epmd_port, cookie


def rabbitmq_node(node_dir: Path, label: str, name: str, config: str, mqtt_port: int, epmd_port: int, cookie: str,
                  *, amqp_port: int | None = None) -> Node:
    """One RabbitMQ node (not started) running ``config`` (rabbitmq.conf syntax) from ``node_dir``;
    ``amqp_port`` None: the AMQP listener is whatever ``config`` says."""
    home = node_dir / "home"
    home.mkdir(parents=True, exist_ok=True)
    cookie_file = home / ".erlang.cookie"
    cookie_file.write_text(cookie)
    cookie_file.chmod(0o400)
    (node_dir / "enabled_plugins").write_text("[rabbitmq_mqtt].\n")
    (node_dir / "rabbitmq.conf").write_text(config)
    env = {
        **os.environ, "HOME": str(home), "RABBITMQ_NODENAME": name, "RABBITMQ_NODE_IP_ADDRESS": HOST,
        "RABBITMQ_DIST_PORT": str(free_port()),
        "ERL_EPMD_PORT": str(epmd_port), "ERL_EPMD_ADDRESS": HOST,
        "RABBITMQ_MNESIA_BASE": str(node_dir / "mnesia"), "RABBITMQ_LOG_BASE": str(node_dir / "log"),
        "RABBITMQ_ENABLED_PLUGINS_FILE": str(node_dir / "enabled_plugins"),
        "RABBITMQ_CONFIG_FILE": str(node_dir / "rabbitmq.conf"),
        "RABBITMQ_PLUGINS_EXPAND_DIR": str(node_dir / "plugins-expand"),
        "RABBITMQ_PID_FILE": str(node_dir / "pid"),
    }
    if amqp_port is not None:
        env["RABBITMQ_NODE_PORT"] = str(amqp_port)
    return Node(label, mqtt_port, [RABBITMQ_SERVER], env, node_dir / "stdout.log")


def rabbitmqctl(node: Node, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``rabbitmqctl ARGS`` against ``node`` (its cookie, epmd and name)."""
    return subprocess.run([str(Path(RABBITMQ_SERVER).with_name("rabbitmqctl")), "-n", node.env["RABBITMQ_NODENAME"],
                           *args], env=node.env, capture_output=True, text=True, timeout=timeout)


RABBITMQ_NODE_CONFIG = """\
listeners.tcp.default = {host}:{amqp}
mqtt.listeners.tcp.default = {host}:{mqtt}
mqtt.allow_anonymous = true
loopback_users = none
cluster_formation.peer_discovery_backend = classic_config
{peers}
definitions.import_backend = local_filesystem
definitions.local.path = {definitions}
"""


def rabbitmq_definitions() -> dict[str, Any]:
    """The guest user (definitions imported at boot replace the default one) and the policy that
    lets an MQTT client's persistent session survive its node: its subscription queue is mirrored
    on every node (deploy/rabbitmq/definitions.json says why)."""
    salt = os.urandom(4)
    password_hash = base64.b64encode(salt + hashlib.sha256(salt + b"guest").digest()).decode()
    return {
        "users": [{"name": "guest", "password_hash": password_hash, "tags": ["administrator"],
                   "hashing_algorithm": "rabbit_password_hashing_sha256"}],
        "vhosts": [{"name": "/"}],
        "permissions": [{"user": "guest", "vhost": "/", "configure": ".*", "write": ".*", "read": ".*"}],
        "policies": [{"vhost": "/", "name": "mqtt-sessions-on-every-node", "pattern": "^mqtt-subscription-",
                      "apply-to": "queues", "priority": 0,
                      "definition": {"ha-mode": "all", "ha-sync-mode": "automatic",
                                     "ha-promote-on-failure": "always", "ha-promote-on-shutdown": "always"}}],
    }


@contextlib.contextmanager
def running(cluster: Cluster, timeout: float) -> Iterator[Cluster]:
    try:
        cluster.start(timeout)
        yield cluster
    finally:
        cluster.stop()


class Front:
    """A TCP front-end for a cluster, as a load balancer or DNS name would be: each new connection
    goes to the first of ``ports`` that accepts it. A client of a node that died reconnects to the
    same address and lands on the next node."""

    def __init__(self, ports: list[int]) -> None:
        self.ports = ports
        self.server = socket.create_server((HOST, 0))
        self.port: int = self.server.getsockname()[1]
        self._closed = False
        self._open: list[socket.socket] = []
        threading.Thread(target=self._accept, name="front", daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            for port in self.ports:
                try:
                    backend = socket.create_connection((HOST, port), timeout=2)
                    break
                except OSError:
                    continue
            else:
                client.close()  # no node up: the client retries later
                continue
            backend.settimeout(None)
            self._open += [client, backend]
            for src, dst in ((client, backend), (backend, client)):
                threading.Thread(target=self._pipe, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:  # one side gone (a killed node): close both, so the client notices at once
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    sock.close()

    def close(self) -> None:
        self._closed = True
        self.server.close()
        for sock in self._open:
            with contextlib.suppress(OSError):
                sock.close()
