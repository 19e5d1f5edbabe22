"""An outbox: a sealed message stays on disk until the coordinator it is for has it.

MQTT QoS 1 alone does not promise delivery across broker or client restarts, so the sender
keeps each update (already encrypted and signed) in a file until the coordinator's
acknowledgement lists it as accepted or the round has closed, and resends it meanwhile. The
coordinator accepts each (device, round) once and answers a byte-identical resend with the
first copy's verdict, so a resend is harmless. Used by both roles that send updates: the edge
agent (``edge_agent/agent.py``) and a gateway towards its upstream (``coordinator/upstream.py``),
which keeps beside each update the registration it names (``kind="register"``).
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

    def _path(self, round_number: int, kind: str = "update") -> Path:
        return self.directory / f"round-{round_number:06d}.{kind}"

    def put(self, round_number: int, payload: bytes, kind: str = "update") -> None:
        """Durable (fsynced, atomically replaced) before it returns: write before sending."""
        atomic_write(self._path(round_number, kind), payload)

    def get(self, round_number: int, kind: str = "update") -> bytes | None:
        path = self._path(round_number, kind)
        return path.read_bytes() if path.exists() else None

    def rounds(self) -> list[int]:
        """Rounds with an update in the outbox, oldest first."""
        found = []
        for entry in self.directory.iterdir():
            match = _NAME.match(entry.name)
            if match:
                found.append(int(match.group(1)))
        return sorted(found)

    def remove(self, round_number: int) -> None:
        """The round's update and whatever was kept beside it. The update goes last: a crash
        in between leaves a complete entry, never a companion without its update."""
        for extra in self.directory.glob(f"round-{round_number:06d}.*"):
            if extra.suffix != ".update":
                extra.unlink(missing_ok=True)
        self._path(round_number).unlink(missing_ok=True)

    def drop_before(self, round_number: int) -> list[int]:
        """Forget updates for rounds that have closed; return which."""
        dropped = [r for r in self.rounds() if r < round_number]
        for r in dropped:
            self.remove(r)
        return dropped
