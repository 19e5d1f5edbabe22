"""Running under systemd, on real processes and a real broker: the notify protocol (READY,
WATCHDOG, STOPPING) through a NOTIFY_SOCKET this test owns, SIGHUP, SIGTERM within 5 s in every
state, and a plain install (no torch, no amqtt) running keys, the ledger tools and a coordinator.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import BrokerInfo

from fledger import keytool
from fledger.broker import free_port

ROOT = Path(__file__).resolve().parent.parent

# A plain `pip install fledger` has neither torch nor the embedded broker: make them unimportable
# in the child (an import of a module set to None in sys.modules raises ImportError). Cheaper and
# as strict as a second virtualenv, and it needs no network: any path that imports them fails.
PLAIN_INSTALL = ("import sys\n"
                 "for name in ('torch', 'amqtt', 'zarr', 'pureml'):\n"
                 "    sys.modules[name] = None\n"
                 "from fledger.cli import main\n"
                 "sys.exit(main(sys.argv[1:]))\n")


class NotifySocket:
    """What systemd listens on for Type=notify services: a unix datagram socket, read all the time
    (as systemd does). With SO_PASSCRED every datagram carries the sender's pid, as systemd sees it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.received: list[tuple[int, str]] = []  # (pid, state line)
        self._closed = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while not self._closed.is_set():
            try:
                data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
            except TimeoutError:
                continue
            except OSError:
                return
            sender = -1
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    sender = struct.unpack("iII", payload[:12])[0]
            self.received += [(sender, line) for line in data.decode().splitlines()]

    def wait_for(self, pid: int, state: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while (pid, state) not in self.received:
            if time.monotonic() > deadline:
                raise AssertionError(f"no {state} from pid {pid} in {timeout}s; got {self.received[-20:]}")
            time.sleep(0.05)

    def close(self) -> None:
        self._closed.set()
        self._reader.join(timeout=5)
        self.sock.close()


@pytest.fixture
def notify_socket() -> Iterator[NotifySocket]:
    directory = Path(tempfile.mkdtemp(prefix="fl-", dir="/tmp"))  # unix socket paths are short
    sock = NotifySocket(directory / "notify")
    try:
        yield sock
    finally:
        sock.close()
        (directory / "notify").unlink(missing_ok=True)
        directory.rmdir()


def service_env(notify: NotifySocket | None) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    if notify is not None:
        env.update(NOTIFY_SOCKET=str(notify.path), WATCHDOG_USEC="1000000")  # WatchdogSec=1: a ping every 0.5 s
    return env


def spawn(argv: list[str], log: Path, env: dict[str, str], *, plain: bool = False) -> subprocess.Popen[bytes]:
    python = [sys.executable, "-c", PLAIN_INSTALL] if plain else [sys.executable, "-m", "fledger.cli"]
    with open(log, "ab") as out:
        return subprocess.Popen([*python, *argv], stdout=out, stderr=subprocess.STDOUT, env=env)


def run_plain(argv: list[str], log: Path, timeout: float = 120) -> int:
    proc = spawn(argv, log, service_env(None), plain=True)
    return proc.wait(timeout=timeout)


def stop_within_5s(proc: subprocess.Popen[bytes], log: Path) -> int:
    """SIGTERM: the process must be gone within 5 s (systemd's stop budget in the issue)."""
    proc.terminate()
    try:
        return proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError("still running 5 s after SIGTERM:\n" + log.read_text(errors="replace")[-3000:]) from None


def broker_args(broker: BrokerInfo) -> list[str]:
    return ["--broker-host", broker.host, "--broker-port", str(broker.port)]


def test_a_plain_install_runs_keys_the_ledger_tools_and_a_coordinator_under_systemd(
        embedded_broker: BrokerInfo, notify_socket: NotifySocket, tmp_path: Path) -> None:
    log = tmp_path / "plain.log"
    keys = tmp_path / "keys"
    assert run_plain(["keys", "--dir", str(keys), "init", "--fleet", "plant7"], log) == 0, log.read_text()
    assert run_plain(["keys", "--dir", str(keys), "add-device", "pump-01"], log) == 0, log.read_text()
    state = tmp_path / "coordinator"
    coordinator_log = tmp_path / "coordinator.log"
    coordinator = spawn(["coordinator", *broker_args(embedded_broker), "--fleet", "plant7", "--task", "csv",
                         "--csv-features", "8", "--min-clients", "1", "--state-dir", str(state),
                         "--keys", str(keys / keytool.COORDINATOR_FILE),
                         "--devices", str(keys / keytool.REGISTRY_FILE)],
                        coordinator_log, service_env(notify_socket), plain=True)
    try:
        notify_socket.wait_for(coordinator.pid, "READY=1", timeout=120)
        notify_socket.wait_for(coordinator.pid, "WATCHDOG=1", timeout=30)
        # A monitor on a plain install follows the fleet's ledger from the broker and verifies it.
        replica = tmp_path / "replica.blocks"
        assert run_plain(["ledger", "follow", *broker_args(embedded_broker), "--fleet", "plant7",
                          "--coordinator-key", str(keys / "device-pump-01.json"),  # pinned, as monitors must be
                          "--replica", str(replica), "--until-height", "3", "--timeout", "90"], log) == 0, \
            log.read_text()[-3000:]
        coordinator.send_signal(signal.SIGHUP)  # `systemctl reload`: re-reads devices.json
        time.sleep(1.0)
        assert coordinator.poll() is None, coordinator_log.read_text()[-3000:]
        assert stop_within_5s(coordinator, coordinator_log) == 0
        notify_socket.wait_for(coordinator.pid, "STOPPING=1", timeout=1)
    finally:
        if coordinator.poll() is None:
            coordinator.kill()
    assert run_plain(["ledger", "verify", str(state / "ledger.log")], log) == 0, log.read_text()[-3000:]
    assert "torch" not in coordinator_log.read_text()  # no ImportError: nothing on this path needed it


def test_missing_extras_are_named_in_one_line(tmp_path: Path) -> None:
    log = tmp_path / "broker.log"
    assert run_plain(["broker", "--port", str(free_port())], log) == 2
    text = log.read_text()
    assert "pip install 'fledger[broker]'" in text and "Traceback" not in text


def test_a_long_running_agent_waits_for_the_next_run_and_survives_sighup(
        embedded_broker: BrokerInfo, notify_socket: NotifySocket, tmp_path: Path) -> None:
    from federation_run import Federation

    fed = Federation(tmp_path, embedded_broker.host, embedded_broker.port, task="california",
                     devices=("edge-1",), rounds=1, limit=200, extra_agent=["--no-exit-when-done"])
    os.environ["NOTIFY_SOCKET"] = str(notify_socket.path)
    os.environ["WATCHDOG_USEC"] = "1000000"
    try:
        fed.start_coordinator()
        agent = fed.start_agent(0)
    finally:
        del os.environ["NOTIFY_SOCKET"], os.environ["WATCHDOG_USEC"]
    agent_log = fed.logs / "edge-1.log"
    try:
        notify_socket.wait_for(agent.pid, "READY=1", timeout=120)
        notify_socket.wait_for(agent.pid, "WATCHDOG=1", timeout=30)
        assert fed.wait("coordinator", timeout=180) == 0  # the run of 1 round is over
        deadline = time.monotonic() + 30
        while "finished training" not in agent_log.read_text() and time.monotonic() < deadline:
            time.sleep(0.5)
        agent.send_signal(signal.SIGHUP)
        time.sleep(2.0)
        assert agent.poll() is None, "the agent exited after its run or on SIGHUP:\n" + fed.log_tail()
        assert "SIGHUP" in agent_log.read_text()
        # The next run: the same fleet continues to round 2; the waiting agent takes part.
        fed.rounds = 2
        fed.start_coordinator()
        assert fed.wait("coordinator", timeout=180) == 0
        assert "round 2: trained" in agent_log.read_text(), fed.log_tail()
        assert stop_within_5s(agent, agent_log) == 0
        notify_socket.wait_for(agent.pid, "STOPPING=1", timeout=1)
    finally:
        fed.stop()


@pytest.mark.parametrize("role", ["coordinator", "agent"])
def test_sigterm_while_the_broker_is_unreachable_ends_within_5s(role: str, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keytool.init_fleet(keys, "plant7")
    keytool.add_device(keys, "pump-01")
    nothing_there = ["--broker-host", "127.0.0.1", "--broker-port", str(free_port())]
    if role == "coordinator":
        argv = ["coordinator", *nothing_there, "--fleet", "plant7", "--state-dir", str(tmp_path / "state"),
                "--keys", str(keys / keytool.COORDINATOR_FILE), "--devices", str(keys / keytool.REGISTRY_FILE)]
    else:
        argv = ["agent", *nothing_there, "--bundle", str(keytool.bundle_path(keys, "pump-01")), "--limit", "100",
                "--state-dir", str(tmp_path / "agent")]
    log = tmp_path / f"{role}.log"
    proc = spawn(argv, log, service_env(None))
    try:
        deadline = time.monotonic() + 120
        while "unreachable" not in log.read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()
            time.sleep(0.2)
        time.sleep(1.5)  # into the backoff wait
        assert stop_within_5s(proc, log) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_the_notifier_never_blocks_on_a_reader_that_is_behind(tmp_path: Path) -> None:
    """Unix datagram queues are short (net.unix.max_dgram_qlen, 10 by default): a blocking send
    would freeze the service's main loop until systemd reads."""
    from federation.systemd import Notifier

    directory = Path(tempfile.mkdtemp(prefix="fl-", dir="/tmp"))
    path = directory / "notify"
    unread = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    unread.bind(str(path))
    try:
        notifier = Notifier({"NOTIFY_SOCKET": str(path)})
        sent = [notifier.send("WATCHDOG=1") for _ in range(200)]  # would hang at ~10 if blocking
        assert sent[0] and not sent[-1]
        unread.settimeout(1)
        assert unread.recv(100) == b"WATCHDOG=1"
    finally:
        unread.close()
        path.unlink()
        directory.rmdir()


def test_watchdog_interval_is_half_of_what_systemd_asks_and_only_for_its_process() -> None:
    from federation.systemd import Notifier, watchdog_interval

    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}) is None
    assert watchdog_interval({}) is None
    assert Notifier({}).send("READY=1") is False  # not under systemd: a no-op


UNITS = sorted((ROOT / "deploy" / "systemd").glob("*.service"))


@pytest.mark.parametrize("unit", UNITS, ids=[u.name for u in UNITS])
def test_units_are_notify_services_with_watchdog_reload_and_start_limits(unit: Path, tmp_path: Path) -> None:
    text = unit.read_text()
    for directive in ("Type=notify", "WatchdogSec=", "ExecReload=/bin/kill -HUP $MAINPID",
                      "StartLimitIntervalSec=", "StartLimitBurst=", "RestartPreventExitStatus=1 2 5"):
        assert directive in text, f"{unit.name}: missing {directive}"
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed: exposure not scored")
    # A template must be instantiated to be analysed offline.
    instance = tmp_path / unit.name.replace("@.", "@pump-01.")
    instance.write_text(text)
    out = subprocess.run([analyze, "security", "--offline=yes", str(instance)], capture_output=True, text=True)
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+)", out.stdout)
    assert match, out.stdout[-2000:] + out.stderr[-2000:]
    assert float(match.group(1)) <= 1.5


def test_sigterm_during_local_training_ends_within_5s(embedded_broker: BrokerInfo, tmp_path: Path) -> None:
    """A round on a device may train for minutes; a stop must not wait for it (it is retrained later)."""
    from federation_run import Federation

    fed = Federation(tmp_path, embedded_broker.host, embedded_broker.port, task="mnist", devices=("edge-1",),
                     rounds=1, limit=30_000)
    try:
        fed.start_coordinator()
        agent = fed.start_agent(0)
        agent_log = fed.logs / "edge-1.log"
        deadline = time.monotonic() + 180
        while "registered in the ledger" not in agent_log.read_text() and time.monotonic() < deadline:
            assert agent.poll() is None, fed.log_tail()
            time.sleep(0.2)
        time.sleep(2.0)  # well into one epoch over 30,000 images
        assert "round 1: trained" not in agent_log.read_text(), "training ended before the signal: test too weak"
        assert stop_within_5s(agent, agent_log) == 0
        assert "stopped during local training" in agent_log.read_text()
        assert not list((tmp_path / "edge-1" / "outbox").glob("*")), "a half-trained update must not be queued"
    finally:
        fed.stop()


def test_every_third_party_import_is_declared() -> None:
    """Each module the code imports is a dependency or an extra in pyproject.toml."""
    import ast
    import importlib.metadata
    import itertools
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {re.split(r"[\[<>=!~ ]", spec)[0].lower().replace("_", "-")
                for spec in [*project["dependencies"], *itertools.chain(*project["optional-dependencies"].values())]}
    distributions = importlib.metadata.packages_distributions()
    ours = {"federation", "edge_agent", "coordinator", "ledger", "fledger"}
    imported: set[str] = set()
    for package in ours:
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    imported |= {alias.name.split(".")[0] for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    imported.add(node.module.split(".")[0])
    third_party = {name for name in imported - ours if name not in sys.stdlib_module_names}
    undeclared = {name: distributions.get(name) for name in third_party
                  if not {d.lower().replace("_", "-") for d in distributions.get(name, [name])} & declared}
    assert undeclared == {}
