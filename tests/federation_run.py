"""Run a real federation (coordinator + agents as separate processes) against a broker."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fledger import keytool


@dataclass
class Federation:
    workdir: Path
    host: str
    port: int
    fleet: str = "test"
    task: str = "california"
    devices: tuple[str, ...] = ("edge-1", "edge-2")
    rounds: int = 2
    limit: int = 400
    extra_coordinator: list[str] = field(default_factory=list)
    extra_agent: list[str] = field(default_factory=list)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    preexec: dict[str, Callable[[], None]] = field(default_factory=dict)  # per process, e.g. resource limits
    # broker user -> password file: each process logs in as its own user (coordinator, device id),
    # as a broker that enforces the ACL requires
    logins: dict[str, Path] = field(default_factory=dict)
    # process name -> broker port, for a process on another node of a broker cluster than ``port``
    ports: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.keys = self.workdir / "keys"
        keytool.init_fleet(self.keys, self.fleet, force=True)
        for device in self.devices:
            keytool.add_device(self.keys, device)
        self.state = self.workdir / "coordinator"
        self.logs = self.workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)

    def _cli(self) -> list[str]:
        return [sys.executable, "-m", "fledger.cli", "--log-level", "INFO"]

    def broker_args(self) -> list[str]:
        return ["--broker-host", self.host, "--broker-port", str(self.port)]

    def node_args(self, name: str) -> list[str]:
        """Its own cluster node's port, if it has one (given after broker_args(): the last one counts)."""
        return ["--broker-port", str(self.ports[name])] if name in self.ports else []

    def login_args(self, user: str) -> list[str]:
        return ["--username", user, "--password-file", str(self.logins[user])] if user in self.logins else []

    def start_coordinator(self) -> subprocess.Popen[bytes]:
        cmd = [*self._cli(), "coordinator", *self.broker_args(), *self.node_args("coordinator"),
               "--fleet", self.fleet, "--task", self.task,
               "--state-dir", str(self.state), "--keys", str(self.keys / keytool.COORDINATOR_FILE),
               "--devices", str(self.keys / keytool.REGISTRY_FILE), "--rounds", str(self.rounds),
               "--min-clients", str(len(self.devices)), *self.login_args("coordinator"), *self.extra_coordinator]
        return self._spawn("coordinator", cmd)

    def start_agent(self, index: int) -> subprocess.Popen[bytes]:
        device = self.devices[index]
        cmd = [*self._cli(), "agent", *self.broker_args(), *self.node_args(device),
               "--bundle", str(keytool.bundle_path(self.keys, device)),
               "--task", self.task, "--shard", f"{index}/{len(self.devices)}", "--limit", str(self.limit),
               "--state-dir", str(self.workdir / device), "--threads", "1", "--resend-interval", "3",
               *self.login_args(device), *self.extra_agent]
        return self._spawn(device, cmd)

    def _spawn(self, name: str, cmd: list[str]) -> subprocess.Popen[bytes]:
        log = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 (the process owns it)
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, preexec_fn=self.preexec.get(name))
        self.procs[name] = proc
        return proc

    def start_all(self) -> None:
        self.start_coordinator()
        for i in range(len(self.devices)):
            self.start_agent(i)

    def wait(self, name: str, timeout: float) -> int:
        try:
            return self.procs[name].wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{name} did not finish in {timeout}s\n{self.log_tail()}") from None

    def log_tail(self, lines: int = 30) -> str:
        out = []
        for path in sorted(self.logs.glob("*.log")):
            text = path.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {path.name}\n" + "\n".join(text))
        return "\n".join(out)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + 10
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
