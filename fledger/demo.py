"""``fledger demo``: broker, coordinator and two agents on this machine, California Housing
then MNIST, printed round by round as a ledger monitor sees them, and a verified chain at the end.

Each role runs as its own process, exactly as it would on a gateway and two devices; only
the embedded broker runs inside the demo process.
"""

from __future__ import annotations

import argparse
import queue
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from federation.mqtt import BrokerConfig, MqttLink
from federation.topics import Topics
from fledger import keytool
from fledger.broker import EmbeddedBroker

DEVICES = ("edge-1", "edge-2")


@dataclass(frozen=True)
class DemoTask:
    task: str
    rounds: int
    limit: int  # training samples per agent (0: the whole shard)
    metric: str  # the test metric shown per round
    target: str  # what "good" means, printed at the end


def demo_tasks(quick: bool, california_rounds: int, mnist_rounds: int) -> list[DemoTask]:
    if quick:
        return [DemoTask("california", 2, 800, "test_mse", "smoke run"),
                DemoTask("mnist", 1, 600, "test_accuracy", "smoke run")]
    return [DemoTask("california", california_rounds, 0, "test_mse", "<= 0.30 (origin: 0.4387)"),
            DemoTask("mnist", mnist_rounds, 0, "test_accuracy", ">= 0.985 within 3 rounds (origin: 0.974)")]


def add_parser(sub: Any) -> None:
    p = sub.add_parser("demo", help="run broker, coordinator and two agents on California Housing and MNIST",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=None,
                   help="where keys, ledgers, models and logs go (default: runs/demo-<time>)")
    p.add_argument("--california-rounds", type=int, default=5, help="rounds on California Housing (default: 5)")
    p.add_argument("--mnist-rounds", type=int, default=3, help="rounds on MNIST (default: 3)")
    p.add_argument("--only", choices=["california", "mnist"], default=None, help="run one task only")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: few samples and rounds (seconds, not minutes; figures are not meaningful)")
    p.add_argument("--timeout", type=float, default=1800.0, help="give up on a task after this many seconds")
    p.set_defaults(func=main)


def _python() -> list[str]:
    return [sys.executable, "-m", "fledger.cli", "--log-level", "INFO"]


def _credentials(workdir: Path) -> tuple[Path, dict[str, Path]]:
    """Broker users with random passwords: the broker enforces the ACL by user name, and amqtt
    keeps persistent sessions only with auth."""
    broker_dir = workdir / "broker"
    files = {user: keytool.new_broker_user(broker_dir, user) for user in ("coordinator", "monitor", *DEVICES)}
    password_db = broker_dir / keytool.BROKER_PASSWORDS
    return password_db, files


def _number(value: Any) -> float:
    """A metric for printing: the ledger records None where evaluation gave no finite number."""
    return float(value) if isinstance(value, (int, float)) else float("nan")


def _format_round(data: dict[str, Any], block: Any, metric: str) -> str:
    metrics = data.get("metrics", {})
    train = _number(metrics.get("clients_train_loss"))
    test = _number(metrics.get(metric, metrics.get(f"clients_{metric}")))
    return (f"  round {data['round']:>2} | clients {len(data['participants'])} | train loss {train:8.4f} | "
            f"{metric} {test:7.4f} | block {block.index:>3} {block.hash.hex()[:16]}")


def run_task(spec: DemoTask, workdir: Path, broker: EmbeddedBroker, passwords: dict[str, Path],
             timeout: float) -> dict[str, Any]:
    from federation.fleet_state import verify_file
    from ledger import Block

    fleet = f"demo-{spec.task}"
    topics = Topics(fleet)
    # A re-run in the same --workdir starts afresh: new keys, ledger, models and agent state.
    shutil.rmtree(workdir / spec.task, ignore_errors=True)
    keys_dir = workdir / spec.task / "keys"
    keytool.init_fleet(keys_dir, fleet)
    for device in DEVICES:
        keytool.add_device(keys_dir, device)
    state = workdir / spec.task / "coordinator"
    logs = workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    common = ["--broker-host", broker.host, "--broker-port", str(broker.port)]
    monitor = MqttLink(BrokerConfig(broker_host=broker.host, broker_port=broker.port, username="monitor",
                                    password_file=passwords["monitor"]),
                       f"fledger-demo-monitor-{fleet}", subscriptions=[topics.ledger_blocks])
    monitor.start(timeout=30)
    procs: list[subprocess.Popen[bytes]] = []
    coordinator_cmd = [*_python(), "coordinator", *common, "--fleet", fleet, "--task", spec.task,
                       "--username", "coordinator", "--password-file", str(passwords["coordinator"]),
                       "--state-dir", str(state), "--keys", str(keys_dir / keytool.COORDINATOR_FILE),
                       "--devices", str(keys_dir / keytool.REGISTRY_FILE), "--rounds", str(spec.rounds),
                       "--min-clients", str(len(DEVICES)), "--evaluate"]
    started = time.monotonic()
    with open(logs / f"{spec.task}-coordinator.log", "wb") as log_file:
        coordinator = subprocess.Popen(coordinator_cmd, stdout=log_file, stderr=subprocess.STDOUT)
    procs.append(coordinator)
    for i, device in enumerate(DEVICES):
        cmd = [*_python(), "agent", *common, "--bundle", str(keytool.bundle_path(keys_dir, device)),
               "--task", spec.task, "--shard", f"{i}/{len(DEVICES)}", "--threads", "1", "--seed", str(i),
               "--username", device, "--password-file", str(passwords[device]),
               "--state-dir", str(workdir / spec.task / device)]
        if spec.limit:
            cmd += ["--limit", str(spec.limit)]
        with open(logs / f"{spec.task}-{device}.log", "wb") as log_file:
            procs.append(subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT))
    last: dict[str, Any] = {}
    try:
        while True:
            try:
                message = monitor.inbox.get(timeout=0.5)
                if message.topic != topics.ledger_blocks:
                    continue  # amqtt also hands out retained messages of topics we never subscribed to
                block = Block.from_bytes(message.payload)
                if block.data.get("type") == "aggregate":
                    last = dict(block.data)
                    print(_format_round(block.data, block, spec.metric), flush=True)
            except queue.Empty:
                pass
            if coordinator.poll() is not None and monitor.inbox.empty():
                break
            if time.monotonic() - started > timeout:
                raise TimeoutError(f"{spec.task}: not finished after {timeout:.0f}s; see {logs}")
        for proc in procs[1:]:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.terminate()
    finally:
        monitor.stop()
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=10)
    if coordinator.returncode != 0:
        raise RuntimeError(f"{spec.task}: coordinator exited with {coordinator.returncode}; see {logs}")
    report = verify_file(state / "ledger.log")
    if not report.ok:
        raise RuntimeError(f"{spec.task}: ledger verification FAILED: {report}")
    print(f"  chain of {report.height} blocks verified ({state / 'ledger.log'})")
    print(f"  global model: {state / 'models'}   logs: {logs}")
    result = {"task": spec.task, "rounds": spec.rounds, "seconds": time.monotonic() - started,
              "final": last.get("metrics", {}), "height": report.height}
    return result


# Loggers of the code running inside the demo process: the embedded broker (amqtt and what it
# uses) and the demo's ledger monitor. Their messages, tracebacks included (amqtt logs e.g.
# "Timeout waiting for PUBACK" on a loaded machine, and recovers), go to a log file.
LIBRARY_LOGGERS = ("amqtt", "transitions", "asyncio", "websockets", "fledger.broker", "federation.mqtt")


def send_library_logs_to(path: Path) -> None:
    """The demo prints fleet lines only; everything the libraries log goes to ``path``."""
    import logging

    from fledger.logs import FleetFormatter

    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(FleetFormatter())
    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers = [handler]
        logger.propagate = False


def main(args: argparse.Namespace) -> int:
    workdir = args.workdir or Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")
    workdir.mkdir(parents=True, exist_ok=True)
    send_library_logs_to(workdir / "logs" / "broker.log")
    password_db, passwords = _credentials(workdir)
    tasks = demo_tasks(args.quick, args.california_rounds, args.mnist_rounds)
    if args.only:
        tasks = [t for t in tasks if t.task == args.only]
    print(f"fledger demo in {workdir} (broker and library logs: {workdir / 'logs' / 'broker.log'})")
    with EmbeddedBroker(password_file=password_db) as broker:
        print(f"embedded MQTT broker (amqtt) on {broker.host}:{broker.port}, password auth and the fleet ACL")
        results = []
        for spec in tasks:
            print(f"\n== {spec.task}: {len(DEVICES)} agents, {spec.rounds} rounds (target {spec.target})")
            results.append(run_task(spec, workdir, broker, passwords, args.timeout))
    print("\nsummary")
    for spec, result in zip(tasks, results, strict=True):
        value = _number(result["final"].get(spec.metric))
        print(f"  {spec.task:<10} {spec.metric} {value:.4f} after {spec.rounds} rounds "
              f"({result['seconds']:.0f}s; target {spec.target})")
    return 0
