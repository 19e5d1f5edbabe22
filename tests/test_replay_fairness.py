"""Ledger replays are fair and bounded (coordinator/replay.py; docs/security.md "Replays").

The limiter's bounds with a hand-set clock, then the attack on real processes: an embedded
broker enforcing the shipped ACL (plus a second monitor account, as the ACL's comment says
to add one), a coordinator process, one account flooding replay requests from height 0, and
an honest `fledger ledger follow` that must still catch up."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from federation_run import Federation
from manual_clock import ManualClock
from test_ledger_cli import _height_once

from coordinator.replay import REFUSALS, ReplayLimiter, ReplayLimits, parse_request
from coordinator.request_tally import SERVED
from federation.mqtt import BrokerConfig, MqttLink
from federation.topics import Topics
from fledger import keytool
from fledger.acl import default_acl_text
from fledger.broker import EmbeddedBroker

BLOCK = b"x" * 1000


def chain(n: int = 1000) -> list[bytes]:
    return [BLOCK] * n


def blocks_of(blocks: list[bytes]) -> Callable[[int, int], Iterator[bytes]]:
    return lambda start, end: iter(blocks[start:end])


def test_parse_request_accepts_only_a_small_non_negative_int_height() -> None:
    assert parse_request(b'{"from": 3}') == 3
    for bad in (b'{"from": 1e9}', b'{"from": -1}', b'{"from": true}', b"[1]", b"junk", b'{"from": 1}' + b" " * 300):
        assert parse_request(bad) is None, bad


def test_each_requester_is_limited_on_its_own() -> None:
    clock = ManualClock(100.0)
    limiter = ReplayLimiter(ReplayLimits(interval_s=2.0, max_bytes=10_000, requester_window_bytes=1 << 30,
                                         window_bytes=1 << 30), clock=clock)
    blocks = blocks_of(chain())
    assert len(limiter.request("flooder", b'{"from": 0}', blocks)) == 10  # 10 KB per request
    for _ in range(50):  # a flood within the interval: every request counted, none served
        assert limiter.request("flooder", b'{"from": 0}', blocks) == []
    assert limiter.refused["too_often"] == 50
    # The honest monitor has its own allowance.
    assert len(limiter.request("monitor", b'{"from": 10}', blocks)) == 10
    clock.t += 2.0
    assert len(limiter.request("flooder", b'{"from": 0}', blocks)) == 10
    assert limiter.request("flooder", b'{"from": 1e9}', blocks) == [] and limiter.refused["malformed"] == 1


def test_every_answer_is_counted_and_a_non_positive_limit_is_refused() -> None:
    heard: list[str] = []
    limiter = ReplayLimiter(ReplayLimits(), clock=ManualClock(100.0), counted=heard.append)
    blocks = blocks_of(chain(3))
    limiter.request("monitor", b'{"from": 0}', blocks)
    limiter.request("monitor", b'{"from": 0}', blocks)
    limiter.request("other", b"junk", blocks)
    assert heard == [SERVED, "too_often", "malformed"]
    assert set(heard) - {SERVED} <= set(REFUSALS)
    ReplayLimits().check()
    for name in ("interval_s", "max_blocks", "max_bytes", "requester_window_bytes", "window_bytes"):
        with pytest.raises(ValueError, match="must be > 0"):
            dataclasses.replace(ReplayLimits(), **{name: 0}).check()


def test_byte_budgets_per_requester_and_per_window_bound_the_amplification() -> None:
    clock = ManualClock(0.0)
    limits = ReplayLimits(interval_s=0.0, max_bytes=10_000, window_s=10.0, requester_window_bytes=25_000,
                          window_bytes=40_000)
    limiter = ReplayLimiter(limits, clock=clock)
    blocks = blocks_of(chain())
    sent = {"a": 0, "b": 0, "c": 0}
    for _ in range(100):  # 100 requests each within one window
        for requester in sent:
            sent[requester] += sum(map(len, limiter.request(requester, b'{"from": 0}', blocks)))
    assert max(sent.values()) <= limits.requester_window_bytes
    assert sum(sent.values()) <= limits.window_bytes
    assert limiter.refused["byte_budget"] > 0
    clock.t += 10.0  # a new window: served again
    assert limiter.request("c", b'{"from": 0}', blocks)


def test_an_honest_monitor_catches_up_while_another_account_floods(tmp_path: Path) -> None:
    fed = Federation(tmp_path, "127.0.0.1", 0, rounds=0, extra_coordinator=["--replay-batch", "2"])
    broker_dir = fed.keys / keytool.BROKER_DIR
    keytool.new_broker_user(broker_dir, "auditor")  # a second monitor account, the flooder
    acl = tmp_path / "fledger.acl"
    acl.write_text(default_acl_text() + "\nuser auditor\ntopic read fledger/+/ledger/#\n"
                                        "topic write fledger/+/ledger/replay/auditor\n")
    with EmbeddedBroker(password_file=keytool.broker_password_db(fed.keys), acl_file=acl) as broker:
        fed.port = broker.port
        fed.logins["coordinator"] = broker_dir / "coordinator.password"
        stop = threading.Event()
        flooder = MqttLink(BrokerConfig(broker_host=broker.host, broker_port=broker.port, username="auditor",
                                        password_file=broker_dir / "auditor.password"), "flooder")
        try:
            fed.start_coordinator()
            height = _height_once(fed, "round.opened", 90)
            assert height >= 5, fed.log_tail()  # genesis, keys, round opened...: >= 3 replays at 2 blocks each
            flooder.start(timeout=20)

            def flood() -> None:  # 20 requests a second from height 0, the whole time
                while not stop.is_set():
                    flooder.publish(Topics(fed.fleet).ledger_replay("auditor"), b'{"from": 0}')
                    time.sleep(0.05)

            threading.Thread(target=flood, daemon=True).start()
            time.sleep(1.0)  # the flood is under way before the honest monitor asks
            follower = subprocess.run(
                [sys.executable, "-m", "fledger.cli", "ledger", "follow", "--fleet", fed.fleet,
                 "--broker-host", broker.host, "--broker-port", str(broker.port), "--username", "monitor",
                 "--password-file", str(broker_dir / "monitor.password"), "--until-height", str(height),
                 "--timeout", "90", "--coordinator-key", str(fed.keys / keytool.COORDINATOR_FILE)],
                capture_output=True, text=True, timeout=120)
        finally:
            stop.set()
            flooder.stop()
            fed.stop()
    assert follower.returncode == 0, follower.stderr[-3000:] + fed.log_tail()
    assert f"replica verified to height {height}" in follower.stdout
    log = (fed.logs / "coordinator.log").read_text()
    assert "ledger replay request from auditor refused: too_often" in log  # the flood was seen and refused
    assert "for monitor" in log  # and the monitor was served

