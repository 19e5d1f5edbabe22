"""Receive-path cost of chunk reassembly: time and bytes allocated per message, before/after.

Feeds ``--messages`` messages of each size (MNIST update ~424 KB: 4 chunks at the default
max payload; California update 19.8 KB: one whole frame) through a Reassembler, as the MQTT
link does with paho's payloads, for this tree's federation/chunking.py and for the same file at
a baseline git revision (``--baseline``, default ``main``), alternating the two in one run.

Reported per message: median microseconds in ``feed`` (parse, buffer, SHA-256 check, join), and
the bytes allocated while feeding (the sum over its frames of tracemalloc's peak growth during
each ``feed`` call, measured in a separate pass): every copy of the data allocates a new buffer,
so this counts the bytes copied (a chunk held across calls counts once, when it is copied).

    python bench/reassembly.py [--messages 400] [--baseline main]
        -> table on stdout, bench/results/reassembly.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from federation import chunking  # noqa: E402
from federation.packet_limit import DEFAULT_MAX_PAYLOAD  # noqa: E402

SIZES = {"mnist_update": 424_000, "california_update": 19_800}


def baseline_module(rev: str, workdir: Path) -> ModuleType:
    """federation/chunking.py as of git revision ``rev``, imported under another name."""
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:federation/chunking.py"],
                            check=True, capture_output=True).stdout
    path = workdir / "chunking_baseline.py"
    path.write_bytes(source)
    spec = importlib.util.spec_from_file_location("chunking_baseline", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def workload(size: int, count: int) -> list[tuple[bytes, list[bytes]]]:
    """``count`` distinct messages and their frames at the default max payload."""
    out = []
    for _ in range(count):
        message = os.urandom(size)
        out.append((message, chunking.split(message, DEFAULT_MAX_PAYLOAD)))
    return out


def new_reassembler(module: ModuleType) -> Any:
    return module.Reassembler(1 << 30, 1 << 28, 600.0)


def time_per_message(module: ModuleType, work: list[tuple[bytes, list[bytes]]]) -> list[float]:
    r = new_reassembler(module)
    times = []
    for message, frames in work:
        start = time.perf_counter()
        for frame in frames:
            whole = r.feed("fleet/update/dev", frame)
        times.append(time.perf_counter() - start)
        assert whole == message
    return times


def allocated_per_message(module: ModuleType, work: list[tuple[bytes, list[bytes]]]) -> int:
    """Median over messages of the bytes newly allocated by all ``feed`` calls of one message."""
    r = new_reassembler(module)
    per_message = []
    tracemalloc.start()
    try:
        for message, frames in work:
            total = 0
            for frame in frames:
                tracemalloc.reset_peak()
                before = tracemalloc.get_traced_memory()[0]
                whole = r.feed("fleet/update/dev", frame)
                total += tracemalloc.get_traced_memory()[1] - before
            assert whole == message
            per_message.append(total)
            del whole
    finally:
        tracemalloc.stop()
    return int(statistics.median(per_message))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=400, help="messages of each size per pass")
    parser.add_argument("--passes", type=int, default=5, help="timing passes, alternating baseline and current")
    parser.add_argument("--baseline", default="main", help="git revision of federation/chunking.py to compare with")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "reassembly.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        variants = {"baseline": baseline_module(args.baseline, Path(tmp)), "current": chunking}
        rows: list[dict[str, Any]] = []
        for name, size in SIZES.items():
            work = workload(size, args.messages)
            chunks = len(work[0][1])
            times: dict[str, list[float]] = {v: [] for v in variants}
            for _ in range(args.passes):  # alternate, so drift on a shared machine hits both
                for variant, module in variants.items():
                    times[variant] += time_per_message(module, work)
            for variant, module in variants.items():
                us = 1e6 * statistics.median(times[variant])
                p90 = 1e6 * sorted(times[variant])[int(0.9 * len(times[variant]))]
                rows.append({
                    "message": name, "bytes": size, "frames": chunks, "variant": variant,
                    "median_us": round(us, 1), "p90_us": round(p90, 1),
                    "mb_per_s": round(size / us, 1),
                    "allocated_bytes": allocated_per_message(module, work[:50]),
                })

    print(f"reassembly, {args.messages} messages x {args.passes} passes each; baseline = {args.baseline}")
    print(f"{'message':<18} {'frames':>6} {'variant':<9} {'median us':>10} {'p90 us':>9} {'MB/s':>8} "
          f"{'allocated/msg':>14} {'x message':>9}")
    for row in rows:
        print(f"{row['message']:<18} {row['frames']:>6} {row['variant']:<9} {row['median_us']:>10.1f} "
              f"{row['p90_us']:>9.1f} {row['mb_per_s']:>8.0f} {row['allocated_bytes']:>14,} "
              f"{row['allocated_bytes'] / row['bytes']:>9.2f}")
    for name in SIZES:
        base, cur = (next(r for r in rows if r["message"] == name and r["variant"] == v)
                     for v in ("baseline", "current"))
        print(f"{name}: time x{cur['median_us'] / base['median_us']:.2f}, "
              f"allocated x{cur['allocated_bytes'] / max(1, base['allocated_bytes']):.2f} (current / baseline)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
        "baseline": args.baseline, "max_payload": DEFAULT_MAX_PAYLOAD, "messages": args.messages,
        "passes": args.passes, "rows": rows,
    }, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
