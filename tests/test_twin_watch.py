"""Another writer of the fleet's ledger, judged from one ledger/head message (no network, but
the last test: the start-up look's head, which the watch compares with, on the embedded broker).

The live half is tests/test_twin_coordinators.py (two coordinator processes, both brokers)."""

from __future__ import annotations

import logging
import shutil
import threading
import time
from pathlib import Path

import pytest
from conftest import BrokerInfo

from coordinator.state_check import StateRefused
from coordinator.state_guard import broker_head
from coordinator.twin_watch import (
    ANOTHER_WRITER,
    JUNK,
    OLD_CHAIN,
    OURS,
    RECLAIM_INTERVAL_S,
    RETAINED,
    TwinWatch,
    judge_head,
)
from federation import envelope
from federation.crypto import ed25519_public
from federation.fleet_state import FleetLedger
from federation.keys import CoordinatorKeys
from federation.mqtt import BrokerConfig, MqttLink
from federation.topics import Topics
from ledger import Ed25519Signer

SEED, OTHER_SEED = bytes(range(32)), bytes(range(1, 33))
KEY = ed25519_public(SEED)


def record(n: int) -> dict[str, object]:
    return {"type": "model.published", "round": n, "initial": n == 1, "model_sha256": bytes([n]) * 32}


def open_ledger(path: Path, seed: bytes = SEED) -> FleetLedger:
    return FleetLedger.open(path, signer=Ed25519Signer(seed), fleet="f")


@pytest.fixture
def ours(tmp_path: Path) -> FleetLedger:
    ledger = open_ledger(tmp_path / "ours.log")
    for n in (1, 2, 3):
        ledger.append(record(n))
    return ledger  # height 4: genesis and three records


def judge(ledger: FleetLedger, payload: bytes, *, retained: bool = False, start_height: int | None = None) -> str:
    return judge_head(payload, retained=retained, coordinator_key=KEY, height=ledger.height,
                      hash_at=lambda i: ledger.block(i).hash, start_height=start_height).verdict


def test_our_own_echo_and_older_heads_of_ours_are_ignored(ours: FleetLedger) -> None:
    assert judge(ours, ours.head.to_bytes()) == OURS
    assert all(judge(ours, ours.block(i).to_bytes()) == OURS for i in range(ours.height))


def test_echoes_arriving_after_more_appends_are_ours(tmp_path: Path) -> None:
    """Under load each commit group's head is published as it becomes durable and echoed back
    behind many later appends (and again after a reconnect): every one is still ours."""
    ledger = open_ledger(tmp_path / "busy.log")
    heads = []
    for group in range(50):
        with ledger.group_commit() as committed:
            for n in range(4):
                ledger.append(record(2 + group * 4 + n), sign=False)
        heads.append(committed[-1].to_bytes())
    assert [judge(ledger, head) for head in heads] == [OURS] * 50


def test_a_head_another_key_signed_is_junk(tmp_path: Path, ours: FleetLedger) -> None:
    stranger = open_ledger(tmp_path / "stranger.log", OTHER_SEED)
    for n in (1, 2, 3, 4, 5):
        stranger.append(record(n))
    assert judge(ours, stranger.head.to_bytes()) == JUNK  # beyond our height, but not our key
    assert judge(ours, b"not a block") == JUNK
    tampered = bytearray(ours.head.to_bytes())
    tampered[-1] ^= 1
    assert judge(ours, bytes(tampered)) == JUNK


def test_our_key_with_another_block_at_an_index_we_hold_is_another_writer(tmp_path: Path,
                                                                         ours: FleetLedger) -> None:
    shutil.copy(ours.path, tmp_path / "twin.log")  # a backup restored beside us: the same history so far
    twin = open_ledger(tmp_path / "twin.log")
    twin.append({"type": "model.published", "round": 9, "initial": False, "model_sha256": bytes(32)})
    ours.append(record(4))
    seen = judge_head(twin.head.to_bytes(), retained=False, coordinator_key=KEY, height=ours.height,
                      hash_at=lambda i: ours.block(i).hash)
    assert (seen.verdict, seen.index, seen.our_height) == (ANOTHER_WRITER, 4, 5)
    assert seen.their_hash == twin.head.hash and seen.our_hash == ours.head.hash != twin.head.hash


def test_our_key_beyond_our_height_is_another_writer(tmp_path: Path, ours: FleetLedger) -> None:
    shutil.copy(ours.path, tmp_path / "twin.log")
    twin = open_ledger(tmp_path / "twin.log")
    twin.append(record(4))
    seen = judge_head(twin.head.to_bytes(), retained=False, coordinator_key=KEY, height=ours.height,
                      hash_at=lambda i: ours.block(i).hash)
    assert (seen.verdict, seen.index, seen.our_hash, seen.our_height) == (ANOTHER_WRITER, 4, None, 4)


def test_a_retained_delivery_the_start_up_check_judged_is_not_acted_on(tmp_path: Path, ours: FleetLedger) -> None:
    """What the broker held when we (re)subscribed, no newer than what the start-up check saw
    there, was judged then and may be an old chain's head (after --new-chain): not acted on."""
    old_chain = open_ledger(tmp_path / "old-chain.log")
    for n in range(1, 9):
        old_chain.append(record(n))
    old_head = old_chain.head.to_bytes()
    assert judge(ours, old_head) == ANOTHER_WRITER  # live, it would be
    assert judge(ours, old_head, retained=True, start_height=old_chain.height) == RETAINED
    assert judge(ours, old_chain.block(5).to_bytes(), retained=True, start_height=old_chain.height) == RETAINED
    assert judge(ours, old_head, retained=True, start_height=None) == RETAINED  # the start saw nothing: unknown
    assert judge(ours, b"junk", retained=True) == RETAINED
    assert judge(ours, ours.head.to_bytes(), retained=True, start_height=2) == OURS


def test_a_retained_head_newer_than_the_start_saw_and_not_ours_is_another_writer(tmp_path: Path,
                                                                                 ours: FleetLedger) -> None:
    """Published since the start-up look, by someone else: the other writer's head we missed
    while disconnected (redelivered as retained on reconnect), or one published between that
    look and our subscription."""
    shutil.copy(ours.path, tmp_path / "twin.log")
    twin = open_ledger(tmp_path / "twin.log")
    twin.append(record(4))
    assert judge(ours, twin.head.to_bytes(), retained=True, start_height=ours.height) == ANOTHER_WRITER


def test_an_old_chains_head_replayed_live_is_not_another_writer(tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    """After --new-chain the old chain's heads (same key) still exist; on a broker without an ACL
    anyone can replay one live. Older than our genesis, nothing writing beside us made it: counted,
    warned about once, never a reason to stop. A twin that started its chain before ours is still
    caught at its first head past our genesis."""
    old_chain = open_ledger(tmp_path / "old-chain.log")
    for n in range(1, 9):
        old_chain.append(record(n))
    early_twin = open_ledger(tmp_path / "early-twin.log")  # its genesis, too, is older than ours
    time.sleep(0.01)
    ours = open_ledger(tmp_path / "ours.log")
    for n in (1, 2, 3):
        ours.append(record(n))
    early_twin.append(record(1))  # written while we run

    def judged(payload: bytes, genesis: float | None = ours.block(0).timestamp) -> str:
        return judge_head(payload, retained=False, coordinator_key=KEY, height=ours.height,
                          hash_at=lambda i: ours.block(i).hash, genesis_timestamp=genesis).verdict

    assert judged(old_chain.head.to_bytes()) == OLD_CHAIN
    assert all(judged(old_chain.block(i).to_bytes()) == OLD_CHAIN for i in range(old_chain.height))
    assert judged(old_chain.head.to_bytes(), genesis=None) == ANOTHER_WRITER  # what the age alone decides
    assert judged(early_twin.block(0).to_bytes()) == OLD_CHAIN
    assert judged(early_twin.head.to_bytes()) == ANOTHER_WRITER
    assert judged(ours.head.to_bytes()) == OURS

    counted: list[str] = []
    watch = TwinWatch("pumps", KEY, counted=counted.append)
    with caplog.at_level(logging.WARNING, logger="coordinator.twin_watch"):
        for _ in range(3):
            assert watch.check(old_chain.head.to_bytes(), retained=False, height=ours.height,
                               hash_at=lambda i: ours.block(i).hash,
                               genesis_timestamp=ours.block(0).timestamp) is None
    assert counted == [OLD_CHAIN] * 3
    assert len([r for r in caplog.records if "older than this chain's genesis" in r.getMessage()]) == 1


def test_the_watch_counts_warns_once_about_junk_and_says_what_to_do(tmp_path: Path, ours: FleetLedger,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    counted: list[str] = []
    watch = TwinWatch("pumps", KEY, counted=counted.append)

    def check(payload: bytes, retained: bool = False) -> str | None:
        return watch.check(payload, retained=retained, height=ours.height, hash_at=lambda i: ours.block(i).hash)

    with caplog.at_level(logging.WARNING, logger="coordinator.twin_watch"):
        assert check(b"junk") is None and check(b"more junk") is None
        assert check(ours.head.to_bytes()) is None and check(ours.head.to_bytes(), retained=True) is None
    assert len([r for r in caplog.records if "not signed by this coordinator's key" in r.getMessage()]) == 1
    shutil.copy(ours.path, tmp_path / "twin.log")
    twin = open_ledger(tmp_path / "twin.log")
    twin.append(record(4))
    line = check(twin.head.to_bytes())
    assert counted == [JUNK, JUNK, OURS, RETAINED, ANOTHER_WRITER]
    assert line is not None and "\n" not in line
    for words in ("another coordinator is writing the ledger of fleet pumps", "block 4", twin.head.hash.hex()[:16],
                  "our height 4", "stopping", "stop the other coordinator", "fledger ledger verify",
                  "fledger ledger restore"):
        assert words in line, line


def test_a_status_of_our_key_from_another_process_asks_for_our_retained_state_again() -> None:
    """A twin that stops republished its status (and model) on reconnecting: the survivor, seeing
    a status signed by its key with another session, republishes its own at once, at most once
    per RECLAIM_INTERVAL_S; its own echo, junk and other keys' statuses never trigger it."""
    keys, stranger = CoordinatorKeys.generate("f"), CoordinatorKeys.generate("f")
    watch = TwinWatch("f", keys.public.sign_public)

    def status(session: str, signer: CoordinatorKeys = keys) -> bytes:
        return envelope.seal_status(signer, {"state": "waiting", "time": time.time(), "session": session})

    for mine in (status("ours"), b"junk", status("twin", stranger)):
        assert watch.note_status(mine, session="ours") is None
    assert watch.note_status(status("earlier run"), session="ours", retained=True) is None  # held at subscription
    assert watch.reclaim_due(100.0) is None  # nothing overwrote ours
    assert watch.note_status(status("twin"), session="ours") == "twin"
    assert watch.reclaim_due(100.0) == "twin"  # at once
    assert watch.reclaim_due(100.1) is None  # done: nothing new
    watch.note_status(status("twin"), session="ours")  # the twin's last status, just after ours
    assert watch.reclaim_due(100.0 + RECLAIM_INTERVAL_S / 2) is None  # not yet: bounded rate
    assert watch.reclaim_due(100.0 + RECLAIM_INTERVAL_S) == "twin"  # but not forgotten
    assert watch.reclaim_due(200.0) is None


def test_the_start_up_look_sees_a_head_too_large_for_one_packet(embedded_broker: BrokerInfo, tmp_path: Path) -> None:
    """A head block over the broker's payload limit (an aggregate naming a large fleet) is retained
    as chunks: the start-up check must read it, and the twin watch compares with what it saw."""
    ledger = open_ledger(tmp_path / "big.log")
    ledger.append({"type": "model.published", "round": 1, "initial": True, "model_sha256": bytes(32),
                   "note": "x" * 5000})
    config = BrokerConfig(broker_host=embedded_broker.host, broker_port=embedded_broker.port, max_payload=1024)
    topics = Topics("f")
    publisher = MqttLink(config, "test-big-head", persistent=False)
    publisher.start(timeout=20)
    try:
        assert publisher.publish(topics.ledger_head, ledger.head.to_bytes(), retain=True, wait=10)
        head = broker_head(config, topics, "test-probe", KEY, 2.0, heartbeat=5.0)
    finally:
        publisher.stop()
    assert head is not None and head.height == ledger.height and head.hash == ledger.head.hash


def test_the_start_up_look_sees_a_live_status_too_large_for_one_packet(embedded_broker: BrokerInfo) -> None:
    """A running coordinator's signed status over the payload limit (the presence map of a large
    fleet) is retained and published as chunks: the start-up look must read it and refuse to start
    a second coordinator beside the live one."""
    keys = CoordinatorKeys.generate("f")
    config = BrokerConfig(broker_host=embedded_broker.host, broker_port=embedded_broker.port, max_payload=1024)
    topics = Topics("f")
    running = MqttLink(config, "test-live-coordinator", persistent=False)
    running.start(timeout=20)
    stop = threading.Event()

    def heartbeat() -> None:
        while not stop.is_set():
            status = envelope.seal_status(keys, {"state": "waiting", "time": time.time(), "heartbeat": 1.0,
                                                 "session": "s1", "devices": {f"d{i}": "x" * 40 for i in range(200)}})
            assert len(status) > 4 * 1024
            running.publish(topics.status, status, retain=True, wait=10)
            stop.wait(0.5)

    beating = threading.Thread(target=heartbeat, daemon=True)
    beating.start()
    try:
        time.sleep(1.0)  # the first status is retained
        with pytest.raises(StateRefused, match="another coordinator of fleet f is running"):
            broker_head(config, topics, "test-probe", keys.public.sign_public, 2.0, heartbeat=1.0)
    finally:
        stop.set()
        beating.join(timeout=10)
        running.stop()
