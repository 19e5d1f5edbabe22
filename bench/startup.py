"""Start-up cost of the `fledger` command: CPU time and peak memory of short commands.

    python bench/startup.py [--runs 5]

Each command runs as its own process (``python -m fledger.cli ...``, what the installed
``fledger`` script does); CPU time (user + system) and peak RSS come from the kernel's
accounting of that child (os.wait4), so the load of other processes on the machine does not
count. Medians over --runs. Target (issue 18): under 0.5 s of CPU for ``--help``, every
command's ``--help`` and every command that does not train. Also shown for comparison:
``import torch`` alone. Prints a table and writes bench/results/startup.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "startup.json"
TARGET_CPU_S = 0.5


def measure(argv: list[str]) -> tuple[float, float, int]:
    """(CPU seconds, peak RSS in MB, exit code) of one run of ``argv``."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, proc.returncode


LEDGER_SCRIPT = """
import sys
from federation import records
from federation.fleet_state import FleetLedger
from ledger import Ed25519Signer
with FleetLedger.open(sys.argv[1], signer=Ed25519Signer(bytes(range(32))), fleet="bench") as ledger:
    ledger.append(records.device_key("pump-01", Ed25519Signer(bytes(32)).public_key))
    for r in range(1, 51):
        ledger.append(records.round_opened(r))
"""


def small_ledger(path: Path) -> None:
    """A device key (its point is checked on verify, as in a real fleet's ledger) and 50 rounds
    opened. Written by a child: this process stays small, since a child's peak RSS as the kernel
    reports it starts from its parent's size at fork."""
    subprocess.run([sys.executable, "-c", LEDGER_SCRIPT, str(path)], check=True,
                   env=dict(os.environ, PYTHONPATH=str(ROOT)))


def command_names() -> list[str]:
    """Every `fledger` command, asked of a child (this process stays small, see small_ledger)."""
    out = subprocess.run([sys.executable, "-c", "from fledger.cli import COMMANDS; print(*COMMANDS)"], check=True,
                         capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT))).stdout
    return out.split()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    fledger = [sys.executable, "-m", "fledger.cli"]
    with tempfile.TemporaryDirectory() as tmp:
        ledger_file = Path(tmp) / "ledger.log"
        small_ledger(ledger_file)
        cases: list[tuple[str, list[str], bool]] = [
            ("fledger --help", [*fledger, "--help"], True),
            ("fledger --version", [*fledger, "--version"], True),
            *((f"fledger {name} --help", [*fledger, name, "--help"], True) for name in command_names()),
            ("fledger ledger verify (52 blocks)", [*fledger, "ledger", "verify", str(ledger_file)], True),
            ("python -c 'import torch' (for comparison)", [sys.executable, "-c", "import torch"], False),
        ]
        rows: list[dict[str, Any]] = []
        for name, argv, targeted in cases:
            runs = [measure(argv) for _ in range(args.runs)]
            codes = {code for _, _, code in runs}
            cpu = statistics.median(r[0] for r in runs)
            rss = statistics.median(r[1] for r in runs)
            rows.append({"command": name, "cpu_s": round(cpu, 3), "peak_rss_mb": round(rss, 1),
                         "exit_codes": sorted(codes), "target_cpu_s": TARGET_CPU_S if targeted else None,
                         "meets_target": (cpu < TARGET_CPU_S) if targeted else None})
    print(f"{'command':<44} {'CPU s':>7} {'peak MB':>8}  target")
    for row in rows:
        verdict = "" if row["target_cpu_s"] is None else ("< 0.5 s ok" if row["meets_target"] else "MISSED")
        print(f"{row['command']:<44} {row['cpu_s']:>7.3f} {row['peak_rss_mb']:>8.1f}  {verdict}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"runs": args.runs, "python": platform.python_version(),
                                   "machine": platform.machine(), "cpus": os.cpu_count(), "results": rows},
                                  indent=2) + "\n")
    print(f"wrote {RESULTS}")
    return 0 if all(row["meets_target"] is not False for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
