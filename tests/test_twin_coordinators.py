"""No silent fork while running: two coordinators with the same keys, two state directories
(real processes, on the embedded broker and on mosquitto).

A fleet runs with one coordinator, which must never take its own heads for another writer's.
Then its state directory is copied (a backup restored onto a second gateway), and both
coordinators run at once with their own client ids: each appends its own blocks (the record a
coordinator appends when it resumes after a finished run, or the devices' registrations and
updates, which both record). At least one must stop within seconds with exit code 5 and one
ERROR line, and must have appended (so published) nothing after it saw the other. Also when it
was cut off while the other appended, and saw the other's head only on reconnecting.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from conftest import BrokerInfo
from federation_run import Federation
from mqtt_proxy import MqttProxy
from test_reliability import StatusWatcher, finish, log_text, wait_for

from federation import exit_codes
from federation.fleet_state import FleetLedger, verify_file
from federation.keys import CoordinatorKeys
from federation.mqtt import BrokerConfig, MqttLink
from federation.topics import Topics
from fledger import keytool
from ledger import Ed25519Signer

ALARM = "another coordinator is writing the ledger of fleet"
DETECT_WITHIN_S = 60  # from the second one's start (its first block is the record it appends on resuming)


def alarm_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if ALARM in line]


def start_twin(fed: Federation, state: Path, port: int, *extra: str) -> subprocess.Popen[bytes]:
    """gateway-b: the fleet's coordinator on another state directory, straight to the broker on
    ``port``, with its own client id. It skips the broker look (--head-wait 0), as
    one does whose look ran just before the other's first status: the start-up check then sees
    nothing of the other, whichever of the two is faster (so the tests do not depend on that race)."""
    return fed._spawn("gateway-b", [*fed._cli(), "coordinator", "--broker-host", fed.host,
                                    "--broker-port", str(port), "--fleet", fed.fleet, "--task", fed.task,
                                    "--state-dir", str(state), "--keys", str(fed.keys / keytool.COORDINATOR_FILE),
                                    "--devices", str(fed.keys / keytool.REGISTRY_FILE), "--rounds", str(fed.rounds),
                                    "--min-clients", "2", "--head-wait", "0", "--client-id", "gateway-b", *extra])


def stopped_at_once(fed: Federation, name: str, state: Path, height: int) -> None:
    """``name`` exited 5 with one ERROR line saying what to do, and its ledger ends where it saw
    the other: not one block appended (so none published) afterwards."""
    text = log_text(fed, name)
    assert fed.procs[name].returncode == exit_codes.STATE, text
    lines = alarm_lines(text)
    assert len(lines) == 1 and " ERROR " in lines[0], text
    assert "fledger ledger verify" in lines[0] and "fledger ledger restore" in lines[0]
    found = re.search(r"\(our height (\d+)\)", lines[0])
    assert found is not None, lines[0]
    assert FleetLedger.open(state / "ledger.log").height == int(found.group(1)) > height, lines[0]
    assert verify_file(state / "ledger.log").ok


def test_two_coordinators_with_the_same_keys_stop_instead_of_forking(any_broker: BrokerInfo,
                                                                      tmp_path: Path) -> None:
    fed = Federation(tmp_path, any_broker.host, any_broker.port, rounds=3, limit=200,
                     extra_coordinator=["--head-wait", "2", "--client-id", "gateway-a"])
    # One coordinator, three rounds: its own heads echo back live all along, never an alarm.
    fed.start_all()
    finish(fed)
    first_run = log_text(fed, "coordinator")
    assert not alarm_lines(first_run), first_run
    height = FleetLedger.open(fed.state / "ledger.log").height

    # A backup of the state directory restored beside the running one: the same history so far.
    twin_state = tmp_path / "gateway-b"
    shutil.copytree(fed.state, twin_state, ignore=shutil.ignore_patterns("lock"))
    fed.rounds = 6
    fed.procs.clear()
    (fed.logs / "coordinator.log").write_text("")
    a = fed.start_coordinator()
    wait_for("gateway-a connected", lambda: "as gateway-a (" in log_text(fed, "coordinator"), 60, fed)
    started = time.monotonic()
    b = start_twin(fed, twin_state, any_broker.port)
    try:
        wait_for("gateway-b connected", lambda: "as gateway-b (" in log_text(fed, "gateway-b"), 60, fed)
        for i in range(len(fed.devices)):
            fed.start_agent(i)
        wait_for("a coordinator to stop", lambda: a.poll() is not None or b.poll() is not None,
                 DETECT_WITHIN_S, fed)
        detected_after = time.monotonic() - started  # includes gateway-b's ~1 s of start-up
        time.sleep(2)  # the other may stop too, if it saw the first one's head live
        coordinators = (("coordinator", a, fed.state), ("gateway-b", b, twin_state))
        stopped = [(name, state) for name, proc, state in coordinators if proc.poll() == exit_codes.STATE]
        assert stopped, fed.log_tail()
        for name, proc, _ in coordinators:  # the other: still running, or done alone (exit 0)
            assert proc.poll() in (None, exit_codes.STATE, 0), f"{name}: {proc.poll()}\n{fed.log_tail()}"
        for name, state in stopped:
            stopped_at_once(fed, name, state, height)
        # Restarted, a stopped one is refused: the survivor runs, or its head is a different history.
        name, state = stopped[0]
        again = subprocess.run([*fed._cli(), "coordinator", *fed.broker_args(), "--fleet", fed.fleet, "--task",
                                fed.task, "--state-dir", str(state), "--keys", str(fed.keys / keytool.COORDINATOR_FILE),
                                "--devices", str(fed.keys / keytool.REGISTRY_FILE), "--rounds", "6",
                                "--head-wait", "2", "--client-id", f"{name}-again"],
                               capture_output=True, text=True, timeout=120)
        assert again.returncode == exit_codes.STATE and "start refused" in again.stderr, again.stderr
        print(f"{any_broker.kind}: stopped {[name for name, _ in stopped]} {detected_after:.1f}s after gateway-b "
              "was started")
    finally:
        fed.stop()


# Every status, model and head goes as chunks, as a large fleet's status and model do: the watch
# and the survivor's republication must work on reassembled messages too.
SMALL_PACKETS = ("--max-payload", "512")


def test_a_coordinator_cut_off_while_the_other_wrote_stops_when_it_reconnects(embedded_broker: BrokerInfo,
                                                                               tmp_path: Path) -> None:
    """gateway-a hears nothing while gateway-b starts and appends (a proxy drops every message
    to it, as a faulty middlebox would): b's head reaches it only as the retained message its
    re-subscription brings (the embedded broker keeps no session in anonymous mode, so nothing
    is re-sent live). Newer than the head a's start-up check saw, and not a's: another writer."""
    proxy = MqttProxy(embedded_broker.host, embedded_broker.port)
    fed = Federation(tmp_path, proxy.host, proxy.port, rounds=1, limit=200,
                     extra_coordinator=["--head-wait", "2", "--client-id", "gateway-a", "--heartbeat", "1",
                                        "--keepalive", "2", "--mqtt-version", "3.1.1", *SMALL_PACKETS],
                     extra_agent=["--mqtt-version", "3.1.1"])  # the proxy reads MQTT 3.1.1 packets
    try:
        fed.start_all()
        finish(fed)
        height = FleetLedger.open(fed.state / "ledger.log").height
        twin_state = tmp_path / "gateway-b"
        shutil.copytree(fed.state, twin_state, ignore=shutil.ignore_patterns("lock"))
        fed.rounds = 2  # each resumes at round 2 and records that it opens it: its first block of its own
        fed.procs.clear()
        (fed.logs / "coordinator.log").write_text("")

        a = fed.start_coordinator()
        wait_for("gateway-a resumed", lambda: "resumed at round" in log_text(fed, "coordinator"), 60, fed)
        time.sleep(1)  # its start-up record and head reach the broker
        a_session = wait_for("gateway-a's status", lambda: retained_status(fed, embedded_broker).get("session"),
                             30, fed)
        assert proxy.stall() == 1  # gateway-a's connection: no message reaches it from now on
        b = start_twin(fed, twin_state, embedded_broker.port, "--heartbeat", "60",  # no status of its own soon
                       *SMALL_PACKETS)
        wait_for("gateway-b's first block", lambda: FleetLedger.open(twin_state / "ledger.log").height > height,
                 60, fed)
        wait_for("gateway-a to stop", lambda: a.poll() is not None, 60, fed)
        assert "not even our own echo" in log_text(fed, "coordinator")  # it reconnected, then saw b's head
        stopped_at_once(fed, "coordinator", fed.state, height)
        assert b.poll() is None  # b never heard a head of a's live: it goes on
        # On reconnecting, a republished its status before it saw b's head; b, seeing a status of
        # its key from another process, publishes its own again (at once, then at most every 5 s,
        # and once after a's last status; its next heartbeat is a minute away).
        wait_for("gateway-b to republish", lambda: f"(session {a_session}:" in log_text(fed, "gateway-b"), 10, fed)
        wait_for("the broker's status to be gateway-b's",
                 lambda: retained_status(fed, embedded_broker).get("session") not in (None, a_session), 15, fed)
    finally:
        fed.stop()
        proxy.close()


def retained_status(fed: Federation, broker: BrokerInfo) -> dict[str, Any]:
    """The coordinator's signed status the broker holds now, as a device that subscribes sees it."""
    watcher = StatusWatcher(fed, broker.host, broker.port)
    try:
        deadline = time.monotonic() + 3
        while not watcher.poll() and time.monotonic() < deadline:
            time.sleep(0.05)
        return watcher.poll()
    finally:
        watcher.stop()


def test_twins_resumed_mid_round_stop_at_the_first_record_both_take(any_broker: BrokerInfo, tmp_path: Path) -> None:
    """Resumed in the middle of a round, neither appends at start: the devices' registrations
    and updates, which both record, make the fork, and one stops at the first of them."""
    fed = Federation(tmp_path, any_broker.host, any_broker.port, rounds=2, limit=200,
                     extra_coordinator=["--head-wait", "2", "--client-id", "gateway-a"])
    try:
        fed.start_coordinator()  # a new chain: round 1 opens; stopped before any device comes
        wait_for("gateway-a ready", lambda: "initialised global model" in log_text(fed, "coordinator"), 60, fed)
        fed.procs["coordinator"].terminate()
        assert fed.wait("coordinator", 20) == 0
        height = FleetLedger.open(fed.state / "ledger.log").height
        twin_state = tmp_path / "gateway-b"
        shutil.copytree(fed.state, twin_state, ignore=shutil.ignore_patterns("lock"))
        fed.procs.clear()
        a = fed.start_coordinator()
        wait_for("gateway-a resumed", lambda: "resumed at round 1" in log_text(fed, "coordinator"), 60, fed)
        b = start_twin(fed, twin_state, any_broker.port)
        wait_for("gateway-b resumed", lambda: "resumed at round 1" in log_text(fed, "gateway-b"), 60, fed)
        time.sleep(1)
        assert [FleetLedger.open(s / "ledger.log").height for s in (fed.state, twin_state)] == [height, height]
        assert a.poll() is None and b.poll() is None  # nothing to tell them apart yet
        for i in range(len(fed.devices)):
            fed.start_agent(i)
        wait_for("a coordinator to stop", lambda: a.poll() is not None or b.poll() is not None, DETECT_WITHIN_S, fed)
        time.sleep(2)
        stopped = [(name, state) for name, proc, state in (("coordinator", a, fed.state), ("gateway-b", b, twin_state))
                   if proc.poll() == exit_codes.STATE]
        assert stopped, fed.log_tail()
        for name, state in stopped:
            stopped_at_once(fed, name, state, height)
    finally:
        fed.stop()


def test_an_old_chains_head_replayed_live_does_not_stop_the_coordinator(embedded_broker: BrokerInfo,
                                                                         tmp_path: Path) -> None:
    """The anonymous embedded broker lets anyone publish a ledger head. Genuine heads of an old
    chain of the same key (before --new-chain), replayed live all through a run, are counted and
    ignored: the coordinator finishes its rounds and never says another coordinator writes."""
    fed = Federation(tmp_path, embedded_broker.host, embedded_broker.port, rounds=2, limit=200)
    seed = CoordinatorKeys.load(fed.keys / keytool.COORDINATOR_FILE).sign_seed
    with FleetLedger.open(tmp_path / "old-chain.log", signer=Ed25519Signer(seed), fleet=fed.fleet) as old_chain:
        for n in range(1, 30):  # beyond any height this run reaches
            old_chain.append({"type": "operator.note", "n": n})
        old_heads = [old_chain.block(i).to_bytes() for i in (3, 12, old_chain.height - 1)]
    replayer = MqttLink(BrokerConfig(broker_host=embedded_broker.host, broker_port=embedded_broker.port),
                        "test-old-head-replayer")
    replayer.start(timeout=20)
    try:
        coordinator = fed.start_coordinator()
        wait_for("the coordinator's genesis", lambda: "initialised global model" in log_text(fed, "coordinator"),
                 60, fed)
        for i in range(len(fed.devices)):
            fed.start_agent(i)
        while coordinator.poll() is None:
            for head in old_heads:
                replayer.publish(Topics(fed.fleet).ledger_head, head, wait=10)
            time.sleep(0.2)
        finish(fed)
    finally:
        replayer.stop()
        fed.stop()
    text = log_text(fed, "coordinator")
    assert not alarm_lines(text), text
    assert "older than this chain's genesis" in text and "old_chain" in text, text
    assert verify_file(fed.state / "ledger.log").ok
