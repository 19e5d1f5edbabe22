"""The agent's outbox: a sealed update stays on disk until the coordinator has it.

MQTT QoS 1 alone does not promise delivery across broker or client restarts, so the agent
keeps each update (already encrypted and signed) in a file until the coordinator's status
lists it as accepted or the round has closed, and resends it meanwhile. The coordinator
accepts each (device, round) once, so a resend is harmless.
"""

from __future__ import annotations

import re
from pathlib import Path

from federation.durable import atomic_write

_NAME = re.compile(r"^round-(\d{6,})\.update$")


class Outbox:
    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def _path(self, round_number: int) -> Path:
        return self.directory / f"round-{round_number:06d}.update"

    def put(self, round_number: int, payload: bytes) -> None:
        atomic_write(self._path(round_number), payload)

    def get(self, round_number: int) -> bytes | None:
        path = self._path(round_number)
        return path.read_bytes() if path.exists() else None

    def rounds(self) -> list[int]:
        found = []
        for entry in self.directory.iterdir():
            match = _NAME.match(entry.name)
            if match:
                found.append(int(match.group(1)))
        return sorted(found)

    def remove(self, round_number: int) -> None:
        self._path(round_number).unlink(missing_ok=True)

    def drop_before(self, round_number: int) -> list[int]:
        """Forget updates for rounds that have closed; return which."""
        dropped = [r for r in self.rounds() if r < round_number]
        for r in dropped:
            self.remove(r)
        return dropped
