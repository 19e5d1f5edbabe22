"""No silent fork while running: two coordinators with the same keys, two state directories
(real processes, on the embedded broker and on mosquitto).

A fleet runs three rounds with one coordinator, which must never take its own heads for
another writer's. Then its state directory is copied (a backup restored onto a second gateway),
and both coordinators run at once with their own client ids while the agents train: each
appends its own blocks (the first one the record it appends on resuming, then the agents'
updates). At least one must stop within seconds with exit code 5 and one ERROR line, and must
have appended (so published) nothing after it saw the other; the other goes on alone.
"""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

from conftest import BrokerInfo
from federation_run import Federation
from test_reliability import finish, log_text, wait_for

from federation import exit_codes
from federation.fleet_state import FleetLedger, verify_file
from fledger import keytool

ALARM = "another coordinator is writing the ledger of fleet"
DETECT_WITHIN_S = 60  # from the second one's start (its first block is the record it appends on resuming)


def alarm_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if ALARM in line]


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
    # gateway-b skips the broker look (--head-wait 0), as one does whose look ran just before
    # gateway-a's first status: then the start-up check sees nothing of gateway-a, whichever
    # of the two is faster (so the test does not depend on that race).
    started = time.monotonic()
    b = fed._spawn("gateway-b", [*fed._cli(), "coordinator", *fed.broker_args(), "--fleet", fed.fleet,
                                 "--task", fed.task, "--state-dir", str(twin_state),
                                 "--keys", str(fed.keys / keytool.COORDINATOR_FILE),
                                 "--devices", str(fed.keys / keytool.REGISTRY_FILE), "--rounds", "6",
                                 "--min-clients", "2", "--head-wait", "0", "--client-id", "gateway-b"])
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
            text = log_text(fed, name)
            lines = alarm_lines(text)
            assert len(lines) == 1 and " ERROR " in lines[0], text
            assert "fledger ledger verify" in lines[0] and "fledger ledger restore" in lines[0]
            # Stopped at once: not one block appended (so none published) after it saw the other.
            found = re.search(r"\(our height (\d+)\)", lines[0])
            assert found is not None, lines[0]
            assert FleetLedger.open(state / "ledger.log").height == int(found.group(1)) > height, lines[0]
            assert verify_file(state / "ledger.log").ok
        print(f"{any_broker.kind}: stopped {[name for name, _ in stopped]} {detected_after:.1f}s after gateway-b "
              "was started")
    finally:
        fed.stop()
