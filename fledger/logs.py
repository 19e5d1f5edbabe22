"""Log records as operators read them: ISO 8601 UTC timestamps, journald priorities, optional JSON.

Under systemd (``JOURNAL_STREAM`` names our stderr) each line starts with ``<N>``, the syslog
priority journald reads from a stream (sd-daemon(3)), so ``journalctl -p warning`` works.
``--log-format json`` writes one JSON object per line for log shippers.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

FORMATS = ("text", "json")

# sd-daemon(3): <3> error, <4> warning, <6> info, <7> debug; CRITICAL is <2>.
PRIORITIES = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7}


def priority(levelno: int) -> int:
    """The syslog priority of a logging level (levels between the named ones round down)."""
    for level in sorted(PRIORITIES, reverse=True):
        if levelno >= level:
            return PRIORITIES[level]
    return 7


def iso_time(created: float) -> str:
    return datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class FleetFormatter(logging.Formatter):
    """``2026-11-28T09:30:00.123Z INFO coordinator.daemon: text`` or one JSON object a line."""

    def __init__(self, fmt: str = "text", journald: bool = False) -> None:
        if fmt not in FORMATS:
            raise ValueError(f"log format must be one of {', '.join(FORMATS)}, got {fmt!r}")
        super().__init__()
        self.json = fmt == "json"
        self.journald = journald

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        error = self.formatException(record.exc_info) if record.exc_info else None
        if self.json:
            entry: dict[str, Any] = {"time": iso_time(record.created), "level": record.levelname,
                                     "logger": record.name, "message": message}
            if error:
                entry["exception"] = error
            text = json.dumps(entry, ensure_ascii=False)
        else:
            text = f"{iso_time(record.created)} {record.levelname} {record.name}: {message}"
            if error:
                text += "\n" + error
        if self.journald:
            # Every line of a traceback carries the priority, or journald files it as info.
            prefix = f"<{priority(record.levelno)}>"
            text = "\n".join(prefix + line for line in text.split("\n"))
        return text


def journald_stream(stream: TextIO, environ: dict[str, str] | None = None) -> bool:
    """True when ``stream`` is connected to the journal (``JOURNAL_STREAM`` is ``device:inode`` of it)."""
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    try:
        device, inode = (int(part) for part in value.split(":"))
        stat = os.fstat(stream.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (stat.st_dev, stat.st_ino) == (device, inode)


def setup(level: str, fmt: str = "text", stream: TextIO | None = None) -> None:
    stream = stream or sys.stderr
    handler = logging.StreamHandler(stream)
    handler.setFormatter(FleetFormatter(fmt, journald=journald_stream(stream)))
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), handlers=[handler])
    # amqtt and paho are chatty at INFO.
    for name in ("amqtt", "transitions", "asyncio"):
        logging.getLogger(name).setLevel(logging.WARNING)
