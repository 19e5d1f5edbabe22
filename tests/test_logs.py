"""Log lines: ISO 8601 UTC timestamps, journald priorities under systemd, JSON on request."""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from pathlib import Path

from fledger.logs import FleetFormatter, journald_stream


def record(level: int, message: str, exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("boom")
        except ValueError:
            exc_info = sys.exc_info()
    rec = logging.LogRecord("coordinator.daemon", level, __file__, 1, message, (), exc_info)
    rec.created = 1_795_000_000.25
    return rec


def test_text_lines_carry_an_iso_utc_timestamp() -> None:
    line = FleetFormatter("text").format(record(logging.INFO, "round 3 aggregated"))
    assert line == "2026-11-18T11:06:40.250Z INFO coordinator.daemon: round 3 aggregated"


def test_under_journald_every_line_carries_its_priority() -> None:
    formatter = FleetFormatter("text", journald=True)
    assert formatter.format(record(logging.WARNING, "w")).startswith("<4>2026-")
    assert formatter.format(record(logging.INFO, "i")).startswith("<6>")
    lines = formatter.format(record(logging.ERROR, "failed", exc=True)).splitlines()
    assert len(lines) > 2 and all(line.startswith("<3>") for line in lines)  # the traceback too


def test_json_lines_are_one_object_each() -> None:
    line = FleetFormatter("json").format(record(logging.ERROR, "bad \"update\"", exc=True))
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["time"] == "2026-11-18T11:06:40.250Z" and entry["level"] == "ERROR"
    assert entry["logger"] == "coordinator.daemon" and entry["message"] == 'bad "update"'
    assert "ValueError: boom" in entry["exception"]


def test_journal_stream_is_recognised_by_device_and_inode(tmp_path: Path) -> None:
    with open(tmp_path / "stream", "w") as stream:
        stat = os.fstat(stream.fileno())
        assert journald_stream(stream, {"JOURNAL_STREAM": f"{stat.st_dev}:{stat.st_ino}"})
        assert not journald_stream(stream, {"JOURNAL_STREAM": f"{stat.st_dev}:{stat.st_ino + 1}"})
        assert not journald_stream(stream, {})


def test_the_cli_writes_json_logs_when_asked(tmp_path: Path) -> None:
    import subprocess

    out = subprocess.run([sys.executable, "-m", "fledger.cli", "--log-format", "json", "ledger", "verify",
                          str(tmp_path / "missing.log")], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent)))
    assert out.returncode == 2
    entries = [json.loads(line) for line in out.stderr.splitlines() if line.startswith("{")]
    assert entries and entries[-1]["level"] == "ERROR" and re.match(r"\d{4}-\d\d-\d\dT", entries[-1]["time"])
