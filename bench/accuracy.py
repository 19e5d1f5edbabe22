"""In-process FedAvg accuracy benchmark (no MQTT).

Each round, every agent starts from the global model, trains on its own IID shard with the
task's default hyper-parameters, and the global model becomes the average of the agents'
state dicts weighted by their sample counts. The global model is evaluated on the task's
central held-out test set after every round.

    python bench/accuracy.py                      # california 10 rounds + mnist 3 rounds
    python bench/accuracy.py --tasks california --california-rounds 3

Targets: mnist accuracy >= 98.5% within 3 rounds; california test MSE (standardised
target) <= 0.30. Results go to bench/results/accuracy.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from edge_agent.training import evaluate, train_local  # noqa: E402
from federation.tasks import LocalData, Task, central_test_set, get_task  # noqa: E402

TARGETS: dict[str, tuple[str, str, float]] = {
    # task: (metric, direction, threshold)
    "mnist": ("accuracy", ">=", 0.985),
    "california": ("mse", "<=", 0.30),
}


def weighted_average(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[int]) -> dict[str, torch.Tensor]:
    """FedAvg: average of state dicts weighted by sample count (non-float buffers taken from the first)."""
    total = float(sum(weights))
    result: dict[str, torch.Tensor] = {}
    for key, first in states[0].items():
        if first.is_floating_point():
            acc = torch.zeros_like(first, dtype=torch.float64)
            for state, weight in zip(states, weights, strict=True):
                acc += state[key].to(torch.float64) * (weight / total)
            result[key] = acc.to(first.dtype)
        else:
            result[key] = first.clone()
    return result


def metric_of(task: Task, metrics: Mapping[str, float]) -> float:
    return metrics[TARGETS[task.name][0]]


def run_fedavg(task: Task, rounds: int, agents: int, seed: int, limit: int | None) -> dict[str, Any]:
    shards: list[LocalData] = [task.load(i, agents, seed=seed, limit=limit) for i in range(agents)]
    test_x, test_y = central_test_set(task)
    torch.manual_seed(seed)
    global_model = task.build_model()
    local_model = task.build_model()
    hp = task.hyperparameters
    history: list[dict[str, Any]] = []
    initial = evaluate(global_model, test_x, test_y, task.kind)
    history.append({"round": 0, **initial, "seconds": 0.0, "train_loss": None})
    print(f"\n{task.name}: {agents} IID agents, {rounds} rounds, {hp.optimizer} lr {hp.lr}, batch {hp.batch_size}, "
          f"{hp.local_epochs} local epoch(s), {sum(len(s.train_y) for s in shards)} train / {len(test_y)} test samples")
    metric = TARGETS[task.name][0]
    print(f"{'round':>5}  {'test ' + metric:>13}  {'train loss':>10}  {'seconds':>7}")
    print(f"{0:>5}  {metric_of(task, initial):>13.4f}  {'-':>10}  {0.0:>7.1f}")
    for round_number in range(1, rounds + 1):
        start = time.perf_counter()
        states: list[dict[str, torch.Tensor]] = []
        counts: list[int] = []
        losses: list[float] = []
        for index, data in enumerate(shards):
            local_model.load_state_dict(global_model.state_dict())
            result = train_local(local_model, data, epochs=hp.local_epochs, optimizer=hp.optimizer, lr=hp.lr,
                                 batch_size=hp.batch_size, seed=seed * 100_003 + round_number * 1000 + index)
            states.append({k: v.detach().clone() for k, v in local_model.state_dict().items()})
            counts.append(result.num_samples)
            losses.append(result.train_loss)
        global_model.load_state_dict(weighted_average(states, counts))
        metrics = evaluate(global_model, test_x, test_y, task.kind)
        seconds = time.perf_counter() - start
        train_loss = sum(loss * n for loss, n in zip(losses, counts, strict=True)) / sum(counts)
        history.append({"round": round_number, **metrics, "seconds": round(seconds, 2), "train_loss": train_loss})
        print(f"{round_number:>5}  {metric_of(task, metrics):>13.4f}  {train_loss:>10.4f}  {seconds:>7.1f}", flush=True)
    metric, direction, threshold = TARGETS[task.name]
    final = history[-1][metric]
    passed = final >= threshold if direction == ">=" else final <= threshold
    verdict = "PASS" if passed else "FAIL"
    print(f"{task.name}: final test {metric} {final:.4f} (target {direction} {threshold}): {verdict}")
    return {
        "task": task.name, "kind": task.kind, "agents": agents, "rounds": rounds, "seed": seed, "limit": limit,
        "hyperparameters": dataclasses.asdict(hp),
        "num_parameters": task.num_parameters(),
        "train_samples": [len(s.train_y) for s in shards], "test_samples": len(test_y),
        "target": {"metric": metric, "direction": direction, "threshold": threshold, "passed": passed},
        "history": history,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="In-process FedAvg accuracy benchmark (no MQTT) on real data.")
    parser.add_argument("--tasks", nargs="+", choices=sorted(TARGETS), default=["california", "mnist"])
    parser.add_argument("--california-rounds", type=int, default=10,
                        help="FedAvg rounds for california (the table shows every round, e.g. 3 and 10)")
    parser.add_argument("--mnist-rounds", type=int, default=3, help="FedAvg rounds for mnist")
    parser.add_argument("--agents", type=int, default=2, help="number of IID agents")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, default=0, help="cap samples per agent (0: whole shard; for smoke runs)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "accuracy.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rounds = {"california": args.california_rounds, "mnist": args.mnist_rounds}
    results = [run_fedavg(get_task(name), rounds[name], args.agents, args.seed, args.limit or None)
               for name in args.tasks]
    report = {
        "benchmark": "in-process FedAvg (no MQTT), weighted by sample count, central held-out test set",
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "threads": args.threads,
                    "platform": platform.platform()},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0 if all(r["target"]["passed"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
