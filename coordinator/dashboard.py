"""The coordinator's live web dashboard: a static page that polls a JSON snapshot of the fleet.

Standard library only (http.server in a thread); the page is package data (static/), plain
HTML, CSS and JavaScript with an inline SVG chart, no framework. Read-only: GET and HEAD of
four paths. It listens on 127.0.0.1 by default; the page names devices and ledger hashes, so
anything wider belongs behind a reverse proxy with authentication (see docs/operations.md).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import socket
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any

from federation.config import ConfigError, setting

log = logging.getLogger(__name__)

STATIC = {
    "/": ("dashboard.html", "text/html; charset=utf-8"),
    "/dashboard.js": ("dashboard.js", "text/javascript; charset=utf-8"),
    "/dashboard.css": ("dashboard.css", "text/css; charset=utf-8"),
}
SNAPSHOT_PATH = "/api/fleet"
# The page loads nothing from elsewhere and runs no inline script.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


@dataclass
class DashboardConfig:
    dashboard_port: int = setting(0, "serve a live web dashboard at http://HOST:PORT/ (0: off)")
    dashboard_host: str = setting("127.0.0.1", "address the dashboard listens on (it shows device names and "
                                               "ledger hashes: keep it local or put it behind an authenticating "
                                               "proxy)")


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


def _host_name(header: str) -> str:
    """The host part of a Host header (``[::1]:8080`` -> ``::1``)."""
    if header.startswith("["):
        return header[1:].split("]", 1)[0]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class _IPv6Server(ThreadingHTTPServer):
    address_family = socket.AF_INET6


class DashboardServer:
    """Serves the page and ``snapshot()`` as JSON; ``requests`` counts what was served, by path."""

    def __init__(self, snapshot: Callable[[], dict[str, Any]], host: str = "127.0.0.1", port: int = 0) -> None:
        self.snapshot = snapshot
        self.requests: Counter[str] = Counter()
        self._files = {path: resources.files("coordinator").joinpath("static", name).read_bytes()
                       for path, (name, _) in STATIC.items()}
        loopback_only = _is_loopback(host)
        server = self

        class Handler(BaseHTTPRequestHandler):
            server_version = "fledger-dashboard"

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("dashboard %s: " + format, self.client_address[0], *args)

            def _send(self, status: int, body: bytes, content_type: str, head: bool) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                for name, value in SECURITY_HEADERS.items():
                    self.send_header(name, value)
                self.end_headers()
                if not head:
                    self.wfile.write(body)

            def _serve(self, head: bool) -> None:
                path = self.path.split("?", 1)[0]
                # Bound to loopback, answer only requests addressed to loopback: a web page the
                # operator visits cannot read the dashboard through a DNS name rebound to 127.0.0.1.
                if loopback_only and not _is_loopback(_host_name(self.headers.get("Host", ""))):
                    self._send(403, b"forbidden: use http://127.0.0.1 or http://localhost\n", "text/plain", head)
                    return
                if path == SNAPSHOT_PATH:
                    body = json.dumps(server.snapshot(), allow_nan=False).encode()
                    content_type = "application/json"
                elif path in STATIC:
                    body, content_type = server._files[path], STATIC[path][1]
                else:
                    self._send(404, b"not found\n", "text/plain", head)
                    return
                with server._lock:
                    server.requests[path] += 1
                self._send(200, body, content_type, head)

            def do_GET(self) -> None:
                self._serve(head=False)

            def do_HEAD(self) -> None:
                self._serve(head=True)

        self._lock = threading.Lock()
        server_class = _IPv6Server if ":" in host else ThreadingHTTPServer
        try:
            self._httpd = server_class((host, port), Handler)
        except OSError as exc:
            raise ConfigError(f"cannot serve the dashboard on {host}:{port}: {exc.strerror or exc}") from exc
        self._httpd.daemon_threads = True
        self.host = host
        self.port = int(self._httpd.server_address[1])
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="dashboard", daemon=True)

    def start(self) -> DashboardServer:
        self._thread.start()
        log.info("dashboard at http://%s:%d/", self.host if ":" not in self.host else f"[{self.host}]", self.port)
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)
