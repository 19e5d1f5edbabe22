"""Paid-prediction benchmark: single-row requests per second and latency (p50/p99).

    python bench/predictions.py [--requests 1000] [--window 16] [--broker mosquitto|amqtt]

Two measurements on California Housing (MLP 8-64-64-1, the initial model), fee 1 per request:

- service: the coordinator's PredictionService in this process, no network: parse, verify the
  client's signature, decrypt, check, predict, append the receipt (signed, fsync per block),
  seal the reply. Shows what the coordinator itself can do and the receipt's (ledger) share.
- round trip: a real coordinator process and broker; this process is the client (signs and
  encrypts each request, checks each reply's signature and receipt block). Latency from
  sequential requests (one at a time); throughput with --window requests in flight.

Prints a table and writes bench/results/predictions.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from federation import prediction_wire as wire
from federation.mqtt import BrokerConfig, MqttLink
from federation.topics import Topics
from fledger import keytool

RESULTS = Path(__file__).resolve().parent / "results" / "predictions.json"
BATCH = 16  # requests answered per group commit in the service measurement
ROW = np.array([[8.3, 41.0, 7.0, 1.0, 322.0, 2.6, 37.9, -122.2]], np.float32)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values), q))


def bench_service(workdir: Path, requests: int) -> dict[str, Any]:
    import hashlib

    import torch

    from coordinator.inference import make_predictor
    from coordinator.predictions import CurrentModel, PredictionService, PredictionSettings
    from federation import credits
    from federation.codec import encode_tensors
    from federation.fleet_state import FleetLedger
    from federation.keys import CoordinatorKeys, DeviceRegistry
    from federation.tasks import get_task
    from ledger import Ed25519Signer

    keys = CoordinatorKeys.load(workdir / "keys" / keytool.COORDINATOR_FILE)
    bundle = wire.ClientBundle.load(keytool.client_bundle_path(workdir / "keys", "bench"))
    clients = DeviceRegistry.load(workdir / "keys" / keytool.CLIENTS_FILE)
    torch.manual_seed(0)
    weights = {k: v.detach().numpy().copy() for k, v in get_task("california").build_model().state_dict().items()}
    model = CurrentModel(1, hashlib.sha256(encode_tensors(weights)).digest(), weights)
    ledger = FleetLedger.open(workdir / "service-ledger.log", signer=Ed25519Signer(keys.sign_seed), fleet=keys.fleet)
    append_seconds = [0.0]

    def append(record: dict[str, Any]) -> Any:
        started = time.perf_counter()
        block = ledger.append(record)
        append_seconds[0] += time.perf_counter() - started
        return block

    topics = Topics(keys.fleet)
    service = PredictionService(PredictionSettings(fee=1), keys, clients, ledger.state.accounts, append=append,
                                model=lambda: model, predictor=make_predictor("california"),
                                publish=lambda t, p: None, topics=topics, group_commit=ledger.group_commit)
    _, order = wire.seal_order(keys, "deposit", requests + 10, "bench")
    assert service.handle_order(order)["ok"]
    payloads = [wire.seal_request(bundle, ROW).payload for _ in range(requests)]
    topic = wire.request_topic(topics, "bench")
    times = []
    started = time.perf_counter()
    for payload in payloads:
        t0 = time.perf_counter()
        assert service.handle_request(topic, payload).status == "ok"
        times.append(time.perf_counter() - t0)
    total = time.perf_counter() - started
    one_append = append_seconds[0] / requests
    # The same with the daemon's group commit: BATCH queued requests, one fsync.
    _, order = wire.seal_order(keys, "deposit", requests, "bench")
    assert service.handle_order(order)["ok"]
    payloads = [wire.seal_request(bundle, ROW).payload for _ in range(requests)]
    batch_times = []
    started = time.perf_counter()
    for i in range(0, requests, BATCH):
        t0 = time.perf_counter()
        outcomes = service.handle_batch([(topic, p) for p in payloads[i:i + BATCH]])
        assert all(getattr(o, "status", "") == "ok" for o in outcomes)
        batch_times.append(time.perf_counter() - t0)
    batched = time.perf_counter() - started
    assert credits.fold(ledger).balance("bench") == 10
    ledger.close()
    return {"requests": requests, "requests_per_s": requests / total, "p50_ms": percentile(times, 50) * 1e3,
            "p99_ms": percentile(times, 99) * 1e3, "receipt_append_ms": one_append * 1e3,
            "batch": BATCH, "batched_requests_per_s": requests / batched,
            "batch_p50_ms": percentile(batch_times, 50) * 1e3, "batch_p99_ms": percentile(batch_times, 99) * 1e3}


def start_broker(kind: str, workdir: Path) -> tuple[Any, int, str]:
    from fledger.broker import EmbeddedBroker, free_port

    mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if kind == "mosquitto" and Path(mosquitto).exists():
        port = free_port()
        conf = workdir / "mosquitto.conf"
        conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\n")
        proc = subprocess.Popen([mosquitto, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        return proc, port, "mosquitto"
    broker = EmbeddedBroker().start()
    return broker, broker.port, "amqtt"


def bench_round_trip(workdir: Path, port: int, requests: int, window: int) -> dict[str, Any]:
    keys_dir = workdir / "keys"
    state = workdir / "coordinator"
    log = open(workdir / "coordinator.log", "wb")  # noqa: SIM115 (the process owns it)
    coordinator = subprocess.Popen(
        [sys.executable, "-m", "fledger.cli", "--log-level", "WARNING", "coordinator", "--broker-port", str(port),
         "--fleet", "bench", "--task", "california", "--state-dir", str(state),
         "--keys", str(keys_dir / keytool.COORDINATOR_FILE), "--devices", str(keys_dir / keytool.REGISTRY_FILE),
         "--clients", str(keys_dir / keytool.CLIENTS_FILE), "--min-clients", "1", "--predict-fee", "1"],
        stdout=log, stderr=subprocess.STDOUT)
    bundle = wire.ClientBundle.load(keytool.client_bundle_path(keys_dir, "bench"))
    topics = Topics("bench")
    config = BrokerConfig(broker_port=port)
    owner = MqttLink(config, "bench-owner", subscriptions=[wire.order_reply_topic(topics)])
    link = MqttLink(config, "bench-client", subscriptions=[wire.reply_topic(topics, "bench")])
    owner.start()
    link.start()
    try:
        from federation.keys import CoordinatorKeys

        keys = CoordinatorKeys.load(keys_dir / keytool.COORDINATOR_FILE)
        for _ in range(120):  # until the coordinator is up and confirms the deposit
            _, order = wire.seal_order(keys, "deposit", 2 * requests + 10, "bench")
            owner.publish(wire.order_topic(topics), order)
            try:
                owner.inbox.get(timeout=1.0)
                break
            except queue.Empty:
                continue
        else:
            raise RuntimeError("the coordinator never confirmed the deposit; see coordinator.log")

        reply_topic = wire.reply_topic(topics, "bench")

        def send() -> tuple[wire.PendingRequest, float]:
            pending = wire.seal_request(bundle, ROW)
            # Over MQTT 5 the reply echoes the request id as Correlation Data: one reply is
            # opened once, not tried against every request in flight (a signature check each).
            link.publish(wire.request_topic(topics, "bench"), pending.payload, response_topic=reply_topic,
                         correlation=pending.request_id)
            return pending, time.perf_counter()

        def receive(pending: dict[bytes, tuple[wire.PendingRequest, float]], latencies: list[float]) -> None:
            message = link.inbox.get(timeout=30)
            pending_ids = [message.correlation] if message.correlation in pending else list(pending)
            for request_id in pending_ids:
                request, sent = pending[request_id]
                try:
                    reply = wire.open_reply(message.payload, bundle, request)
                except wire.EnvelopeError:
                    continue
                assert reply.status == "ok", reply.reason
                latencies.append(time.perf_counter() - sent)
                del pending[request_id]
                return

        latencies: list[float] = []
        for _ in range(min(requests, 300)):  # sequential: latency
            request, sent = send()
            receive({request.request_id: (request, sent)}, latencies)
        in_flight: dict[bytes, tuple[wire.PendingRequest, float]] = {}
        windowed: list[float] = []
        cpu_before = _cpu_seconds(coordinator.pid), time.process_time()
        started = time.perf_counter()
        sent_count = 0
        while sent_count < requests or in_flight:
            while sent_count < requests and len(in_flight) < window:
                request, t0 = send()
                in_flight[request.request_id] = (request, t0)
                sent_count += 1
            receive(in_flight, windowed)
        total = time.perf_counter() - started
        # Where the time goes with requests in flight: CPU seconds of the coordinator process and
        # of this client process per wall second (1.0 = one core busy the whole time).
        coordinator_cpu = (_cpu_seconds(coordinator.pid) - cpu_before[0]) / total
        client_cpu = (time.process_time() - cpu_before[1]) / total
        return {"sequential_requests": len(latencies), "p50_ms": percentile(latencies, 50) * 1e3,
                "p99_ms": percentile(latencies, 99) * 1e3, "sequential_requests_per_s": 1 / statistics.mean(latencies),
                "mqtt5": link.mqtt5, "window": window, "windowed_requests": requests,
                "requests_per_s": requests / total, "windowed_coordinator_cores": coordinator_cpu,
                "windowed_client_cores": client_cpu,
                "windowed_p50_ms": percentile(windowed, 50) * 1e3, "windowed_p99_ms": percentile(windowed, 99) * 1e3}
    finally:
        link.stop()
        owner.stop()
        coordinator.terminate()
        coordinator.wait(timeout=30)
        log.close()


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc; 0.0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--window", type=int, default=16)
    parser.add_argument("--broker", choices=["mosquitto", "amqtt"], default="mosquitto")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        keytool.init_fleet(workdir / "keys", "bench")
        keytool.add_client(workdir / "keys", "bench")
        service = bench_service(workdir, args.requests)
        broker, port, broker_name = start_broker(args.broker, workdir)
        try:
            trip = bench_round_trip(workdir, port, args.requests, args.window)
        finally:
            if isinstance(broker, subprocess.Popen):
                broker.terminate()
                broker.wait(timeout=10)
            else:
                broker.stop()
    result = {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
              "load_average_1min": os.getloadavg()[0], "task": "california",
              "rows_per_request": 1, "broker": broker_name, "service": service, "round_trip": trip}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'single-row predictions':42s} {'req/s':>8s} {'p50 ms':>8s} {'p99 ms':>8s}")
    print(f"{'service in-process (receipt fsync)':42s} {service['requests_per_s']:8.0f} {service['p50_ms']:8.2f} "
          f"{service['p99_ms']:8.2f}")
    print(f"{f'service in-process, batches of {BATCH} (1 fsync)':42s} {service['batched_requests_per_s']:8.0f} "
          f"{service['batch_p50_ms']:8.2f} {service['batch_p99_ms']:8.2f}  (per batch)")
    print(f"{'round trip, sequential (' + broker_name + ')':42s} {trip['sequential_requests_per_s']:8.0f} "
          f"{trip['p50_ms']:8.2f} {trip['p99_ms']:8.2f}")
    print(f"{f'round trip, {args.window} in flight ({broker_name})':42s} {trip['requests_per_s']:8.0f} "
          f"{trip['windowed_p50_ms']:8.2f} {trip['windowed_p99_ms']:8.2f}")
    print(f"with {args.window} in flight: coordinator {trip['windowed_coordinator_cores']:.2f} cores busy, "
          f"client {trip['windowed_client_cores']:.2f} (MQTT 5 correlation data: {trip['mqtt5']})")
    print(f"receipt append (sign + fsync): {service['receipt_append_ms']:.3f} ms per request; "
          f"results in {RESULTS}")


if __name__ == "__main__":
    main()
