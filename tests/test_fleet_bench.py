"""bench/fleet.py, which the README's 1,000-device figures come from, still runs end to end on a
small fleet: the coordinator and the floor subscriber take every update, and the JSON has the
numbers the docs quote (the rate, the ceiling measured in the same run, their ratio)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("subscriber", ["coordinator", "floor-open"])
def test_the_fleet_benchmark_takes_every_update(tmp_path: Path, subscriber: str) -> None:
    out = tmp_path / "fleet.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "fleet.py"), "--sizes", "6", "--tasks", "california",
                           "--publishers", "2", "--subscriber", subscriber, "--out", str(out)],
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    (run,) = json.loads(out.read_text())["runs"]
    assert run["devices"] == 6 and run["lost"] == 0
    if subscriber == "coordinator":  # the ledger holds each update accepted, and the aggregate names all six
        assert run["accepted"] == 6 and run["rejected"] == 0 and run["participants"] == 6
    assert run["updates_per_s"] > 0 and run["ceiling_updates_per_s"] > 0
    assert run["ratio"] == pytest.approx(run["updates_per_s"] / run["ceiling_updates_per_s"])
    assert run["coordinator_cpu_s"] > 0 and run["broker_cpu_s"] >= 0
    assert f"california N=6 {subscriber}" in done.stdout
