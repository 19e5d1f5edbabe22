"""Paid predictions end to end on real processes: broker, coordinator, owner and client commands,
concurrent clients, a SIGKILL of the coordinator and balances recomputed from the ledger."""

from __future__ import annotations

import json
import queue
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import msgpack

from federation import credits
from federation.exit_codes import TIMEOUT, USAGE
from federation.fleet_state import FleetLedger, verify_file
from fledger import keytool
from fledger.credits_cli import RESEND_S
from tests.conftest import BrokerInfo
from tests.federation_run import Federation

ROWS = """MedInc,HouseAge,AveRooms,AveBedrms,Population,AveOccup,Latitude,Longitude
8.3252,41.0,6.98,1.02,322.0,2.56,37.88,-122.23
2.1,30.0,4.5,1.1,1500.0,3.1,34.05,-118.25
"""


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "fledger.cli", "--log-level", "WARNING", *args]


def _wait_for_log(fed: Federation, text: str, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    path = fed.logs / "coordinator.log"
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text(errors="replace"):
            return
        time.sleep(0.2)
    raise AssertionError(f"coordinator never logged {text!r}\n{fed.log_tail()}")


def _start(fed: Federation, connects: int) -> None:
    fed.start_coordinator()
    deadline = time.monotonic() + 90
    # the coordinator's own link, not its short start-up probe of the retained head ("-probe")
    mark = f"as fledger-coordinator-{fed.fleet} ("
    while (fed.logs / "coordinator.log").read_text(errors="replace").count(mark) < connects:
        assert time.monotonic() < deadline, fed.log_tail()
        time.sleep(0.2)
    time.sleep(0.5)  # subscriptions are made right after the connect


def test_paid_predictions_with_restart(embedded_broker: BrokerInfo, tmp_path: Path) -> None:
    fed = Federation(tmp_path, embedded_broker.host, embedded_broker.port, devices=("edge-1",), rounds=0,
                     # --heartbeat 2: after the SIGKILL the new coordinator waits ~2 heartbeats, not ~31 s
                     extra_coordinator=["--predict-fee", "2", "--heartbeat", "2"])
    keytool.add_client(fed.keys, "alice")
    fed.extra_coordinator += ["--clients", str(fed.keys / keytool.CLIENTS_FILE)]
    broker = fed.broker_args()
    owner = ["--keys", str(fed.keys / keytool.COORDINATOR_FILE), *broker, "--timeout", "60"]
    rows = tmp_path / "rows.csv"
    rows.write_text(ROWS)
    predict = _cli("predict", "--remote", "--data", str(rows), "--bundle",
                   str(keytool.client_bundle_path(fed.keys, "alice")), *broker, "--timeout", "60")
    ledger_path = fed.state / "ledger.log"

    def run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=180)

    def file_balance() -> int:
        with FleetLedger.open(ledger_path) as ledger:
            return credits.fold(ledger).balance("alice")

    try:
        _start(fed, 1)
        done = run(_cli("credits", "deposit", "alice", "5", *owner))
        assert done.returncode == 0, done.stderr + fed.log_tail()
        assert "balance 5" in done.stdout

        answered = run(predict)
        assert answered.returncode == 0, answered.stderr + fed.log_tail()
        lines = answered.stdout.strip().splitlines()
        assert lines[0] == "row,prediction" and len(lines) == 3
        values = [float(line.split(",")[1]) for line in lines[1:]]
        assert all(abs(v) < 50 for v in values)  # hundreds of thousands of dollars, in the target's units
        assert "fee 2, balance 3" in answered.stderr
        request_id = re.search(r"request ([0-9a-f]{32})", answered.stderr)
        assert request_id is not None

        # Two clients at once with money for one request: one answered, one refused, balance 1.
        both = [subprocess.Popen(predict, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for _ in range(2)]
        codes = sorted(p.wait(timeout=180) for p in both)
        assert codes == [0, USAGE], [p.stderr.read() if p.stderr else "" for p in both]
        assert file_balance() == 1

        refused = run(predict)
        assert refused.returncode == USAGE and "insufficient_balance" in refused.stderr

        # The coordinator dies without warning; the balances are the ledger's, before and after.
        fed.procs["coordinator"].send_signal(signal.SIGKILL)
        fed.procs["coordinator"].wait(timeout=30)
        assert file_balance() == 1
        _start(fed, 2)
        done = run(_cli("credits", "deposit", "alice", "4", *owner))
        assert done.returncode == 0 and "balance 5" in done.stdout, done.stderr + fed.log_tail()
        assert run(predict).returncode == 0
        assert file_balance() == 3

        balance = run(_cli("credits", "balance", str(ledger_path), "--json"))
        summary = json.loads(balance.stdout)
        assert summary["clients"]["alice"] == {"deposited": 9, "spent": 6, "balance": 3, "requests": 3}
        assert summary["held"] == 6

        too_much = run(_cli("credits", "withdraw", "7", *owner))
        assert too_much.returncode == USAGE and "exceeds the fees held" in too_much.stderr
        assert run(_cli("credits", "withdraw", "6", *owner)).returncode == 0

        proof = run(_cli("credits", "receipt", str(ledger_path), "--client", "alice", "--request-id",
                         request_id.group(1)))
        assert proof.returncode == 0, proof.stderr
        assert json.loads(proof.stdout)["verified"] is True and json.loads(proof.stdout)["fee"] == 2
        assert len(bytes.fromhex(json.loads(proof.stdout)["scaler_sha256"])) == 32  # California's standardisers
        assert verify_file(ledger_path).ok
    finally:
        fed.stop()


def test_sigkill_while_requests_are_in_flight(embedded_broker: BrokerInfo, tmp_path: Path) -> None:
    """A burst of requests, the coordinator killed mid-way: every answer a client got has its
    receipt in the ledger file (durable before the reply); after the restart the same requests
    sent again are charged only if they were not before, each id once; those charged before
    (their replies perhaps lost in the crash) get the same answer with the same receipt; the
    coordinator's balance is the ledger's."""
    import numpy as np

    from federation import prediction_wire as wire
    from federation.mqtt import BrokerConfig, MqttLink
    from federation.topics import Topics

    fed = Federation(tmp_path, embedded_broker.host, embedded_broker.port, devices=("edge-1",), rounds=0,
                     # --heartbeat 2: the restarted coordinator waits ~2 heartbeats to see that no other runs
                     extra_coordinator=["--predict-fee", "1", "--heartbeat", "2"])
    keytool.add_client(fed.keys, "alice")
    fed.extra_coordinator += ["--clients", str(fed.keys / keytool.CLIENTS_FILE)]
    owner = ["--keys", str(fed.keys / keytool.COORDINATOR_FILE), *fed.broker_args(), "--timeout", "60"]
    ledger_path = fed.state / "ledger.log"
    bundle = wire.ClientBundle.load(keytool.client_bundle_path(fed.keys, "alice"))
    topics = Topics(bundle.fleet)
    row = np.array([[8.3, 41.0, 7.0, 1.0, 322.0, 2.6, 37.9, -122.2]], np.float32)
    requests = [wire.seal_request(bundle, row) for _ in range(300)]
    by_id = {r.request_id: r for r in requests}
    link = MqttLink(BrokerConfig(broker_host=embedded_broker.host, broker_port=embedded_broker.port),
                    "alice-burst", subscriptions=[wire.reply_topic(topics, "alice")], persistent=False)

    def send(pendings: list[wire.PendingRequest]) -> None:
        for pending in pendings:
            link.publish(wire.request_topic(topics, "alice"), pending.payload)

    def replies(until: Callable[[dict[bytes, list[wire.PredictionReply]]], bool], got: dict[bytes, list[
            wire.PredictionReply]], timeout: float, *, resend: bool = False) -> None:
        """Collect replies until ``until(got)``; with ``resend``, ask again for the unanswered
        every RESEND_S, as `fledger predict --remote` does."""
        deadline = time.monotonic() + timeout
        sent = time.monotonic()
        while not until(got) and time.monotonic() < deadline:
            if resend and time.monotonic() - sent > RESEND_S:
                sent = time.monotonic()
                send([r for r in requests if r.request_id not in got])
            try:
                message = link.inbox.get(timeout=0.2)
            except queue.Empty:
                continue
            header = msgpack.unpackb(msgpack.unpackb(message.payload, raw=False)["hdr"], raw=False)
            pending = by_id[header["request_id"]]
            got.setdefault(pending.request_id, []).append(wire.open_reply(message.payload, bundle, pending))

    def ledger_receipts() -> dict[bytes, tuple[int, bytes]]:
        with FleetLedger.open(ledger_path) as ledger:
            return {b.data["request_id"]: (b.index, b.hash) for b in ledger if b.data["type"] == credits.RECEIPT}

    try:
        _start(fed, 1)
        done = subprocess.run(_cli("credits", "deposit", "alice", "1000", *owner), capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, done.stderr + fed.log_tail()
        assert link.start(timeout=30)
        time.sleep(0.5)  # the subscription is made right after the connect
        send(requests)
        before: dict[bytes, list[wire.PredictionReply]] = {}
        replies(lambda got: len(got) >= 20, before, 60)
        fed.procs["coordinator"].send_signal(signal.SIGKILL)
        fed.procs["coordinator"].wait(timeout=30)
        replies(lambda got: False, before, 1.0)  # whatever was on its way
        assert 20 <= len(before) < len(requests), "the kill came after every request was answered"
        charged = ledger_receipts()
        for request_id, answers in before.items():  # every answer given is in the ledger, as it said
            for reply in answers:
                assert reply.status == "ok" and reply.receipt is not None
                assert charged[request_id] == (reply.receipt.index, reply.receipt.hash)
        assert file_balance(ledger_path) == 1000 - len(charged)

        fed.start_coordinator()  # requests queued while it was down may reach it too: answered once each
        send(requests)  # the client asks again with the same ids, until answered
        after: dict[bytes, list[wire.PredictionReply]] = {}
        replies(lambda got: len(got) == len(requests), after, 120, resend=True)
        assert len(after) == len(requests), fed.log_tail()
        final = ledger_receipts()
        assert len(final) == len(requests)  # each id charged exactly once, none lost
        lost = [i for i in charged if i not in before]  # charged, the reply lost in the crash
        for request_id, answers in after.items():
            for reply in answers:  # answered: with the receipt of before the crash, if charged then
                assert reply.status == "ok" and reply.receipt is not None, reply
                assert final[request_id] == (reply.receipt.index, reply.receipt.hash)
                if request_id in charged:
                    assert charged[request_id] == final[request_id]
        assert all(after[i][0].predictions is not None for i in lost)
        assert file_balance(ledger_path) == 1000 - len(requests)
        done = subprocess.run(_cli("credits", "deposit", "alice", "1", *owner), capture_output=True, text=True,
                              timeout=120)  # the coordinator's own balance, confirmed by it
        assert done.returncode == 0 and f"balance {1000 - len(requests) + 1}" in done.stdout, done.stderr
        assert verify_file(ledger_path).ok
    finally:
        link.stop()
        fed.stop()


def file_balance(ledger_path: Path) -> int:
    with FleetLedger.open(ledger_path) as ledger:
        return credits.fold(ledger).balance("alice")


def test_predict_remote_times_out_without_a_coordinator(embedded_broker: BrokerInfo, tmp_path: Path) -> None:
    from tests.test_service import PLAIN_INSTALL

    keys = tmp_path / "keys"
    keytool.init_fleet(keys, "quiet")
    keytool.add_client(keys, "bob")
    rows = tmp_path / "rows.csv"
    rows.write_text(ROWS)
    # A client buying predictions needs no torch: run as on a plain install (torch unimportable).
    done = subprocess.run([sys.executable, "-c", PLAIN_INSTALL, "predict", "--remote", "--data", str(rows),
                           "--bundle", str(keytool.client_bundle_path(keys, "bob")), "--broker-host",
                           embedded_broker.host, "--broker-port", str(embedded_broker.port), "--timeout", "2"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == TIMEOUT and "no reply" in done.stderr
