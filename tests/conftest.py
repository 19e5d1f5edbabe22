"""Shared fixtures: real brokers on free ports (embedded amqtt, and mosquitto started here)."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fledger.broker import EmbeddedBroker, free_port

MOSQUITTO = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)


@dataclass
class BrokerInfo:
    kind: str
    host: str
    port: int


def wait_port(host: str, port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port}")


class Mosquitto:
    """A mosquitto process with its own config on a free port, for one test."""

    def __init__(self, directory: Path, extra_config: str = "", port: int | None = None) -> None:
        if MOSQUITTO is None:
            pytest.fail("mosquitto is not installed (scripts/setup.sh installs it)")
        self.directory = directory
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self.extra_config = extra_config
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Mosquitto:
        self.directory.mkdir(parents=True, exist_ok=True)
        conf = self.directory / "mosquitto.conf"
        text = f"listener {self.port} 127.0.0.1\nset_tcp_nodelay true\n{self.extra_config}\n"
        if "allow_anonymous" not in self.extra_config:
            text += "allow_anonymous true\n"
        conf.write_text(text)
        self.log = open(self.directory / "mosquitto.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen([str(MOSQUITTO), "-c", str(conf)], stdout=self.log, stderr=subprocess.STDOUT)
        wait_port(self.host, self.port)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


@contextlib.contextmanager
def running(broker: Mosquitto) -> Iterator[Mosquitto]:
    """Start ``broker`` and stop it on leaving, whatever happens."""
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def embedded_broker() -> Iterator[BrokerInfo]:
    broker = EmbeddedBroker().start()
    try:
        yield BrokerInfo("amqtt", broker.host, broker.port)
    finally:
        broker.stop()


@pytest.fixture
def mosquitto_broker(tmp_path: Path) -> Iterator[BrokerInfo]:
    with running(Mosquitto(tmp_path / "mosquitto")) as broker:
        yield BrokerInfo("mosquitto", broker.host, broker.port)


@pytest.fixture(params=["amqtt", "mosquitto"])
def any_broker(request: pytest.FixtureRequest) -> BrokerInfo:
    name = "embedded_broker" if request.param == "amqtt" else "mosquitto_broker"
    info: BrokerInfo = request.getfixturevalue(name)
    return info
