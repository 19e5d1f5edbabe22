"""Synchronous rounds against asynchronous aggregation (FedBuff) with one slow device.

The real coordinator core (admission, the round or buffer policy, the strategy, the ledger,
envelopes v2 with deltas) and real local training (California housing MLP), on a simulated
clock: each device takes a fixed simulated time to train (three fast ones 1 s, one slow one
4 s), starts again from the newest model as soon as it is done and a newer model exists, and
its update arrives when its training ends. Three policies:

- ``sync-wait``: rounds of all 4 devices, no deadline: every round waits for the slow device;
- ``sync-deadline``: rounds close 1.5 s after opening with a quorum of 3: the slow device's
  every update arrives after its round closed (``stale_round``: wasted work);
- ``async``: FedBuff, ``--mode async --buffer 3 --max-staleness 8``: every 3 updates, stale
  ones weighted 1/sqrt(1+staleness); the slow device's work counts.

Reported: the central test MSE (standardised target) of the global model against simulated
wall time, updates used and wasted.

    python bench/async_vs_sync.py            # -> bench/results/async_vs_sync.json
"""

from __future__ import annotations

import argparse
import heapq
import json
import logging
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from coordinator.daemon import make_evaluator  # noqa: E402
from coordinator.rounds import RoundPolicy  # noqa: E402
from coordinator.service import Coordinator, CoordinatorSettings  # noqa: E402
from coordinator.storage import ModelStore, Spool  # noqa: E402
from edge_agent.training import train_local  # noqa: E402
from federation import crypto, deltas, envelope  # noqa: E402
from federation.fleet_state import FleetLedger, verify_file  # noqa: E402
from federation.keys import CoordinatorKeys, DeviceBundle, DeviceRegistry  # noqa: E402
from federation.model_init import initial_weights  # noqa: E402
from federation.tasks import get_task  # noqa: E402
from federation.topics import Topics  # noqa: E402
from ledger import Ed25519Signer  # noqa: E402

FLEET = "bench"
TOPICS = Topics(FLEET)
DATASET = bytes(32)
TRAIN_SECONDS = {"fast-1": 1.0, "fast-2": 1.0, "fast-3": 1.0, "slow": 4.0}

POLICIES: dict[str, dict[str, Any]] = {
    "sync-wait": {"policy": RoundPolicy(min_clients=4, quorum=4, deadline_s=0)},
    "sync-deadline": {"policy": RoundPolicy(min_clients=4, quorum=3, deadline_s=1.5)},
    "async": {"policy": RoundPolicy(min_clients=3, quorum=3, deadline_s=0), "mode": "async", "max_staleness": 8},
}


@dataclass
class Clock:
    now: float = 0.0

    def __call__(self) -> float:
        return self.now


def run(name: str, horizon: float, limit: int, workdir: Path) -> dict[str, Any]:
    task = get_task("california")
    hp = task.hyperparameters
    clock = Clock(time.time())  # near the real clock: registrations carry it
    start = clock.now
    keys = CoordinatorKeys.generate(FLEET)
    registry, bundles = DeviceRegistry(), {}
    for device in TRAIN_SECONDS:
        seed, public = crypto.ed25519_generate()
        registry.add(device, public)
        bundles[device] = DeviceBundle(FLEET, device, seed, keys.public, keys.model_key_id, keys.model_key)
    data = {device: task.load(i, len(TRAIN_SECONDS), limit=limit) for i, device in enumerate(TRAIN_SECONDS)}
    evaluator = make_evaluator("california")
    curve: list[dict[str, float]] = []

    def evaluate(model: dict[str, np.ndarray]) -> dict[str, float]:
        metrics = evaluator(model)
        curve.append({"t": round(clock.now - start, 3), "mse": metrics["mse"]})
        return metrics

    spec = POLICIES[name]
    settings = CoordinatorSettings(FLEET, spec["policy"], strategy="fedavg", mode=spec.get("mode", "rounds"),
                                   max_staleness=spec.get("max_staleness", 4), keep_models=0)
    ledger = FleetLedger.open(workdir / "ledger.log", signer=Ed25519Signer(keys.sign_seed), fleet=FLEET, now=clock)
    coordinator = Coordinator(settings, keys, registry, ledger, ModelStore(workdir / "models"),
                              Spool(workdir / "spool"), initial_model=lambda: initial_weights("california", 0, 0),
                              publish=lambda topic, payload, retain: None, topics=TOPICS, evaluate=evaluate,
                              now=clock)
    coordinator.start()
    for device, bundle in bundles.items():
        coordinator.handle_registration(TOPICS.register(device), envelope.seal_dataset(bundle, DATASET, 1, {}))
    curve.append({"t": 0.0, "mse": evaluator(coordinator.global_model)["mse"]})

    model = task.build_model()
    last_trained: dict[str, int] = {}
    busy: set[str] = set()
    events: list[tuple[float, str, bytes]] = []
    used: dict[str, int] = dict.fromkeys(TRAIN_SECONDS, 0)
    wasted: dict[str, int] = dict.fromkeys(TRAIN_SECONDS, 0)
    reasons: dict[str, int] = {}

    def start_idle() -> None:
        assert coordinator.round is not None
        version, base = coordinator.round.number, coordinator.global_model
        for device in TRAIN_SECONDS:
            if device in busy or last_trained.get(device, 0) >= version:
                continue  # training, or already trained this version: waits for the next model
            model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in base.items()})
            result = train_local(model, data[device], epochs=hp.local_epochs, optimizer=hp.optimizer, lr=hp.lr,
                                 batch_size=hp.batch_size, seed=version * 31 + len(last_trained))
            local = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
            payload = deltas.seal_trained(bundles[device], version, local, base, result.num_samples,
                                          {"train_loss": result.train_loss}, dataset_sha256=DATASET)
            last_trained[device] = version
            busy.add(device)
            heapq.heappush(events, (clock.now + TRAIN_SECONDS[device], device, payload))

    start_idle()
    while events and clock.now - start < horizon:
        arrival = events[0][0]
        policy_deadline = coordinator.round.policy.deadline_s if coordinator.round else 0
        opened = coordinator.round.opened_at if coordinator.round else arrival
        if policy_deadline and opened + policy_deadline < arrival and coordinator.round and \
                len(coordinator.round.accepted) >= coordinator.round.policy.quorum:
            clock.now = opened + policy_deadline  # the round's deadline passes before the next arrival
            coordinator.tick()
            start_idle()
            continue
        _, device, payload = heapq.heappop(events)
        clock.now = arrival
        busy.discard(device)
        outcome = coordinator.handle_update(TOPICS.update(device), payload)
        if outcome.accepted:
            used[device] += 1
        else:
            wasted[device] += 1
            reasons[outcome.reason] = reasons.get(outcome.reason, 0) + 1
        start_idle()
    ledger.close()
    report = verify_file(workdir / "ledger.log")
    final = curve[-1]["mse"]

    def time_to(target: float) -> float | None:
        return next((p["t"] for p in curve if p["mse"] <= target), None)

    return {"policy": name, "aggregations": len(curve) - 1, "final_mse": final, "curve": curve,
            "used": used, "wasted": wasted, "rejections": reasons, "ledger_verifies": report.ok,
            "time_to_mse_0.27": time_to(0.27), "time_to_mse_0.26": time_to(0.26)}


def _or_dash(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--horizon", type=float, default=40.0, help="simulated seconds per policy")
    parser.add_argument("--limit", type=int, default=2000, help="training samples per device")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "async_vs_sync.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.ERROR)  # the rejections of stale updates are the point, not news
    results = []
    began = time.perf_counter()
    for name in POLICIES:
        with tempfile.TemporaryDirectory() as tmp:
            results.append(run(name, args.horizon, args.limit, Path(tmp)))
    print(f"{'policy':<14} {'aggr.':>5} {'MSE@10s':>8} {'MSE@20s':>8} {'final MSE':>9} {'t<=0.27':>8} {'t<=0.26':>8} "
          f"{'used':>5} {'wasted':>6} {'slow used/wasted':>17}")
    for r in results:
        at = {s: [p["mse"] for p in r["curve"] if p["t"] <= s][-1] for s in (10, 20)}  # the model at that time
        print(f"{r['policy']:<14} {r['aggregations']:>5} {at[10]:>8.4f} {at[20]:>8.4f} {r['final_mse']:>9.4f} "
              f"{_or_dash(r['time_to_mse_0.27']):>8} {_or_dash(r['time_to_mse_0.26']):>8} "
              f"{sum(r['used'].values()):>5} {sum(r['wasted'].values()):>6} "
              f"{r['used']['slow']:>8}/{r['wasted']['slow']:<8}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"benchmark": "async_vs_sync", "horizon_s": args.horizon, "limit": args.limit,
                                    "train_seconds": TRAIN_SECONDS, "python": platform.python_version(),
                                    "torch": torch.__version__, "wall_seconds": round(time.perf_counter() - began, 1),
                                    "results": results}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
