"""systemd's service notification protocol (sd_notify(3)), without a dependency.

Under ``Type=notify`` systemd passes ``NOTIFY_SOCKET``, a unix datagram socket; a service
sends newline-separated ``KEY=value`` states: ``READY=1`` once it serves, ``WATCHDOG=1`` at
least every ``WatchdogSec`` (``WATCHDOG_USEC`` in the environment), ``STOPPING=1`` on its way
out, ``STATUS=...`` as a line shown by ``systemctl status``. Outside systemd every call is a
no-op, so the daemons call it unconditionally.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Mapping

log = logging.getLogger(__name__)


def _address(environ: Mapping[str, str]) -> str | None:
    address = environ.get("NOTIFY_SOCKET")
    if not address:
        return None
    if address.startswith("@"):  # an abstract socket
        return "\0" + address[1:]
    return address


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds between watchdog pings: half of WatchdogSec, as sd_watchdog_enabled(3) advises;
    None when systemd expects none (or expects them from another process)."""
    environ = os.environ if environ is None else environ
    try:
        usec = int(environ.get("WATCHDOG_USEC", "0"))
        pid = int(environ.get("WATCHDOG_PID", str(os.getpid())))
    except ValueError:
        return None
    if usec <= 0 or pid != os.getpid():
        return None
    return usec / 2e6


class Notifier:
    """Sends states to systemd; rate-limits watchdog pings to the interval systemd asked for."""

    def __init__(self, environ: Mapping[str, str] | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        environ = os.environ if environ is None else environ
        self.address = _address(environ)
        self.interval = watchdog_interval(environ)
        self._clock = clock
        self._last_ping = float("-inf")
        self._failed = False

    def send(self, *states: str) -> bool:
        """Send ``states`` (e.g. "READY=1", "STATUS=round 3") in one datagram; False if not sent."""
        if self.address is None:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.setblocking(False)  # never hang the main loop on a reader that is behind
                sock.connect(self.address)
                sock.sendall("\n".join(states).encode())
        except OSError as exc:
            if not self._failed:  # once: a missing socket would otherwise log every ping
                log.warning("cannot notify systemd at %s: %s", self.address.lstrip("\0"), exc)
                self._failed = True
            return False
        return True

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        self.send(f"STATUS={status}")

    def alive(self) -> None:
        """Call from the main loop as often as convenient: pings the watchdog when it is due."""
        if self.interval is None:
            return
        now = self._clock()
        if now - self._last_ping >= self.interval:
            self._last_ping = now
            self.send("WATCHDOG=1")

    def stopping(self) -> None:
        self.send("STOPPING=1")
