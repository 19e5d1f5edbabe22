"""Poisoning benchmark: every aggregation strategy against hostile members (in-process, no MQTT).

10 agents on IID MNIST shards, 2 of them hostile; 5 rounds of the project's own local training
(``edge_agent.training.train_local``) and aggregation strategies (``coordinator.aggregation``),
exactly as the coordinator runs them (the same strategy classes, fed the current global model).
Attacks, by the 2 hostile agents every round:

- ``scale10`` / ``scale1e6``: train honestly, send the weights times 10 / 1e6 (issue 13's attack);
- ``signflip``: train honestly, send the reflected update g - (w - g);
- ``labelflip``: train on labels 9 - y and send that honestly-shaped update;
- ``alie``: "A Little Is Enough" (Baruch et al. 2019), adaptive and omniscient: both send
  mean - z * std of the honest updates, per coordinate, with z from the fleet's size
  (n=10, f=2: z = 0.25), which stays inside the honest spread so distance checks pass it.

Each (strategy, attack) is compared with the same strategy's clean run (10 honest agents) of the
same seed (same shards, initial model and shuffling); with several ``--seeds`` the table gives
the mean ± sample sd over seeds, and targets are judged on the mean per-seed difference.
Targets: median and trimmed-mean within 0.5 pp of their clean run under scale10, scale1e6,
signflip and labelflip; the default clipped-fedavg never collapses.

    python bench/poisoning.py                          # every strategy, seeds 0 1 2 (hours on 2 cores)
    python bench/poisoning.py --limit 200 --rounds 2 --seeds 0   # smoke run
    # the published table: two processes, then --merge (see docs/robustness.md)

Writes bench/results/poisoning.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from coordinator.aggregation import DEFAULT_STRATEGY, STRATEGIES, StrategyParams, make_strategy  # noqa: E402
from edge_agent.training import TrainingDivergedError, evaluate, train_local  # noqa: E402
from federation.codec import TensorDict  # noqa: E402
from federation.tasks import LocalData, Task, central_test_set, get_task  # noqa: E402

ATTACKS = ("clean", "scale10", "scale1e6", "signflip", "labelflip", "alie")
TARGET_PP = 0.5  # percentage points from the strategy's clean run
TARGETED = {"median": ("scale10", "scale1e6", "signflip", "labelflip"),
            "trimmed-mean": ("scale10", "scale1e6", "signflip", "labelflip")}
COLLAPSE = 0.5  # accuracy below this counts as a collapse (chance is 0.1)


def as_numpy(model: torch.nn.Module) -> TensorDict:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def alie_z(n: int, f: int) -> float:
    """Baruch et al.'s z_max: enough supporters s = n/2 + 1 - f must lie beyond the mean."""
    supporters = n // 2 + 1 - f
    return statistics.NormalDist().inv_cdf((n - supporters) / n)


def train(model: torch.nn.Module, global_model: TensorDict, data: LocalData, task: Task, seed: int,
          labels: torch.Tensor | None = None) -> tuple[TensorDict, int] | None:
    model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in global_model.items()})
    hp = task.hyperparameters
    try:
        result = train_local(model, data.train_x, data.train_y if labels is None else labels, kind=task.kind,
                             epochs=hp.local_epochs, optimizer=hp.optimizer, lr=hp.lr, batch_size=hp.batch_size,
                             seed=seed)
    except TrainingDivergedError:
        return None  # what the agent does now: skip the round
    return as_numpy(model), result.num_samples


def run(task: Task, shards: list[LocalData], test: tuple[torch.Tensor, torch.Tensor], strategy_name: str,
        attack: str, hostile: int, rounds: int, seed: int) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = task.build_model()
    global_model = as_numpy(model)
    n = len(shards)
    bad = set(range(hostile)) if attack != "clean" else set()
    history: list[dict[str, Any]] = []
    decisions_per_round: list[dict[str, str]] = []
    with tempfile.TemporaryDirectory() as workdir:
        for round_number in range(1, rounds + 1):
            honest: list[tuple[int, TensorDict, int]] = []
            hostile_updates: list[tuple[int, TensorDict, int]] = []
            for i, data in enumerate(shards):
                labels = (9 - data.train_y) if i in bad and attack == "labelflip" else None
                trained = train(model, global_model, data, task, seed * 100_003 + round_number * 1000 + i, labels)
                if trained is None:
                    continue
                weights, samples = trained
                if i not in bad or attack == "labelflip":
                    (hostile_updates if i in bad else honest).append((i, weights, samples))
                elif attack in ("scale10", "scale1e6"):
                    factor = 10.0 if attack == "scale10" else 1e6
                    hostile_updates.append((i, {k: (v * factor).astype(v.dtype) for k, v in weights.items()}, samples))
                elif attack == "signflip":
                    hostile_updates.append((i, {k: (2 * global_model[k] - v).astype(v.dtype)
                                                for k, v in weights.items()}, samples))
            if attack == "alie":
                z = alie_z(n, hostile)
                names = list(global_model)
                stacked = {k: np.stack([w[k].astype(np.float64) for _, w, _ in honest]) for k in names}
                crafted = {k: (s.mean(0) - z * s.std(0)).astype(global_model[k].dtype) for k, s in stacked.items()}
                samples = int(np.median([s for _, _, s in honest]))
                hostile_updates = [(i, crafted, samples) for i in sorted(bad)]
            strategy = make_strategy(strategy_name, StrategyParams(), global_model=global_model, workdir=Path(workdir))
            for i, weights, samples in honest + hostile_updates:
                strategy.add(weights, samples, f"{'hostile' if i in bad else 'agent'}-{i}")
            try:
                global_model = strategy.result()
            except Exception as exc:  # a non-finite aggregate: the coordinator would halt here
                history.append({"round": round_number, "accuracy": None, "error": str(exc)})
                break
            decisions_per_round.append({c: d["action"] for c, d in strategy.decisions.items()})
            if round_number == rounds:  # evaluation does not change training: only the final model
                model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in global_model.items()})
                metrics = evaluate(model, test[0], test[1], task.kind)
                history.append({"round": round_number, "accuracy": metrics["accuracy"]})
    final = history[-1].get("accuracy") if history else None
    return {"strategy": strategy_name, "attack": attack, "accuracy": final, "history": history,
            "decisions": decisions_per_round}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", type=int, default=10)
    parser.add_argument("--hostile", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--limit", type=int, default=2000,
                        help="training images per agent, of the 6,000 in each of 10 shards (0: the whole shard)")
    parser.add_argument("--test-limit", type=int, default=10_000, help="images of the central test set used")
    parser.add_argument("--strategies", nargs="+", default=sorted(STRATEGIES), choices=sorted(STRATEGIES))
    parser.add_argument("--attacks", nargs="+", default=list(ATTACKS), choices=ATTACKS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="one run per seed (shards, initial model, shuffling); the table gives the mean and "
                             "spread over seeds and the targets are judged on the mean of per-seed differences")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "poisoning.json")
    parser.add_argument("--merge", type=Path, nargs="+", default=None, metavar="JSON",
                        help="no runs: merge the results of earlier runs (e.g. two processes, each given some "
                             "--strategies) into one table and --out")
    args = parser.parse_args(argv)
    if args.merge:
        reports = [json.loads(path.read_text()) for path in args.merge]
        merged = {**reports[0], "results": [r for report in reports for r in report["results"]],
                  "seconds": sum(report["seconds"] for report in reports), "merged_from": [str(p) for p in args.merge]}
        present = {r["strategy"] for r in merged["results"]}
        strategies = [s for s in sorted(STRATEGIES) if s in present]
        table, verdicts = summarise(merged["results"], strategies, list(ATTACKS))
        merged.update(table_markdown=table, verdicts=verdicts, summary=summary_rows(merged["results"], strategies,
                                                                                     list(ATTACKS)))
        merged["settings"]["strategies"] = sorted(present)
        merged["settings"]["seeds"] = sorted({r.get("seed", 0) for r in merged["results"]})
        print(table + "\n" + "\n".join(verdicts))
        args.out.write_text(json.dumps(merged, indent=2) + "\n")
        print(f"\nwrote {args.out}")
        return 0
    torch.set_num_threads(args.threads)
    task = get_task("mnist")
    test_x, test_y = central_test_set(task)
    test = (test_x[:args.test_limit], test_y[:args.test_limit])
    images = str(args.limit) if args.limit else "all shard"
    print(f"mnist: {args.agents} agents ({args.hostile} hostile), {images} training images each, "
          f"{args.rounds} rounds, {len(test[1])} test images, seeds {args.seeds}", flush=True)
    results: list[dict[str, Any]] = []
    started = time.perf_counter()
    for seed in args.seeds:
        shards = [task.load(i, args.agents, seed=seed, limit=args.limit or None) for i in range(args.agents)]
        for strategy_name in args.strategies:
            for attack in args.attacks:
                t0 = time.perf_counter()
                outcome = run(task, shards, test, strategy_name, attack, args.hostile, args.rounds, seed)
                outcome["seed"] = seed
                outcome["seconds"] = round(time.perf_counter() - t0, 1)
                results.append(outcome)
                acc = outcome["accuracy"]
                print(f"  seed {seed} {strategy_name:>14} {attack:>9}: "
                      f"{'halted' if acc is None else f'{100 * acc:6.2f} %'} ({outcome['seconds']:.0f}s)", flush=True)
                partial = args.out.with_name(args.out.name + ".partial")  # a killed run keeps what it measured
                partial.parent.mkdir(parents=True, exist_ok=True)
                partial.write_text(json.dumps({"settings": {k: str(v) for k, v in vars(args).items()},
                                               "results": results}, indent=1) + "\n")
    table, verdicts = summarise(results, args.strategies, args.attacks)
    print("\n" + table)
    for line in verdicts:
        print(line)
    report = {
        "benchmark": "poisoning: accuracy of each strategy under attack by 2 of 10 agents (MNIST, in-process)",
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "default_strategy": DEFAULT_STRATEGY, "strategy_params": StrategyParams().__dict__,
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "threads": args.threads},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(time.perf_counter() - started, 1),
        "table_markdown": table, "verdicts": verdicts,
        "summary": summary_rows(results, args.strategies, args.attacks), "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


def _mean_sd(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def _pm(values: list[float], signed: bool = False) -> str:
    mean, sd = _mean_sd(values)
    text = f"{mean:+.2f}" if signed else f"{mean:.2f}"
    return text if sd is None else f"{text} ±{sd:.2f}"


def summary_rows(results: list[dict[str, Any]], strategies: list[str], attacks: list[str]) -> list[dict[str, Any]]:
    """Per (strategy, attack): accuracy (%) per seed, and pp from the same strategy's clean run of the same seed.

    A difference is only taken between runs of the same seed (same shards, initial model and
    shuffling), so the spread over seeds is that of the attack's effect, not of the data.
    """
    accuracy = {(r["strategy"], r["attack"], r.get("seed", 0)): r["accuracy"] for r in results}
    rows = []
    for name in strategies:
        for attack in attacks:
            seeds = sorted(seed for (s, a, seed) in accuracy if (s, a) == (name, attack))
            if not seeds:
                continue
            per_seed = {seed: accuracy[(name, attack, seed)] for seed in seeds}
            finished = [100 * acc for acc in per_seed.values() if acc is not None]
            deltas = {seed: 100 * (acc - clean) for seed, acc in per_seed.items()
                      if acc is not None and (clean := accuracy.get((name, "clean", seed))) is not None}
            row: dict[str, Any] = {"strategy": name, "attack": attack, "seeds": seeds,
                                   "halted_seeds": [seed for seed, acc in per_seed.items() if acc is None],
                                   "accuracy_pct_per_seed": {seed: None if acc is None else round(100 * acc, 2)
                                                             for seed, acc in per_seed.items()}}
            if finished:
                mean, sd = _mean_sd(finished)
                row.update(accuracy_pct_mean=round(mean, 3), accuracy_pct_sd=None if sd is None else round(sd, 3))
            if attack != "clean" and deltas:
                mean, sd = _mean_sd(list(deltas.values()))
                row.update(delta_pp_per_seed={seed: round(d, 2) for seed, d in deltas.items()},
                           delta_pp_mean=round(mean, 3), delta_pp_sd=None if sd is None else round(sd, 3))
            rows.append(row)
    return rows


def summarise(results: list[dict[str, Any]], strategies: list[str], attacks: list[str]) -> tuple[str, list[str]]:
    """A markdown table and the target checks.

    Cells: mean accuracy (%) over seeds ± its sample standard deviation; in brackets the mean
    ± sd of the per-seed difference (pp) from the same strategy's clean run. Targets are judged
    on that mean difference; a run that halted in any seed fails its target.
    """
    rows = {(r["strategy"], r["attack"]): r for r in summary_rows(results, strategies, attacks)}
    lines = ["| strategy | seeds | " + " | ".join(attacks) + " |", "|---" * (len(attacks) + 2) + "|"]
    verdicts = []
    for name in strategies:
        seed_counts = sorted({len(row["seeds"]) for (s, _), row in rows.items() if s == name})
        cells = ["/".join(str(c) for c in seed_counts) or "0"]
        for attack in attacks:
            row = rows.get((name, attack))
            if row is None:
                cells.append("-")
                continue
            halted, seeds = row["halted_seeds"], row["seeds"]
            if len(halted) == len(seeds):
                cells.append("halted*")
                continue
            cell = _pm(list(row["accuracy_pct_per_seed"][s] for s in seeds if s not in halted))
            if "delta_pp_per_seed" in row:
                cell += f" ({_pm(list(row['delta_pp_per_seed'].values()), signed=True)})"
            if halted:
                cell += f", halted* in {len(halted)} of {len(seeds)} seeds"
            cells.append(cell)
        lines.append(f"| {name}{' (default)' if name == DEFAULT_STRATEGY else ''} | " + " | ".join(cells) + " |")
        for attack in TARGETED.get(name, ()):
            row = rows.get((name, attack))
            if row is None:
                continue
            if row["halted_seeds"] or "delta_pp_mean" not in row:
                verdicts.append(f"{name} under {attack}: halted in seeds {row['halted_seeds']}: FAIL")
                continue
            mean = row["delta_pp_mean"]
            per_seed = ", ".join(f"{d:+.2f}" for d in row["delta_pp_per_seed"].values())
            verdicts.append(f"{name} under {attack}: {mean:+.2f} pp, mean of {len(row['delta_pp_per_seed'])} "
                            f"seeds ({per_seed}) (target within {TARGET_PP} pp): "
                            f"{'PASS' if -mean <= TARGET_PP else 'FAIL'}")
        if name == DEFAULT_STRATEGY:
            worst = min((0.0 if acc is None else acc)
                        for attack in attacks if (name, attack) in rows
                        for acc in rows[(name, attack)]["accuracy_pct_per_seed"].values())
            verdicts.append(f"{name} worst accuracy in any run {worst:.2f} % (collapse below {100 * COLLAPSE:.0f} %): "
                            f"{'PASS' if worst >= 100 * COLLAPSE else 'FAIL'}")
    return "\n".join(lines), verdicts


if __name__ == "__main__":
    sys.exit(main())
