"""The embedded amqtt broker under concurrent connects and subscribes (real sockets, paho
clients): amqtt 0.12.1 iterates its subscription table across awaits, and without
fledger.broker's guard a client connecting while others subscribe loses its session."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from fledger.broker import EmbeddedBroker

RETAINED = 20


@pytest.fixture
def broker() -> Iterator[tuple[EmbeddedBroker, list[str]]]:
    broker = EmbeddedBroker().start()
    errors: list[str] = []
    assert broker._loop is not None

    def on_error(_loop: Any, context: dict[str, Any]) -> None:
        errors.append(repr(context.get("exception") or context.get("message")))

    broker._loop.call_soon_threadsafe(broker._loop.set_exception_handler, on_error)
    try:
        yield broker, errors
    finally:
        broker.stop()


def client(broker: EmbeddedBroker, client_id: str) -> mqtt.Client:
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id)
    c.connect(broker.host, broker.port)
    c.loop_start()
    return c


def test_clients_connecting_while_others_subscribe_keep_their_sessions(
        broker: tuple[EmbeddedBroker, list[str]]) -> None:
    embedded, errors = broker
    seed = client(embedded, "seed")
    for j in range(RETAINED):  # retained messages make the broker await while a client connects
        assert seed.publish(f"r/{j}", b"x" * 50_000, qos=1, retain=True).wait_for_publish(5) is None
    seed.disconnect()
    seed.loop_stop()

    stop = threading.Event()
    served: list[bool] = []  # one entry per churn client: did it get the retained message it asked for?

    def churn(worker: int) -> None:
        k = 0
        while not stop.is_set():
            got = threading.Event()
            c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"churn-{worker}-{k}")
            c.on_message = lambda _c, _u, m, got=got: got.set() if m.topic == "r/1" else None
            c.connect(embedded.host, embedded.port)
            c.loop_start()
            for j in range(6):  # new filters: each SUBSCRIBE grows the table during others' connects
                c.subscribe(f"r/{j}/#" if j % 2 else f"x/{worker}/{k}/{j}", qos=1)
            served.append(got.wait(10))
            c.disconnect()
            c.loop_stop()
            k += 1

    threads = [threading.Thread(target=churn, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    time.sleep(8)
    stop.set()
    for t in threads:
        t.join(30)
    broken = [e for e in errors if "changed size during iteration" in e]
    assert not broken, broken
    assert len(served) >= 20 and all(served), f"{served.count(False)} of {len(served)} clients got nothing"
