"""The README's "A fleet by hand" block works when pasted into a shell, and the run ends by itself."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from federation.fleet_state import FleetLedger
from fledger.broker import free_port

ROOT = Path(__file__).resolve().parent.parent


def fleet_by_hand_block() -> str:
    """The first ```sh block under the README's "## A fleet by hand" heading, verbatim."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## A fleet by hand", 1)[1]
    match = re.search(r"```sh\n(.*?)```", section, re.S)
    assert match, "README: no sh block under 'A fleet by hand'"
    return match.group(1)


def fledger_on_path(bin_dir: Path) -> dict[str, str]:
    """An environment where `fledger` runs this checkout's code with the test's interpreter."""
    bin_dir.mkdir()
    shim = bin_dir / "fledger"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m fledger.cli "$@"\n')
    shim.chmod(0o755)
    env = dict(os.environ)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    env["PYTHONPATH"] = str(ROOT)
    return env


def session_processes(session: int, settle: float) -> list[str]:
    """Processes still in ``session`` after waiting up to ``settle`` s (`kill` does not wait for its target)."""
    deadline = time.monotonic() + settle
    while True:
        found = subprocess.run(["pgrep", "-s", str(session)], capture_output=True, text=True).stdout.split()
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def test_the_readme_fleet_runs_as_pasted_and_stops_after_its_rounds(tmp_path: Path) -> None:
    block = fleet_by_hand_block()
    workdir = tmp_path / "checkout"
    workdir.mkdir()
    shutil.copytree(ROOT / "examples", workdir / "examples")  # what a checkout has
    env = fledger_on_path(tmp_path / "bin")
    env["FLEDGER_BROKER_PORT"] = str(free_port())  # never a fixed port in a test; the block honours it
    log = tmp_path / "fleet.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(["bash", "-euo", "pipefail", "-c", block], cwd=workdir, env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        proc.wait(timeout=600)
    except subprocess.TimeoutExpired:
        raise AssertionError("the README's block did not finish in 600 s:\n"
                             + log.read_text(errors="replace")[-4000:]) from None
    finally:
        # Whatever the block left running (it should leave nothing; checked below) must not outlive the test.
        leftover = session_processes(proc.pid, settle=10.0)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    text = log.read_text(errors="replace")
    assert leftover == [], "the block left processes running (the broker?)"
    assert proc.returncode == 0, text[-4000:]
    assert "verified" in text or "OK" in text.upper(), text[-2000:]
    with FleetLedger.open(workdir / "state/coordinator/ledger.log") as ledger:
        rounds = [block.data["round"] for block in ledger if block.data.get("type") == "aggregate"]
    assert rounds == [1, 2, 3]  # --rounds 3: bounded, not run until stopped
    assert (workdir / "state/coordinator/models/global-000004.safetensors").exists()
