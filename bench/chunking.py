"""What chunking by default costs on the wire: bytes and time, chunked vs unchunked.

For the California/csv MLP and the MNIST CNN (sealed messages as fledger sends them):

1. bytes: MQTT PUBLISH packets (header + topic + payload) for one update and one retained
   model, unchunked vs framed at the default ``max_payload`` (retained: chunk topics plus a
   manifest);
2. time: one update published through a real mosquitto (started here, no packet limit, on a
   free loopback port) until the subscriber's MqttLink has it whole, median of ``--repeat``;
   plus the CPU time of split + reassemble alone;
3. rounds: a coordinator and two agents as processes (``--rounds`` rounds, 300 samples each),
   the median time between consecutive aggregate blocks in the ledger.

    python bench/chunking.py [--repeat 50] [--rounds 5] [--no-rounds]
        -> table on stdout, bench/results/chunking.json
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from brokers import Mosquitto  # noqa: E402

from federation import (  # noqa: E402
    crypto,
    envelope,
    records,
)
from federation.chunking import Reassembler, retained_topics, split  # noqa: E402
from federation.codec import encode_tensors  # noqa: E402
from federation.fleet_state import FleetLedger  # noqa: E402
from federation.keys import CoordinatorKeys, DeviceBundle  # noqa: E402
from federation.mqtt import BrokerConfig, MqttLink  # noqa: E402
from federation.packet_limit import DEFAULT_MAX_PAYLOAD, publish_overhead  # noqa: E402
from federation.tasks import get_task  # noqa: E402
from federation.topics import Topics  # noqa: E402
from ledger import Ed25519Signer  # noqa: E402

TASKS = ("california", "mnist")
TOPICS = Topics("bench")


def sealed_messages(task_name: str) -> tuple[bytes, bytes]:
    """A sealed update and a sealed global model of the task's model."""
    torch.manual_seed(0)
    state = {k: v.detach().numpy() for k, v in get_task(task_name).build_model().state_dict().items()}
    codec = encode_tensors(state)
    keys = CoordinatorKeys.generate("bench")
    bundle = DeviceBundle("bench", "dev", crypto.ed25519_generate()[0], keys.public, keys.model_key_id, keys.model_key)
    update = envelope.seal_update(bundle, 1, codec, 100, {"train_loss": 0.1}, dataset_sha256=bytes(32),
                                  base_sha256=bytes(32))
    with tempfile.TemporaryDirectory() as tmp:  # the model travels with the ledger block that made it
        ledger = FleetLedger.open(Path(tmp) / "ledger.log", signer=Ed25519Signer(keys.sign_seed), fleet="bench")
        block = ledger.append(records.model_published(1, hashlib.sha256(codec).digest()))
        ledger.close()
    model = envelope.seal_model(keys, 1, codec, block=block.to_bytes(), info={"task": task_name}, now=0.0)
    return update, model


def packets(pubs: list[tuple[str, bytes]]) -> tuple[int, int]:
    """(packets, bytes on the wire) of QoS 1 PUBLISHes, MQTT 3.1.1."""
    return len(pubs), sum(len(p) + publish_overhead(t, len(p), mqtt5=False) for t, p in pubs)


def wire_bytes(task_name: str) -> dict[str, Any]:
    update, model = sealed_messages(task_name)
    topic = TOPICS.update("dev")
    plain_update = packets([(topic, update)])
    framed_update = packets([(topic, f) for f in split(update, DEFAULT_MAX_PAYLOAD)])
    plain_model = packets([(TOPICS.model, model)])
    framed_model = packets(retained_topics(TOPICS.model, split(model, DEFAULT_MAX_PAYLOAD)))
    return {
        "task": task_name, "update_bytes": len(update), "model_bytes": len(model),
        "update_packets_chunked": framed_update[0], "update_wire_unchunked": plain_update[1],
        "update_wire_chunked": framed_update[1], "update_overhead_bytes": framed_update[1] - plain_update[1],
        "model_packets_chunked": framed_model[0], "model_wire_unchunked": plain_model[1],
        "model_wire_chunked": framed_model[1], "model_overhead_bytes": framed_model[1] - plain_model[1],
    }


def cpu_cost(message: bytes, repeat: int) -> float:
    """Median milliseconds to split ``message`` at the default and reassemble it."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        r = Reassembler(1 << 30, 1 << 28, 60.0)
        for frame in split(message, DEFAULT_MAX_PAYLOAD):
            whole = r.feed("t", frame)
        times.append(time.perf_counter() - start)
        assert whole == message
    return 1000 * statistics.median(times)


def transfer_ms(port: int, message: bytes, max_payload: int, repeat: int) -> float:
    """Median milliseconds from publish until the subscriber's link has ``message`` whole."""
    config = BrokerConfig(broker_port=port, max_payload=max_payload)
    topic = TOPICS.update("dev")
    run = os.urandom(4).hex()  # fresh sessions: nothing queued by an earlier measurement
    receiver = MqttLink(config, f"bench-rx-{run}", subscriptions=[topic])
    sender = MqttLink(config, f"bench-tx-{run}")
    receiver.start(timeout=20)
    sender.start(timeout=20)
    times = []
    try:
        for _ in range(repeat + 1):  # the first one warms up
            start = time.perf_counter()
            sender.publish(topic, message)
            got = receiver.inbox.get(timeout=30)
            times.append(time.perf_counter() - start)
            assert got.payload == message, (len(got.payload), len(message), got.payload[:8])
    finally:
        receiver.stop()
        sender.stop()
    return 1000 * statistics.median(times[1:])


def round_seconds(port: int, workdir: Path, task_name: str, rounds: int, extra: list[str]) -> float:
    """Median seconds between consecutive aggregate blocks of a real run."""
    from federation_run import Federation

    fed = Federation(workdir, "127.0.0.1", port, fleet=f"b{abs(hash((task_name, tuple(extra)))) % 10**6}",
                     task=task_name, rounds=rounds, limit=300, extra_coordinator=extra, extra_agent=extra)
    try:
        fed.start_all()
        if fed.wait("coordinator", 600) != 0:
            raise RuntimeError(f"coordinator failed\n{fed.log_tail()}")
        for device in fed.devices:
            fed.wait(device, 60)
    finally:
        fed.stop()
    with FleetLedger.open(fed.state / "ledger.log") as ledger:
        stamps = [b.timestamp for b in ledger.blocks(0) if b.data["type"] == "aggregate"]
    return statistics.median(b - a for a, b in itertools.pairwise(stamps))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=50, help="transfers per measurement (default 50)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per federation run (default 5)")
    parser.add_argument("--no-rounds", action="store_true", help="skip the federation runs")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "chunking.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    sizes = [wire_bytes(t) for t in TASKS]
    print(f"max_payload {DEFAULT_MAX_PAYLOAD:,} bytes (default)\n")
    print(f"{'task':<11}{'message':<8}{'bytes':>10}{'packets':>9}{'wire unchunked':>16}{'wire chunked':>14}"
          f"{'overhead':>10}")
    for r in sizes:
        for kind in ("update", "model"):
            extra = r[f"{kind}_overhead_bytes"]
            print(f"{r['task']:<11}{kind:<8}{r[f'{kind}_bytes']:>10,}{r[f'{kind}_packets_chunked']:>9}"
                  f"{r[f'{kind}_wire_unchunked']:>16,}{r[f'{kind}_wire_chunked']:>14,}{extra:>10,}")
    timing: list[dict[str, Any]] = []
    rounds: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        broker = Mosquitto(Path(tmp))
        try:
            for task_name in TASKS:
                update, _ = sealed_messages(task_name)
                timing.append({
                    "task": task_name, "update_bytes": len(update),
                    "split_reassemble_ms": cpu_cost(update, args.repeat),
                    "transfer_ms_unchunked": transfer_ms(broker.port, update, 0, args.repeat),
                    "transfer_ms_chunked": transfer_ms(broker.port, update, DEFAULT_MAX_PAYLOAD, args.repeat),
                })
            print(f"\n{'task':<11}{'update B':>10}{'split+join ms':>15}{'unchunked ms':>14}{'chunked ms':>12}")
            for t in timing:
                print(f"{t['task']:<11}{t['update_bytes']:>10,}{t['split_reassemble_ms']:>15.2f}"
                      f"{t['transfer_ms_unchunked']:>14.2f}{t['transfer_ms_chunked']:>12.2f}")
            if not args.no_rounds:
                for task_name in TASKS:
                    row: dict[str, Any] = {"task": task_name, "rounds": args.rounds}
                    for name, extra in (("unchunked", ["--max-payload", "0"]), ("chunked", [])):
                        row[f"round_s_{name}"] = round_seconds(broker.port, Path(tmp) / f"{task_name}-{name}",
                                                               task_name, args.rounds, extra)
                    rounds.append(row)
                print(f"\n{'task':<11}{'rounds':>7}{'round s unchunked':>19}{'round s chunked':>17}")
                for r in rounds:
                    print(f"{r['task']:<11}{r['rounds']:>7}{r['round_s_unchunked']:>19.2f}{r['round_s_chunked']:>17.2f}")
        finally:
            broker.stop()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "python": platform.python_version(), "torch": torch.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "max_payload": DEFAULT_MAX_PAYLOAD,
        "broker": "mosquitto (no packet limit), loopback", "wire": sizes, "transfer": timing, "rounds": rounds,
    }, indent=2))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
