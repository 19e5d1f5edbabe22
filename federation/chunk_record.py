"""How many chunk topics each retained message of ours left on the broker, kept in a small file.

A retained message larger than the payload limit lives on ``<topic>/chunk/0..n-1`` plus a
manifest (federation/chunking.py). When a smaller one replaces it, the chunk topics past the new
count must be deleted. Within one process the publisher knows the previous count; after a
restart this file tells it, so the clean-up is exactly what was published. Without it, the only
safe bound is every chunk topic the largest message could use (256 MiB / payload limit: 45,000
deletes at 6,000 bytes, each a replicated write that stalled a NATS cluster for 30-40 s).

The count is written before a larger message is published and after a smaller one replaced it,
so the file never says less than the broker may hold (a crash in between only means a few
deletes of topics that hold nothing, which is harmless).

A state directory from before this record (or with the file lost) clears nothing extra: chunk
topics of an earlier, larger message may stay on the broker. Receivers ignore them (the manifest
names the current message); delete them by hand if the space matters.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from federation.durable import atomic_write

log = logging.getLogger(__name__)


class ChunkRecord:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.counts: dict[str, int] = {}
        try:
            data = json.loads(self.path.read_text())
            if isinstance(data, dict):
                self.counts = {str(t): int(n) for t, n in data.items() if isinstance(n, int) and n > 0}
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as exc:  # unreadable: at worst stale chunks stay (receivers skip them)
            log.warning("ignored %s (%s): chunk topics left by an earlier run are not cleared", self.path, exc)

    def get(self, topic: str) -> int:
        return self.counts.get(topic, 0)

    def set(self, topic: str, count: int) -> None:
        if self.counts.get(topic, 0) == count:
            return
        if count:
            self.counts[topic] = count
        else:
            self.counts.pop(topic, None)
        try:
            atomic_write(self.path, json.dumps(self.counts, sort_keys=True).encode())
        except OSError as exc:
            log.warning("cannot write %s (%s): a restart may leave stale chunk topics", self.path, exc)
