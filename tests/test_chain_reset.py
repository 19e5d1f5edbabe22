"""No silent stall: agents pin their fleet's chain (real processes, mosquitto).

The coordinator's state directory is lost mid-round while the agents hold unacknowledged
updates in their outboxes, and the operator starts a new chain (--new-chain). Every running agent
logs an ERROR naming what happened and the fix instead of waiting silently; restarted with
--accept-reset they follow the new chain, the stale outbox entries are dropped with a log line,
and the new chain's round completes with both devices.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from pathlib import Path

from conftest import BrokerInfo
from federation_run import Federation
from test_reliability import aggregates, finish, ledger_records, log_text, wait_for

from federation import exit_codes
from fledger import keytool


def test_new_chain_gets_an_error_from_every_agent_and_accept_reset_follows_it(mosquitto_broker: BrokerInfo,
                                                                              tmp_path: Path) -> None:
    broker = mosquitto_broker
    fed = Federation(tmp_path, broker.host, broker.port, rounds=2, limit=200,
                     extra_coordinator=["--head-wait", "1", "--heartbeat", "1"], extra_agent=["--heartbeat", "1"])
    try:
        fed.start_all()
        # Round 1 closes; the agents are paused before they can train round 2 (they take
        # milliseconds), the coordinator dies with round 2's model out, then the agents train it:
        # their updates stay unacknowledged in their outboxes.
        wait_for("round 1 to close", lambda: " aggregated from " in log_text(fed, "coordinator"), 120, fed,
                 poll=0.01)
        for device in fed.devices:
            fed.procs[device].send_signal(signal.SIGSTOP)
        wait_for("round 2's model published", lambda: [r for r in ledger_records(fed)
                                                       if r["type"] == "model.published" and r["round"] == 2], 30, fed)
        time.sleep(1.0)  # recorded after the publish call: let the MQTT thread send it
        # The coordinator's state is lost; the operator starts a new chain on purpose.
        fed.procs["coordinator"].send_signal(signal.SIGKILL)
        fed.procs["coordinator"].wait()
        for device in fed.devices:
            fed.procs[device].send_signal(signal.SIGCONT)
        outboxes = [tmp_path / device / "outbox" / "round-000002.update" for device in fed.devices]
        wait_for("updates in the outboxes", lambda: all(p.exists() for p in outboxes), 60, fed)
        shutil.move(fed.state, tmp_path / "lost-state")
        fed.extra_coordinator = ["--head-wait", "1", "--heartbeat", "1", "--new-chain"]
        fed.start_coordinator()
        for device in fed.devices:
            wait_for(f"{device}'s ERROR about the new chain", lambda d=device: [  # type: ignore[misc]
                line for line in log_text(fed, d).splitlines()
                if "ERROR" in line and "started a new chain" in line and "--accept-reset" in line], 90, fed)
        assert not aggregates(fed)  # nobody followed silently
        # A second coordinator for the same fleet (another state directory) sees this one alive.
        second = subprocess.run([*fed._cli(), "coordinator", *fed.broker_args(), "--fleet", fed.fleet,
                                 "--task", fed.task, "--state-dir", str(tmp_path / "second"),
                                 "--keys", str(fed.keys / keytool.COORDINATOR_FILE),
                                 "--devices", str(fed.keys / keytool.REGISTRY_FILE), "--head-wait", "1"],
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == exit_codes.STATE and "another coordinator of fleet" in second.stderr, \
            second.stderr
        assert not (tmp_path / "second" / "ledger.log").exists()
        assert all(p.exists() for p in outboxes)  # nor dropped its outbox without saying why
        # Restarted with --accept-reset, both follow the new chain.
        for name in fed.devices:
            fed.procs[name].terminate()
            fed.procs[name].wait(20)
        fed.extra_agent = ["--heartbeat", "1", "--accept-reset"]
        for i in range(len(fed.devices)):
            fed.start_agent(i)
        finish(fed, 120)
    finally:
        fed.stop()
    records = ledger_records(fed)
    assert [(a["round"], a["participants"]) for a in records if a["type"] == "aggregate"] == \
        [(1, ["edge-1", "edge-2"]), (2, ["edge-1", "edge-2"])]
    for device in fed.devices:
        assert "dropped our update for round 2 from the outbox" in log_text(fed, device)
        assert "following it (--accept-reset)" in log_text(fed, device)
