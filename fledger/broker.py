"""The embedded MQTT broker (amqtt, pure Python): zero setup for a laptop or a test.

Production fleets use mosquitto or a clustered broker (see deploy/); fledger speaks plain
MQTT 3.1.1 (MQTT 5 where the broker offers it, which amqtt does not), so the roles do not
care which. amqtt pitfalls we design around are listed in
docs/protocol.md (retained messages leak across subscriptions, so every payload is
encrypted and signed; anonymous mode drops persistent sessions, so use a password file).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def broker_config(host: str, port: int, password_file: Path | None = None,
                  certfile: Path | None = None, keyfile: Path | None = None) -> dict[str, Any]:
    listener: dict[str, Any] = {"type": "tcp", "bind": f"{host}:{port}"}
    if certfile:
        listener.update({"ssl": True, "certfile": str(certfile), "keyfile": str(keyfile)})
    plugins: dict[str, Any]
    if password_file:
        # FileAuthPlugin alone: adding AnonymousAuthPlugin(allow_anonymous=False) would let
        # any user name in (amqtt 0.12.1).
        plugins = {"amqtt.plugins.authentication.FileAuthPlugin": {"password_file": str(password_file)}}
    else:
        plugins = {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}}
    return {"listeners": {"default": listener}, "plugins": plugins}


def hash_password(password: str) -> str:
    """An argon2 hash in the form amqtt's FileAuthPlugin reads (``user:hash`` lines)."""
    from pwdlib import PasswordHash
    from pwdlib.hashers.argon2 import Argon2Hasher

    return PasswordHash((Argon2Hasher(),)).hash(password)


class _SnapshotIterDict(dict[str, Any]):
    """amqtt 0.12.1 iterates its subscription table across ``await``s (sending retained
    messages to a connecting client, broadcasting), so a SUBSCRIBE from another client in
    between raises "dictionary changed size during iteration": the connecting client's session
    dies (it reconnects; seen in the demo) or a broadcast is cut short. Iterating a snapshot is
    what the loops need; lookups and updates are unchanged."""

    def __iter__(self) -> Any:
        return iter(list(dict.keys(self)))

    def keys(self) -> Any:
        return list(dict.keys(self))

    def items(self) -> Any:
        return list(dict.items(self))


def _guard_subscription_table(broker: Any) -> None:
    table = getattr(broker, "_subscriptions", None)
    if type(table) is dict:  # amqtt's private table; left alone if a later amqtt changes it
        broker._subscriptions = _SnapshotIterDict(table)
    else:
        log.warning("amqtt's subscription table is not a dict (%s): the iteration guard is not applied",
                    type(table).__name__)


class _QuietMqtt5Probe(logging.Filter):
    """amqtt (3.1.1 only) warns twice each time it refuses an MQTT 5 CONNECT, which every
    fledger process sends once to learn whether the broker speaks MQTT 5 (federation.mqtt,
    offers_mqtt5). That refusal is expected: drop those two lines, keep every other one."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith("Invalid connection from"):
            return False  # always followed by the line with the reason, checked below
        return not (message.startswith("Failed to initialize client session: Invalid protocol")
                    and message.endswith(": 5"))


_PROBE_FILTER = _QuietMqtt5Probe()


class EmbeddedBroker:
    """amqtt running on its own event loop in a background thread."""

    def __init__(self, host: str = "127.0.0.1", port: int | None = None,
                 password_file: Path | None = None) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.password_file = password_file
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._broker: Any = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def start(self, timeout: float = 15.0) -> EmbeddedBroker:
        self._thread = threading.Thread(target=self._run, name="amqtt-broker", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError("embedded broker did not start in time")
        if self._error:
            raise RuntimeError(f"embedded broker failed to start: {self._error}") from self._error
        log.info("embedded MQTT broker listening on %s:%d", self.host, self.port)
        return self

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)

        async def boot() -> None:
            from amqtt.broker import Broker

            # Broker() must be built inside a running loop (amqtt 0.12.1).
            self._broker = Broker(broker_config(self.host, self.port, self.password_file))
            self._broker.logger.addFilter(_PROBE_FILTER)  # the same object: added once
            _guard_subscription_table(self._broker)
            await self._broker.start()

        try:
            loop.run_until_complete(boot())
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        loop.run_forever()

    def stop(self) -> None:
        if self._loop is None or self._broker is None:
            return
        future = asyncio.run_coroutine_threadsafe(self._broker.shutdown(), self._loop)
        try:
            future.result(timeout=10)
        except Exception as exc:
            log.warning("embedded broker shutdown: %s", exc)
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread:
            self._thread.join(timeout=10)

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
