"""What both roles share for being watched: the metrics settings and the Prometheus endpoint.

prometheus_client is an optional extra (``pip install 'fledger[metrics]'``): nothing in the
core needs it, and it is imported only when a metrics port is set. Asked for and missing, the
daemon refuses to start with a one-line error rather than run unobserved without saying so.
"""

from __future__ import annotations

import importlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from federation.config import ConfigError, setting

log = logging.getLogger(__name__)

# Seconds, from a millisecond-fast rejection to a large update waiting behind a round's close.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Seconds of local training: a tiny model on a fast core to a CNN epoch on a Raspberry Pi.
TRAINING_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)


@dataclass
class MetricsConfig:
    metrics_port: int = setting(0, "serve Prometheus metrics at http://HOST:PORT/metrics (0: off; needs "
                                   "prometheus_client: pip install 'fledger[metrics]')")
    metrics_host: str = setting("127.0.0.1", "address the metrics endpoint listens on (0.0.0.0: every interface)")


def prometheus() -> ModuleType:
    """The prometheus_client module, or a ConfigError saying how to install it."""
    try:
        return importlib.import_module("prometheus_client")
    except ImportError:
        raise ConfigError("metrics need prometheus_client, which is not installed: pip install 'fledger[metrics]' "
                          "(or run with --metrics-port 0)") from None


def new_registry() -> Any:
    """A registry of our own (not the process-global one, so several roles can share a
    process in tests) with the usual process metrics: CPU, memory, open files."""
    client = prometheus()
    registry = client.CollectorRegistry()
    client.ProcessCollector(registry=registry)
    client.PlatformCollector(registry=registry)
    client.GCCollector(registry=registry)
    return registry


def serve_metrics(registry: Any, host: str, port: int) -> Callable[[], None]:
    """Serve ``registry`` at /metrics on host:port in a thread; returns the function that stops it."""
    client = prometheus()
    try:
        server, thread = client.start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise ConfigError(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}") from exc
    log.info("Prometheus metrics at http://%s:%d/metrics", host, server.server_address[1])

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

    return stop


class Endpoints:
    """HTTP endpoints a daemon runs beside its work; stopped together, in reverse order."""

    def __init__(self) -> None:
        self._stops: list[Callable[[], None]] = []
        self._lock = threading.Lock()

    def add(self, stop: Callable[[], None]) -> None:
        with self._lock:
            self._stops.append(stop)

    def stop(self) -> None:
        with self._lock:
            stops, self._stops = self._stops[::-1], []
        for stop in stops:
            try:
                stop()
            except Exception:  # shutting down: report, never mask the daemon's own exit
                log.exception("stopping an HTTP endpoint failed")
