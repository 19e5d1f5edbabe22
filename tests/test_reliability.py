"""Faults injected into a real federation: coordinator, agents and brokers are real processes
(or the embedded amqtt broker in this process), faults are real signals and restarts.

1. the coordinator SIGKILLed at random moments over several rounds (amqtt with passwords, so
   persistent sessions survive): the ledger verifies, every update counts exactly once;
2. mosquitto restarted mid-round, with and without persistence: everyone reconnects, the
   coordinator republishes the retained model the broker lost, training completes;
3. an agent killed (Last Will: offline in the status), rounds close at the deadline with a
   quorum, a late update is stale_round, the agent rejoins and contributes again;
4. a model bigger than mosquitto's max_packet_size goes through in chunks, by default
   (unchunked: tests/test_packet_limit.py).

Measured results are in docs/reliability.md.
"""

from __future__ import annotations

import contextlib
import os
import queue
import random
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import Mosquitto
from federation_run import Federation

from federation import envelope, exit_codes
from federation.codec import encode_tensors
from federation.fleet_state import FleetLedger, verify_file
from federation.keys import CoordinatorKeys, DeviceBundle
from federation.mqtt import BrokerConfig, MqttLink
from federation.topics import Topics
from fledger import keytool
from fledger.broker import EmbeddedBroker
from ledger import LedgerError

# -- helpers ---------------------------------------------------------------------------------------

def wait_for(what: str, condition: Callable[[], Any], timeout: float, fed: Federation | None = None,
             poll: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{fed.log_tail() if fed else ''}")


def ledger_records(fed: Federation) -> list[dict[str, Any]]:
    path = fed.state / "ledger.log"
    try:
        return [b.data for b in FleetLedger.open(path)]  # read-only: a torn tail of a killed writer is skipped
    except (FileNotFoundError, LedgerError):
        return []  # not created yet, or no genesis block yet


def aggregates(fed: Federation) -> list[dict[str, Any]]:
    return [r for r in ledger_records(fed) if r["type"] == "aggregate"]


def log_text(fed: Federation, name: str) -> str:
    path = fed.logs / f"{name}.log"
    return path.read_text(errors="replace") if path.exists() else ""


def check_final_ledger(fed: Federation, rounds: int, participants: list[str] | None = None) -> list[dict[str, Any]]:
    """The chain verifies; rounds 1..N aggregated once each; no (device, round) accepted twice;
    each aggregate's participants are exactly that round's accepted updates."""
    report = verify_file(fed.state / "ledger.log")
    assert report.ok, report
    records = ledger_records(fed)
    aggs = [r for r in records if r["type"] == "aggregate"]
    assert [a["round"] for a in aggs] == list(range(1, rounds + 1))
    accepted = Counter((r["device"], r["round"]) for r in records if r["type"] == "update")
    assert all(n == 1 for n in accepted.values()), accepted
    for agg in aggs:
        in_round = sorted(d for d, r in accepted if r == agg["round"])
        assert agg["participants"] == in_round, (agg, in_round)
        if participants is not None:
            assert agg["participants"] == participants, agg
    return records


def finish(fed: Federation, timeout: float = 120) -> None:
    for name, limit in (("coordinator", timeout), *((device, 60.0) for device in fed.devices)):
        code = fed.wait(name, limit)
        assert code == 0, f"{name} exited with {code}\n{fed.log_tail()}"


class StatusWatcher:
    """Reads the coordinator's signed, retained status over MQTT, like an operator's dashboard."""

    def __init__(self, fed: Federation, host: str, port: int, **broker: Any) -> None:
        self.topics = Topics(fed.fleet)
        self.sign_public = CoordinatorKeys.load(fed.keys / keytool.COORDINATOR_FILE).public.sign_public
        self.link = MqttLink(BrokerConfig(broker_host=host, broker_port=port, **broker),
                             f"test-status-{os.getpid()}-{random.randrange(1 << 30)}",
                             subscriptions=[self.topics.status, self.topics.status_chunks])  # large: chunks
        self.link.start(timeout=20)
        self.latest: dict[str, Any] = {}

    def poll(self) -> dict[str, Any]:
        while not self.link.inbox.empty():
            message = self.link.inbox.get_nowait()
            if message.topic == self.topics.status:
                with contextlib.suppress(envelope.EnvelopeError):
                    self.latest = envelope.open_status(message.payload, self.sign_public)
        return self.latest

    def stop(self) -> None:
        self.link.stop()


# -- 1. coordinator crashes -------------------------------------------------------------------------

@pytest.fixture
def password_broker(tmp_path: Path) -> Iterator[tuple[EmbeddedBroker, dict[str, Path]]]:
    """amqtt with a password file: only then does it keep persistent sessions (brokers.md); it
    then enforces the ACL too, so each process logs in as its own user."""
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    password_file = secrets / "amqtt.passwd"
    files = {}
    for user in ("coordinator", "edge-1", "edge-2"):
        password = f"{user}-{random.randrange(1 << 60):x}"
        keytool.write_broker_password(password_file, user, password)
        files[user] = secrets / f"{user}.password"
        files[user].write_text(password + "\n")
    broker = EmbeddedBroker(password_file=password_file).start()
    try:
        yield broker, files
    finally:
        broker.stop()


def test_coordinator_sigkilled_at_random_moments(password_broker: tuple[EmbeddedBroker, dict[str, Path]],
                                                 tmp_path: Path) -> None:
    broker, passwords = password_broker
    rounds, kills_wanted = 40, 6  # a round takes milliseconds here: enough rounds to kill 6 times
    rng = random.Random(20261124)
    fed = Federation(tmp_path, broker.host, broker.port, rounds=rounds, limit=300, logins=passwords,
                     extra_coordinator=["--heartbeat", "1"])  # a restart waits <= 2 heartbeats for a live twin
    kills: list[dict[str, Any]] = []
    agents_frozen = False

    def freeze_agents(frozen: bool) -> None:
        nonlocal agents_frozen
        for device in fed.devices:
            fed.procs[device].send_signal(signal.SIGSTOP if frozen else signal.SIGCONT)
        agents_frozen = frozen

    try:
        fed.start_all()
        while len(kills) < kills_wanted:
            proc = fed.procs["coordinator"]
            text = log_text(fed, "coordinator")
            if len(kills) % 2 == 0:
                # Kill with the next round's model out and the agents not yet done with it, so they
                # train and publish while the coordinator is down. Agents train 300 samples in a few
                # milliseconds, faster than this test can react, so they are paused (SIGSTOP) from
                # the moment a round closes until the coordinator is dead.
                closed = text.count(" aggregated from ")
                wait_for("a round to close", lambda c=closed, p=proc: p.poll() is not None or log_text(
                    fed, "coordinator").count(" aggregated from ") > c, 90, fed, poll=0.01)
                freeze_agents(True)
                next_round = aggregates(fed)[-1]["round"] + 1  # appended before the log line
                wait_for(f"the model of round {next_round} to be published", lambda r=next_round, p=proc:
                         p.poll() is not None or any(b["type"] == "model.published" and b["round"] == r
                                                     for b in ledger_records(fed)), 30, fed, poll=0.01)
                time.sleep(1.0)  # recorded after the publish call: let the MQTT thread send it
            else:
                # A random moment after (re)connecting: restoring, waiting, accepting, aggregating.
                # Its own link's connection, not the start-up check's probe (a client id of its own).
                connected = f"as fledger-coordinator-{fed.fleet} ("
                connects = text.count(connected)
                wait_for("the coordinator to connect", lambda c=connects, p=proc, line=connected: p.poll() is not None
                         or log_text(fed, "coordinator").count(line) > c, 60, fed, poll=0.01)
                time.sleep(rng.uniform(0.0, 0.5))
            if proc.poll() is not None:
                break  # it finished all rounds before we got to kill it
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            killed_at = time.time()
            height = len(ledger_records(fed))
            if agents_frozen:
                freeze_agents(False)
            time.sleep(rng.uniform(1.0, 3.0))  # down: agents keep publishing and resending
            restarted_at = time.time()
            kills.append({"killed_at": killed_at, "restarted_at": restarted_at, "height": height})
            fed.start_coordinator()
        finish(fed, 180)
    finally:
        if agents_frozen:
            freeze_agents(False)  # a stopped process would not act on the SIGTERM of stop()
        fed.stop()
    records = check_final_ledger(fed, rounds, participants=list(fed.devices))
    aggs = [r for r in records if r["type"] == "aggregate"]
    assert all(a["num_samples"] == 300 * len(fed.devices) for a in aggs)  # every update counted once
    assert len(kills) >= 4, kills
    # Updates made while the coordinator was dead were accepted after its restart (the signed
    # statement carries the device's clock; same machine here).
    created = [_created(r) for r in records if r["type"] == "update"]
    during_outage = [c for c in created if any(k["killed_at"] <= c <= k["restarted_at"] for k in kills)]
    assert during_outage, (created, kills)
    print(f"\ncoordinator crash: {rounds} rounds, {len(kills)} SIGKILLs at heights "
          f"{[k['height'] for k in kills]}, {len(during_outage)} updates made during an outage, "
          f"{len(created)} accepted = {rounds} x {len(fed.devices)}, lost 0")


def _created(record: dict[str, Any]) -> float:
    import msgpack

    return float(msgpack.unpackb(record["statement"], raw=False)["created"])


# -- 2. broker restart ---------------------------------------------------------------------------------

@pytest.mark.parametrize("persistence", [True, False], ids=["persistent", "volatile"])
def test_broker_restart_mid_round(tmp_path: Path, persistence: bool) -> None:
    store = tmp_path / "mosquitto-db"
    store.mkdir()
    extra = f"persistence true\npersistence_location {store}/\n" if persistence else "persistence false\n"
    broker = Mosquitto(tmp_path / "mosquitto", extra).start()
    rounds = 5
    fed = Federation(tmp_path, broker.host, broker.port, rounds=rounds, limit=300)
    try:
        fed.start_all()
        wait_for("round 1 to close", lambda: log_text(fed, "coordinator").count(" aggregated from ") >= 1, 90, fed,
                 poll=0.02)
        # Rounds take ~100 ms here: pause the agents so the broker goes down mid-run, not after it.
        for device in fed.devices:
            fed.procs[device].send_signal(signal.SIGSTOP)
        broker.stop()  # mid-run: the agents' connections die under them
        time.sleep(2.0)
        # Hold the agents while the broker comes back, so no new model can be published and the
        # only model a newcomer can get is the retained one: kept by mosquitto (persistent) or
        # republished by the coordinator on reconnecting (volatile: the broker lost it).
        agents = [fed.procs[d] for d in fed.devices]
        for proc in agents:
            proc.send_signal(signal.SIGSTOP)
        try:
            connects = log_text(fed, "coordinator").count("connected to")
            broker = Mosquitto(tmp_path / "mosquitto", extra, port=broker.port).start()
            wait_for("the coordinator to reconnect",
                     lambda: log_text(fed, "coordinator").count("connected to") > connects, 60, fed)
            topics = Topics(fed.fleet)
            watcher = MqttLink(BrokerConfig(broker_host=broker.host, broker_port=broker.port), "test-newcomer",
                               subscriptions=[topics.model])
            watcher.start(timeout=20)
            bundle = DeviceBundle.load(keytool.bundle_path(fed.keys, "edge-1"))
            try:
                # The retained model first; if a round closed just as the broker went down, the
                # coordinator's queued publish of the next model follows it after reconnecting.
                # Either way the newcomer must end up with the open round's model.
                deadline = time.monotonic() + 30
                header = None
                while time.monotonic() < deadline:
                    open_round = max(a["round"] for a in aggregates(fed)) + 1
                    if header is not None and header.round == open_round:
                        break
                    with contextlib.suppress(queue.Empty):
                        message = watcher.inbox.get(timeout=1)
                        if message.topic == topics.model:
                            header, _ = envelope.open_model(message.payload, bundle, max_bytes=1 << 24)
            finally:
                watcher.stop()
        finally:
            for proc in agents:
                proc.send_signal(signal.SIGCONT)
        assert header is not None, "the newcomer got no model"
        assert header.round == open_round and not header.done
        finish(fed, 120)
    finally:
        fed.stop()
        broker.stop()
    check_final_ledger(fed, rounds, participants=list(fed.devices))
    for name in ("coordinator", *fed.devices):
        assert log_text(fed, name).count("connected to") >= 2, name  # each reconnected to the new broker
    print(f"\nbroker restart ({'persistent' if persistence else 'volatile'}): {rounds} rounds completed")


# -- 3. dropouts, stragglers, rejoin --------------------------------------------------------------------

def test_dropout_deadline_quorum_stale_update_and_rejoin(mosquitto_path: Mosquitto, tmp_path: Path) -> None:
    broker = mosquitto_path
    rounds = 30  # rounds with all three take milliseconds: enough to kill edge-3 before they run out
    fed = Federation(tmp_path, broker.host, broker.port, devices=("edge-1", "edge-2", "edge-3"), rounds=rounds,
                     limit=300, extra_coordinator=["--quorum", "2", "--round-deadline", "3"],
                     extra_agent=["--heartbeat", "1"])
    status = None
    try:
        fed.start_all()
        status = StatusWatcher(fed, broker.host, broker.port)
        # (The deadline runs from the round's opening, so round 1 may close with the two agents
        # that started first.)
        wait_for("a round with all three", lambda: [a for a in aggregates(fed) if len(a["participants"]) == 3],
                 90, fed)
        wait_for("edge-3 online", lambda: status.poll().get("presence", {}).get("edge-3") == "online", 20, fed)
        # Drop edge-3 hard: no DISCONNECT, so mosquitto publishes its Last Will.
        fed.procs["edge-3"].send_signal(signal.SIGKILL)
        fed.procs["edge-3"].wait()
        killed_at_round = max(a["round"] for a in aggregates(fed))
        wait_for("edge-3 offline in the status", lambda: status.poll().get("presence", {}).get("edge-3") == "offline",
                 20, fed)
        # Rounds go on with two, closed by the deadline.
        wait_for("two rounds without edge-3", lambda: len([a for a in aggregates(fed) if a["round"] > killed_at_round
                                                           and a["participants"] == ["edge-1", "edge-2"]]) >= 2,
                 60, fed)
        # A straggler's late update for a closed round (genuinely signed by edge-3) is stale.
        bundle = DeviceBundle.load(keytool.bundle_path(fed.keys, "edge-3"))
        late = envelope.seal_update(bundle, 1, encode_tensors({"w": np.zeros(2, np.float32)}), 300,
                                    {"train_loss": 1.0}, dataset_sha256=bytes(32), base_sha256=bytes(32))
        status.link.publish(Topics(fed.fleet).update("edge-3"), late, wait=5)
        wait_for("the late update rejected as stale_round",
                 lambda: status.poll().get("rejections", {}).get("stale_round", 0) >= 1, 20, fed)
        rejoin_after = max(a["round"] for a in aggregates(fed))
        fed.start_agent(2)  # same state directory: outbox, last trained round, data registration
        wait_for("edge-3 contributing again", lambda: [a for a in aggregates(fed) if a["round"] > rejoin_after
                                                      and "edge-3" in a["participants"]], 90, fed)
        wait_for("edge-3 online again", lambda: status.poll().get("presence", {}).get("edge-3") == "online", 20, fed)
        finish(fed, 120)
    finally:
        if status is not None:
            status.stop()
        fed.stop()
    records = check_final_ledger(fed, rounds)
    stale = [r for r in records if r["type"] == "update.rejected" and r["reason"] == "stale_round"]
    # Ours (edge-3, round 1), plus any natural straggler (an agent that started after round 1 closed).
    assert any(r["device"] == "edge-3" and r["round"] == 1 for r in stale), stale
    aggs = [r for r in records if r["type"] == "aggregate"]
    without = [a["round"] for a in aggs if a["participants"] == ["edge-1", "edge-2"]]
    rejoined = [a["round"] for a in aggs if a["round"] > rejoin_after and "edge-3" in a["participants"]]
    # An agent trains the round of the model it holds, so an accepted update for a round after
    # its restart means it took the then current global model.
    assert without and rejoined
    print(f"\ndropout: {rounds} rounds, without edge-3: {without}, edge-3 back in {rejoined}, "
          f"stale updates rejected: {[(r['device'], r['round']) for r in stale]}")


@pytest.fixture
def mosquitto_path(tmp_path: Path) -> Iterator[Mosquitto]:
    broker = Mosquitto(tmp_path / "mosquitto").start()
    try:
        yield broker
    finally:
        broker.stop()


# -- 4. payload limits -----------------------------------------------------------------------------------

LIMIT = 200_000


def test_model_larger_than_max_packet_size_goes_through_in_chunks(tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path / "mosquitto", f"max_packet_size {LIMIT}\n").start()
    # Every setting at its default: chunking is on (tests/test_packet_limit.py has the rest).
    fed = Federation(tmp_path, broker.host, broker.port, task="mnist", rounds=1, limit=300)
    try:
        fed.start_all()
        finish(fed, 150)
    finally:
        fed.stop()
        broker.stop()
    check_final_ledger(fed, 1, participants=list(fed.devices))
    model = (fed.state / "models" / "global-000002.safetensors").stat().st_size
    assert model > LIMIT  # the model really is bigger than one packet may be
    assert "oversize" not in (tmp_path / "mosquitto" / "mosquitto.log").read_text(errors="replace")


# -- 5. a silent agent on a broker that never fires its Will -------------------------------------------

def test_silent_agent_marked_offline_by_heartbeat_timeout(embedded_broker: Any, tmp_path: Path) -> None:
    """amqtt does not enforce keepalive, so a frozen agent's Last Will never fires; the
    coordinator's heartbeat timeout marks it offline, and its next heartbeat online again."""
    fed = Federation(tmp_path, embedded_broker.host, embedded_broker.port, rounds=0, limit=200,
                     extra_coordinator=["--presence-timeout", "3"], extra_agent=["--heartbeat", "1"])
    status = None
    try:
        fed.start_all()
        status = StatusWatcher(fed, embedded_broker.host, embedded_broker.port)
        wait_for("edge-1 online", lambda: status.poll().get("presence", {}).get("edge-1") == "online", 60, fed)
        fed.procs["edge-1"].send_signal(signal.SIGSTOP)  # frozen: no heartbeat, no DISCONNECT, no Will
        wait_for("edge-1 offline", lambda: status.poll().get("presence", {}).get("edge-1") == "offline", 20, fed)
        wait_for("edge-2 online", lambda: status.poll().get("presence", {}).get("edge-2") == "online", 20, fed)
        fed.procs["edge-1"].send_signal(signal.SIGCONT)
        wait_for("edge-1 online again", lambda: status.poll().get("presence", {}).get("edge-1") == "online", 20, fed)
    finally:
        if status is not None:
            status.stop()
        for proc in fed.procs.values():
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGCONT)
        fed.stop()
    assert "no heartbeat for 3s" in log_text(fed, "coordinator")


# -- 6. the disk fills up under a running coordinator -------------------------------------------------

def _small_disk() -> None:
    import resource

    # Every file the coordinator writes may grow to 48 KiB: past that, writes fail with EFBIG
    # (CPython ignores SIGXFSZ), as they would with ENOSPC on a full disk.
    resource.setrlimit(resource.RLIMIT_FSIZE, (48 * 1024, 48 * 1024))


def test_full_disk_halts_the_coordinator_without_acknowledging(embedded_broker: Any, tmp_path: Path) -> None:
    fed = Federation(tmp_path, embedded_broker.host, embedded_broker.port, rounds=40, limit=100,
                     extra_agent=["--resend-interval", "2"])
    fed.preexec["coordinator"] = _small_disk
    status = None
    try:
        fed.start_all()
        status = StatusWatcher(fed, embedded_broker.host, embedded_broker.port)
        code = fed.wait("coordinator", 180)
        final = wait_for("a halted status", lambda: status.poll().get("state") == "halted" and status.latest, 20,
                         fed)
    finally:
        if status is not None:
            status.stop()
        fed.stop()
    assert code == exit_codes.STATE, fed.log_tail()  # stopped with a clear error (5), not a crash
    log = log_text(fed, "coordinator")
    assert "no longer accepting" in log and "File too large" in log
    assert "cannot write the ledger" in final["halted"] and "File too large" in final["halted"]
    # What it did persist is a valid chain, and nothing it could not persist was acknowledged:
    # every device the status lists as accepted has its update in the ledger.
    report = verify_file(fed.state / "ledger.log")
    assert report.ok, report
    records = ledger_records(fed)
    open_round = final["round"]
    in_ledger = {r["device"] for r in records if r["type"] == "update" and r["round"] == open_round}
    assert set(final["accepted"]) <= in_ledger
    assert len([r for r in records if r["type"] == "aggregate"]) < 40
