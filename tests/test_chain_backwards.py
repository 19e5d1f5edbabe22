"""No silent stall when a coordinator goes backwards along its own chain (real processes, mosquitto).

The one rollback the coordinator cannot see for itself: its whole state directory (ledger,
checkpoint, models) comes back from an older backup while the broker lost its retained messages
(restarted without persistence). Nothing it can see shows a longer chain, so it starts, behind
what it published. (Had only ledger.log and the checkpoint been lost, its model files would show
it: that start is refused first.) The agents' pins do show it: every running agent logs an ERROR naming what
happened and the fix, and follows nothing the rolled-back coordinator says (no update of theirs
lands on the re-run rounds, so published history is not forked through them).
"""

from __future__ import annotations

import contextlib
import queue
import shutil
import signal
import time
from pathlib import Path

from conftest import Mosquitto, running
from federation_run import Federation
from test_reliability import aggregates, ledger_records, log_text, wait_for
from test_state_safety import coordinator_once, refusal

from edge_agent import chain_pin
from federation import envelope, exit_codes
from federation.keys import DeviceBundle
from federation.mqtt import BrokerConfig, MqttLink
from federation.topics import Topics
from fledger import keytool


def stop_coordinator(fed: Federation) -> None:
    proc = fed.procs["coordinator"]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0, fed.log_tail()


def retained_model(fed: Federation, broker: Mosquitto) -> tuple[int, int]:
    """(round, ledger height) of the fleet's retained global model, as an agent pins it."""
    topics = Topics(fed.fleet)
    bundle = DeviceBundle.load(keytool.bundle_path(fed.keys, fed.devices[0]))
    link = MqttLink(BrokerConfig(broker_host=broker.host, broker_port=broker.port), "test-retained-model",
                    subscriptions=[topics.model], persistent=False)
    assert link.start(timeout=30)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(queue.Empty):
                message = link.inbox.get(timeout=1)
                if message.topic == topics.model:
                    header, _ = envelope.open_model(message.payload, bundle, max_bytes=1 << 24)
                    return header.round, header.block_index + 1
    finally:
        link.stop()
    raise AssertionError(f"no retained model on the broker\n{fed.log_tail()}")


def test_agents_refuse_a_coordinator_restored_from_an_older_backup(tmp_path: Path) -> None:
    with running(Mosquitto(tmp_path / "mosquitto")) as broker:
        fed = Federation(tmp_path, broker.host, broker.port, rounds=0, limit=200,
                         extra_coordinator=["--head-wait", "1", "--heartbeat", "1"], extra_agent=["--heartbeat", "1"])
        backup = tmp_path / "backup"
        try:
            fed.start_all()
            wait_for("a first round", lambda: aggregates(fed), 120, fed)
            stop_coordinator(fed)  # a consistent backup: the coordinator stopped
            shutil.copytree(fed.state, backup)
            backed_up = len(ledger_records(fed))
            last_backed_up = max(a["round"] for a in aggregates(fed))
            fed.start_coordinator()
            wait_for("three more rounds", lambda: max((a["round"] for a in aggregates(fed)), default=0)
                     >= last_backed_up + 3, 120, fed)
            stop_coordinator(fed)
            # The pins are read once the agents have taken the last model the broker has (the
            # retained one): it may still be on its way to them when the coordinator has exited.
            last = retained_model(fed, broker)
            wait_for("the agents pinned at the last model published", lambda: all(
                (p := chain_pin.load(tmp_path / d)) is not None and (p.round, p.height) == last
                for d in fed.devices), 60, fed)
            pinned = {d: chain_pin.load(tmp_path / d) for d in fed.devices}
            assert all(p is not None and p.round > last_backed_up + 1 for p in pinned.values()), pinned
            # The broker restarts without persistence: its retained ledger head is gone.
            broker.stop()
            broker.start()
            # Then ledger.log and the checkpoint lost, the models left: the models still show it.
            aside = tmp_path / "aside"
            aside.mkdir()
            for name in ("ledger.log", "checkpoint"):
                shutil.move(fed.state / name, aside / name)
            code, err = coordinator_once(fed)
            line = refusal(err)
            assert code == exit_codes.STATE and "holds the model for round" in line and "ledger is empty" in line, err
            assert not (fed.state / "ledger.log").exists()
            # The state directory comes back from the backup: nothing the coordinator sees is ahead.
            shutil.rmtree(fed.state)
            shutil.copytree(backup, fed.state)
            fed.start_coordinator()
            wait_for("the coordinator to resume from the backup",
                     lambda: log_text(fed, "coordinator").count("resumed at round") >= 2, 60, fed)
            for device in fed.devices:
                wait_for(f"{device}'s ERROR about the rollback", lambda d=device: [  # type: ignore[misc]
                    line for line in log_text(fed, d).splitlines()
                    if "ERROR" in line and "went backwards from round" in line and "--accept-reset" in line
                    and "ledger restore" in line], 90, fed)
            assert fed.procs["coordinator"].poll() is None, fed.log_tail()
        finally:
            fed.stop()
    # Nothing the agents trained after the backup was sent to the rolled-back coordinator.
    after = ledger_records(fed)[backed_up:]
    assert not [r for r in after if r["type"] == "update"], after
    assert all(chain_pin.load(tmp_path / d) == pinned[d] for d in fed.devices)  # the pins stay where they were
