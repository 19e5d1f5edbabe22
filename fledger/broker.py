"""The embedded MQTT broker (amqtt, pure Python): zero setup for a laptop or a test.

Production fleets use mosquitto or a clustered broker (see deploy/); fledger speaks plain
MQTT 3.1.1 (MQTT 5 where the broker offers it, which amqtt does not), so the roles do not
care which. With a password file (what `fledger keys init` makes) the embedded broker
enforces the same ACL as mosquitto (fledger/fledger.acl, through :class:`AclTopicPlugin`)
and hands out retained messages only to subscriptions that match them
(:class:`FledgerBroker`). Anonymous mode has no user names and so no roles: it is for tests
only. Payloads are encrypted and signed whatever the broker does.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from amqtt.broker import Broker
from amqtt.contexts import Action
from amqtt.plugins.base import BaseTopicPlugin
from amqtt.session import Session

from fledger.acl import READ, WRITE, Acl, default_acl_text, with_clients

log = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def broker_config(host: str, port: int, password_file: Path | None = None,
                  certfile: Path | None = None, keyfile: Path | None = None,
                  acl_file: Path | None = None, clients: tuple[str, ...] = ()) -> dict[str, Any]:
    """amqtt's configuration. With ``password_file``, the ACL (``acl_file`` or fledger's
    shipped one, plus the blocks of the prediction ``clients``) is enforced too: roles need
    user names."""
    listener: dict[str, Any] = {"type": "tcp", "bind": f"{host}:{port}"}
    if certfile:
        listener.update({"ssl": True, "certfile": str(certfile), "keyfile": str(keyfile)})
    plugins: dict[str, Any]
    if password_file:
        # FileAuthPlugin alone: adding AnonymousAuthPlugin(allow_anonymous=False) would let
        # any user name in (amqtt 0.12.1).
        plugins = {"amqtt.plugins.authentication.FileAuthPlugin": {"password_file": str(password_file)},
                   f"{__name__}.AclTopicPlugin": {"acl_file": str(acl_file or ""), "clients": ",".join(clients)}}
    else:
        plugins = {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}}
    return {"listeners": {"default": listener}, "plugins": plugins}


class AclTopicPlugin(BaseTopicPlugin):
    """amqtt topic filter enforcing a mosquitto ACL file (fledger/acl.py) like mosquitto 2.0:
    PUBLISH needs write access, every delivery (RECEIVE, and retained messages through
    :class:`FledgerBroker`) read access; a SUBSCRIBE is always granted, as mosquitto 2.0.11
    grants it, so a wildcard subscriber simply receives what it may read."""

    @dataclass
    class Config:
        acl_file: str = ""  # empty: fledger's shipped ACL
        clients: str = ""  # prediction clients, comma-separated: each gets its block (acl.client_acl_text)

    def __init__(self, context: Any) -> None:
        super().__init__(context)
        path = Path(self.config.acl_file) if self.config.acl_file else None
        text = path.read_text() if path is not None else default_acl_text()
        clients = [c for c in self.config.clients.split(",") if c]
        self.acl = Acl.parse(with_clients(text, clients), str(path or "fledger.acl"))

    async def topic_filtering(self, *, session: Session | None = None, topic: str | None = None,
                              action: Action | None = None) -> bool:
        if action == Action.SUBSCRIBE:
            return True
        if session is None or topic is None:
            return False
        access = WRITE if action == Action.PUBLISH else READ
        allowed = self.acl.allows(session.username, topic, access, session.client_id or "")
        if not allowed:
            log.info("ACL: %s (user %s) may not %s %s", session.client_id, session.username, access, topic)
        return allowed


class FledgerBroker(Broker):
    """amqtt's Broker with two holes closed (amqtt 0.12.1, private methods; checked by
    tests/test_broker_security.py so a changed amqtt fails loudly).

    1. On CONNECT amqtt sends the connecting client the retained messages matching EVERY
       client's subscriptions (it loops over the whole subscription table), and on any
       path without a READ check. Here a retained message goes only to a session that holds
       a matching subscription and may read the topic, as mosquitto does.
    2. A Last Will is broadcast and retained without the PUBLISH check a normal message
       gets; here it is checked (mosquitto refuses a will the ACL does not allow)."""

    async def _publish_retained_messages_for_subscription(self, subscription: tuple[str, int],
                                                          session: Session) -> None:
        topic_filter, qos = subscription
        holders = self._subscriptions.get(topic_filter, [])
        if not any(held.client_id == session.client_id for held, _ in holders):
            return  # another client's subscription, or a SUBSCRIBE that was refused
        handler = self._get_handler(session)
        if handler is None:
            return
        tasks = []
        for topic, retained in list(self._retained_messages.items()):
            if not self._matches(topic, topic_filter):
                continue
            if not await self._topic_filtering(session, topic=topic, action=Action.RECEIVE):
                continue
            tasks.append(asyncio.ensure_future(
                handler.mqtt_publish(retained.topic, retained.data, min(qos, retained.qos or qos), retain=True)))
        if tasks:
            await asyncio.wait(tasks)

    async def _broadcast_message(self, session: Session | None, topic: str | None, data: Any,
                                 force_qos: int | None = None) -> None:
        if session is not None and topic is not None and \
                not await self._topic_filtering(session, topic=topic, action=Action.PUBLISH):
            return  # a Last Will to a topic its client may not write
        await super()._broadcast_message(session, topic, data, force_qos)

    async def retain_message(self, source_session: Session | None, topic_name: str | None, data: Any,
                             qos: int | None = None) -> None:
        if source_session is not None and topic_name is not None and \
                not await self._topic_filtering(source_session, topic=topic_name, action=Action.PUBLISH):
            return
        await super().retain_message(source_session, topic_name, data, qos)


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
                 password_file: Path | None = None, acl_file: Path | None = None,
                 clients: tuple[str, ...] = ()) -> None:
        """Without ``password_file`` the broker is anonymous and open (tests only); with it,
        logins are checked and ``acl_file`` (default: fledger's shipped ACL) is enforced, with
        a block for each prediction client in ``clients`` (`fledger keys add-client`)."""
        if (acl_file is not None or clients) and password_file is None:
            raise ValueError("an ACL needs user names: give a password file too")
        self.clients = tuple(clients)
        self.host = host
        self.port = port or free_port(host)
        self.password_file = password_file
        self.acl_file = acl_file
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
            # Broker() must be built inside a running loop (amqtt 0.12.1).
            self._broker = FledgerBroker(broker_config(self.host, self.port, self.password_file,
                                                       acl_file=self.acl_file, clients=self.clients))
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
