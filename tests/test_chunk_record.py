"""A restarted publisher clears the chunk topics its earlier run left, and only those."""

from __future__ import annotations

import os
import queue
import time
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from federation.chunk_record import ChunkRecord
from federation.chunking import parse_frame
from federation.mqtt import BrokerConfig, MqttLink
from tests.conftest import BrokerInfo

TOPIC = "fledger/plant/model/global"


def watcher(broker: BrokerInfo, name: str) -> tuple[paho.Client, queue.Queue[tuple[str, bytes, bool]]]:
    got: queue.Queue[tuple[str, bytes, bool]] = queue.Queue()
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=name)
    client.on_message = lambda c, u, m: got.put((m.topic, bytes(m.payload), bool(m.retain)))
    client.connect(broker.host, broker.port)
    client.subscribe(f"{TOPIC}/#", qos=1)
    client.loop_start()
    time.sleep(0.3)
    return client, got


def until_manifest(got: queue.Queue[tuple[str, bytes, bool]]) -> list[tuple[str, bytes, bool]]:
    seen = []
    while True:
        item = got.get(timeout=10)
        seen.append(item)
        if item[0] == TOPIC:
            return seen


def test_a_restart_clears_exactly_the_chunk_topics_the_earlier_run_published(mosquitto_broker: BrokerInfo,
                                                                            tmp_path: Path) -> None:
    config = BrokerConfig(broker_host=mosquitto_broker.host, broker_port=mosquitto_broker.port, max_payload=1000,
                          mqtt_version="3.1.1", max_message_bytes=256 * 1024 * 1024)
    record_path = tmp_path / "retained_chunks.json"
    first = MqttLink(config, "first-run", chunk_record=ChunkRecord(record_path))
    first.start()
    assert first.publish(TOPIC, os.urandom(9_000), retain=True, wait=10)  # 10 chunks
    first.stop()
    assert ChunkRecord(record_path).get(TOPIC) == 10

    client, got = watcher(mosquitto_broker, "watch-restart")
    try:
        assert len(until_manifest(got)) == 11  # what the broker holds now: 10 chunks + manifest
        second = MqttLink(config, "second-run", chunk_record=ChunkRecord(record_path))
        second.start()
        assert second.publish(TOPIC, os.urandom(1_500), retain=True, wait=10)  # 2 chunks
        second.stop()
        live = until_manifest(got)
    finally:
        client.disconnect()
        client.loop_stop()
    deletes = [t for t, payload, _ in live if not payload]
    # Topics 2..9 cleared, not the 270,000 topics a 256 MiB message could use at this limit.
    assert deletes == [f"{TOPIC}/chunk/{i}" for i in range(2, 10)]
    assert ChunkRecord(record_path).get(TOPIC) == 2
    late, retained = watcher(mosquitto_broker, "watch-late")
    try:
        held = until_manifest(retained)
    finally:
        late.disconnect()
        late.loop_stop()
    assert sorted(t for t, _, _ in held) == sorted([TOPIC, f"{TOPIC}/chunk/0", f"{TOPIC}/chunk/1"])
    assert parse_frame(held[-1][1]).kind == "manifest"


def test_an_unreadable_record_clears_nothing_and_is_rewritten(tmp_path: Path) -> None:
    path = tmp_path / "retained_chunks.json"
    path.write_text("{torn")
    record = ChunkRecord(path)
    assert record.get(TOPIC) == 0
    record.set(TOPIC, 3)
    assert ChunkRecord(path).get(TOPIC) == 3
    record.set(TOPIC, 0)
    assert ChunkRecord(path).counts == {}
