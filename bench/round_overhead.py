"""A round's overhead with two clients: from the last update arriving to the new model published.

    python bench/round_overhead.py [--tasks california,mnist] [--rounds 30] [--dir DIR]
                                   [--out bench/results/round_overhead.json]

The coordinator's core (coordinator.service.Coordinator) with everything on: a real ledger,
spool and model files on ``--dir``'s file system (every fsync is the disk's), two devices with
their own keys whose updates are signed and encrypted with the project's envelope code
(sealed beforehand: that is the device's time), min_clients 2, the default strategy
(clipped-fedavg). Per round, the first update is handed in, then the clock runs from handing
in the second until the sealed model for the next round is passed to the publisher: checking
and decrypting that update, its spool file and ledger record (durable before anything is
answered), the aggregation, the model file, the round's records (one commit group) and
sealing the model. No broker: MQTT's share is the network's. Also counted: the fsyncs in that
window. Prints the median and 90th percentile per task and writes JSON.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from coordinator.rounds import RoundPolicy  # noqa: E402
from coordinator.service import Coordinator, CoordinatorSettings  # noqa: E402
from coordinator.storage import ModelStore, Spool  # noqa: E402
from federation import crypto, envelope  # noqa: E402
from federation.codec import encode_tensors  # noqa: E402
from federation.fleet_state import FleetLedger  # noqa: E402
from federation.keys import CoordinatorKeys, DeviceBundle, DeviceRegistry  # noqa: E402
from federation.model_init import initial_weights  # noqa: E402
from federation.topics import Topics  # noqa: E402
from ledger import Ed25519Signer  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "round_overhead.json"
TARGET_MS = 20.0  # issue 17: round overhead for two clients <= 20 ms, encryption, signatures, durability on
DATASET = hashlib.sha256(b"bench data set").digest()


def run_task(task: str, rounds: int, directory: Path) -> dict[str, Any]:
    fleet = "overhead"
    topics = Topics(fleet)
    keys = CoordinatorKeys.generate(fleet)
    registry = DeviceRegistry()
    devices = []
    for name in ("dev-a", "dev-b"):
        seed, public = crypto.ed25519_generate()
        registry.add(name, public)
        devices.append(DeviceBundle(fleet, name, seed, keys.public, keys.model_key_id, keys.model_key))
    published_model = [0.0]

    def publish(topic: str, payload: bytes, retain: bool) -> None:
        if topic == topics.model:
            published_model[0] = time.perf_counter()

    ledger = FleetLedger.open(directory / "ledger.log", signer=Ed25519Signer(keys.sign_seed), fleet=fleet)
    coordinator = Coordinator(
        CoordinatorSettings(fleet, RoundPolicy(min_clients=2, quorum=2, deadline_s=0)), keys, registry, ledger,
        ModelStore(directory / "models"), Spool(directory / "spool"),
        initial_model=lambda: initial_weights(task, 0, seed=1), publish=publish, topics=topics,
        task_info={"task": task})
    coordinator.start()
    for bundle in devices:
        coordinator.handle_registration(topics.register(bundle.device_id),
                                        envelope.seal_dataset(bundle, DATASET, 100, {"task": task}))
    fsyncs = [0]
    real_fsync = os.fsync

    def counted_fsync(fd: int) -> None:
        fsyncs[0] += 1
        real_fsync(fd)

    os.fsync = counted_fsync  # type: ignore[assignment]
    rng = np.random.default_rng(0)
    times, fsync_counts = [], []
    try:
        for _ in range(rounds):
            assert coordinator.round is not None
            number = coordinator.round.number
            base = coordinator.global_model
            sealed = [envelope.seal_update(bundle, number, encode_tensors(
                {k: v + rng.normal(0, 0.01, v.shape).astype(np.float32) for k, v in base.items()}), 100,
                {"train_loss": 0.5}, dataset_sha256=DATASET) for bundle in devices]
            assert coordinator.handle_update(topics.update("dev-a"), sealed[0]).accepted
            fsyncs[0] = 0
            start = time.perf_counter()
            assert coordinator.handle_update(topics.update("dev-b"), sealed[1]).accepted
            assert coordinator.round.number == number + 1 and published_model[0] > start
            times.append(1000 * (published_model[0] - start))
            fsync_counts.append(fsyncs[0])
    finally:
        os.fsync = real_fsync  # type: ignore[assignment]
        ledger.close()
    ordered = sorted(times)
    return {"task": task, "rounds": rounds, "model_bytes": len(encode_tensors(coordinator.global_model)),
            "median_ms": statistics.median(times), "p90_ms": ordered[int(0.9 * (len(ordered) - 1))],
            "best_ms": ordered[0], "fsyncs": statistics.median(fsync_counts)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="california,mnist")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--dir", type=Path, help="where the state goes (default: a temporary directory)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    rows = []
    for task in args.tasks.split(","):
        with tempfile.TemporaryDirectory(prefix=f"overhead-{task}-", dir=args.dir) as tmp:
            rows.append(run_task(task, args.rounds, Path(tmp)))
    print(f"{'task':<12}{'model B':>10}{'rounds':>8}{'median ms':>11}{'p90 ms':>9}{'best ms':>9}{'fsyncs':>8}")
    for r in rows:
        print(f"{r['task']:<12}{r['model_bytes']:>10,}{r['rounds']:>8}{r['median_ms']:>11.1f}{r['p90_ms']:>9.1f}"
              f"{r['best_ms']:>9.1f}{r['fsyncs']:>8.0f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "python": platform.python_version(), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cpus": os.cpu_count(), "load_average": os.getloadavg(), "target_ms": TARGET_MS, "runs": rows,
    }, indent=2))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
