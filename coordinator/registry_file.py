"""Notice changes to the device registry file (devices.json) while the coordinator runs.

`fledger keys add-device|rotate|revoke` rewrite the file atomically; the daemon polls it every
few seconds (and at once on SIGHUP) so a revoked key stops working without a restart.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from federation.keys import DeviceRegistry, KeyFileError

log = logging.getLogger(__name__)


class RegistryFile:
    """The registry file and the digest of the content last adopted."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._adopted = hashlib.sha256(self._read()).digest()  # what the coordinator started with
        self._refused: bytes | None = None  # digest of content already reported as unusable
        self._pending = self._adopted  # digest of what changed() returned last

    def _read(self) -> bytes:
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            return b""  # at start-up: no devices yet; later: refused below, never "no devices"

    def changed(self) -> DeviceRegistry | None:
        """The new registry if the file's content changed and parses; else None. The caller
        then says :meth:`adopted` or :meth:`refused`; until it does, the change is offered again.

        A file that cannot be read or parsed is logged once per distinct content and ignored:
        the registry in force stays in force."""
        try:
            raw = self._read()
        except OSError as exc:
            log.error("cannot read the device registry %s: %s; keeping the one in force", self.path, exc)
            return None
        digest = hashlib.sha256(raw).digest()
        if digest in (self._adopted, self._refused):
            return None
        try:
            if not raw:
                raise KeyFileError("the file is missing or empty")
            data = json.loads(raw)
            if not isinstance(data, dict):
                raise KeyFileError("not a JSON object")
            registry = DeviceRegistry.from_json(data)
        except (ValueError, KeyFileError) as exc:
            self._pending = digest
            self.refused(str(exc))
            return None
        self._pending = digest
        return registry

    def adopted(self) -> None:
        self._adopted = self._pending

    def refused(self, reason: str) -> None:
        """Log once and stop offering this content; the registry in force stays."""
        self._refused = self._pending
        log.error("device registry %s changed but is unusable (%s); keeping the one in force", self.path, reason)
