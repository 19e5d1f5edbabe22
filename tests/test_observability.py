"""Seeing the fleet, on real processes: Prometheus metrics of the coordinator and the agents
scraped over HTTP, `fledger status` reading the signed status, the dashboard in a real
headless browser, and `fledger report` on the ledger the run left."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as paho
import pytest
from browser import assert_not_blank, count_color, load_png, run_chromium
from conftest import BrokerInfo
from federation_run import Federation
from paho.mqtt.enums import CallbackAPIVersion

from federation import envelope
from federation.codec import encode_tensors
from federation.fleet_state import FleetLedger
from federation.keys import DeviceBundle
from fledger import cli, keytool
from fledger.broker import free_port

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> Samples:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def fleet_json(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/fleet", timeout=10) as response:
        result: dict[str, Any] = json.loads(response.read())
        return result


def wait_for(what: str, check: Callable[[], bool], fed: Federation, timeout: float = 240.0,
             stopped: Iterable[str] = ()) -> None:
    """Until ``check()``; fails at once if a process exits that the test did not ``stop``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except OSError:
            pass  # endpoint not up yet
        for name, proc in fed.procs.items():
            if proc.poll() is not None and name not in stopped:
                raise AssertionError(f"{name} exited with {proc.returncode} while waiting for {what}\n{fed.log_tail()}")
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}\n{fed.log_tail()}")


def fledger(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fledger.cli", *args], capture_output=True, text=True,
                          timeout=timeout, check=False)


def test_metrics_status_dashboard_and_report_of_a_real_run(embedded_broker: BrokerInfo, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    metrics_port, dashboard_port = free_port(), free_port()
    agent_ports = [free_port(), free_port()]
    # --rounds 0: the fleet keeps going while we look at it; agents stay after training.
    fed = Federation(tmp_path, embedded_broker.host, embedded_broker.port, rounds=0, limit=300,
                     extra_coordinator=["--metrics-port", str(metrics_port), "--dashboard-port", str(dashboard_port),
                                        "--evaluate", "--round-deadline", "0"])
    broker = ["--broker-host", embedded_broker.host, "--broker-port", str(embedded_broker.port)]
    try:
        fed.start_coordinator()
        for i, port in enumerate(agent_ports):
            fed.extra_agent = ["--metrics-port", str(port), "--no-exit-when-done", "--heartbeat", "2"]
            fed.start_agent(i)
        wait_for("two rounds aggregated", lambda: len(fleet_json(dashboard_port)["rounds"]) >= 2, fed)

        # Agents: counters that must have moved.
        for port in agent_ports:
            wait_for("the agent to see two acknowledgements",
                     lambda p=port: value(scrape(p), "fledger_agent_updates_acknowledged_total") >= 2, fed)
            agent = scrape(port)
            assert value(agent, "fledger_agent_rounds_trained_total") >= 2
            assert value(agent, "fledger_agent_updates_sent_total") >= 2
            assert value(agent, "fledger_agent_training_seconds_count") >= 2
            assert value(agent, "fledger_agent_training_seconds_sum") > 0

        # A forged update: counted as a rejection by reason, never in the ledger.
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id="forger")
        client.connect(embedded_broker.host, embedded_broker.port)
        client.loop_start()
        client.publish(f"fledger/{fed.fleet}/update/edge-1", b"not an update", qos=1).wait_for_publish(10)
        # A genuine device's update for a round long closed: authenticated, so recorded in the ledger.
        stale = envelope.seal_update(DeviceBundle.load(keytool.bundle_path(fed.keys, "edge-2")), 1,
                                     encode_tensors({"w": np.zeros(2, np.float32)}), 10, {}, dataset_sha256=bytes(32),
                                     base_sha256=bytes(32))
        client.publish(f"fledger/{fed.fleet}/update/edge-2", stale, qos=1).wait_for_publish(10)
        client.loop_stop()
        client.disconnect()
        for reason in ("malformed", "stale_round"):
            wait_for(f"the {reason} update counted",
                     lambda r=reason: value(scrape(metrics_port), "fledger_coordinator_updates_rejected_total",
                                            reason=r) == 1, fed)
        wait_for("both devices online",
                 lambda: value(scrape(metrics_port), "fledger_coordinator_devices_online") == 2, fed)

        # `fledger status`: verified with the coordinator's key (here: from a device bundle).
        # (In this process: a `fledger` process costs seconds of start-up on a loaded machine.)
        bundle = str(keytool.bundle_path(fed.keys, "edge-1"))
        shown: list[dict[str, Any]] = []

        def status_shows_the_rejection() -> bool:
            # A rejection alone does not republish the status (a flood of junk must not make the
            # coordinator sign a status per message): it shows from the next change on.
            assert cli.main(["status", "--fleet", fed.fleet, "--coordinator-key", bundle, "--json", *broker]) == 0
            shown.append(json.loads(capsys.readouterr().out)["status"])
            return "malformed" in shown[-1]["rejections"]

        wait_for("the status to show the rejection", status_shows_the_rejection, fed)
        status = shown[-1]
        assert status["round"] >= 3 and status["height"] > 0 and status["rejections"]["malformed"] == 1
        assert status["presence"] == {"edge-1": "online", "edge-2": "online"}
        assert cli.main(["status", "--fleet", fed.fleet, "--coordinator-key", bundle, *broker]) == 0
        text = capsys.readouterr().out
        assert "devices: 2 online of 2 known" in text and "malformed 1" in text
        # Another fleet's key does not verify: exit 1, nothing printed as if it were true.
        keytool.init_fleet(tmp_path / "other", fed.fleet, force=True)
        other_key = str(tmp_path / "other" / keytool.COORDINATOR_FILE)
        assert cli.main(["status", "--fleet", fed.fleet, "--coordinator-key", other_key, *broker]) == 1
        refused = capsys.readouterr()
        assert refused.out == "" and "not signed" in refused.err

        # The dashboard in a real browser, while the fleet runs.
        dashboard = f"http://127.0.0.1:{dashboard_port}/"
        shot = tmp_path / "dashboard.png"
        dom = run_chromium(dashboard, tmp_path, screenshot=shot, size=(1280, 900), budget_ms=4000)
        page = re.sub(r"<[^>]+>", " ", dom)
        assert "edge-1" in page and "edge-2" in page and "test_mse" in page and "malformed" in page
        assert "stale_round 1" in page  # in the row of the round open when it was recorded
        shown_round = int(re.search(r'id="round">(\d+)<', dom).group(1))  # type: ignore[union-attr]
        assert shown_round >= 3
        pixels = load_png(shot)
        assert pixels.shape == (900, 1280, 3)
        assert_not_blank(pixels)
        assert count_color(pixels[:40], (0x1D, 0x23, 0x30), tolerance=4) > 20_000  # the header bar
        assert count_color(pixels, (0x2F, 0x6F, 0xDE)) > 300  # the metric curve was drawn

        # Quiet the fleet, then the counters must agree with the ledger file.
        for device in fed.devices:
            fed.procs[device].terminate()
            assert fed.wait(device, 60) == 0
        # (The status, which the gauge follows, is republished at most once a second.)
        wait_for("the devices' goodbyes",
                 lambda: value(scrape(metrics_port), "fledger_coordinator_devices_online") == 0, fed,
                 stopped=fed.devices)

        def settled() -> bool:
            height = len(FleetLedger.open(fed.state / "ledger.log"))
            return value(scrape(metrics_port), "fledger_coordinator_ledger_height") == height

        wait_for("the ledger to settle", settled, fed, stopped=fed.devices)
        coordinator = scrape(metrics_port)
        blocks = list(FleetLedger.open(fed.state / "ledger.log"))
        updates = [b for b in blocks if b.data["type"] == "update"]
        aggregates = [b.data for b in blocks if b.data["type"] == "aggregate"]
        assert value(coordinator, "fledger_coordinator_updates_accepted_total") == len(updates) >= 4
        assert value(coordinator, "fledger_coordinator_ledger_height") == len(blocks)
        assert value(coordinator, "fledger_coordinator_rounds_closed_total") == len(aggregates)
        assert value(coordinator, "fledger_coordinator_ingest_seconds_count", result="accepted") == len(updates)
        assert value(coordinator, "fledger_coordinator_model_test_metric", metric="mse") == \
            pytest.approx(aggregates[-1]["metrics"]["test_mse"])
        assert value(coordinator, "fledger_coordinator_round") == aggregates[-1]["round"] + 1
        # Its own heads came back (one per commit group, far more than aggregates), each judged its own.
        assert value(coordinator, "fledger_coordinator_ledger_heads_total", verdict="ours") >= len(aggregates)
        assert value(coordinator, "fledger_coordinator_ledger_heads_total", verdict="another_writer") == 0
    finally:
        fed.stop()

    # The report, from the ledger and the saved models alone (the fleet is gone).
    out = tmp_path / "report"
    made = fledger("report", "--ledger", str(fed.state / "ledger.log"), "--out", str(out))
    assert made.returncode == 0, made.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == [a["round"] for a in aggregates]
    recorded = [r["rejected"] for r in summary["rounds"]] + [summary["rejected_in_open_round"]]
    assert sum(r.get("stale_round", 0) for r in recorded) == 1
    for name in ("metric.png", "participation.png", "rejections.png"):
        pixels = load_png(out / name)
        assert pixels.shape[0] >= 300 and pixels.shape[1] >= 600
        assert_not_blank(pixels)
    assert not (out / "confusion.png").exists()  # regression: no confusion matrix
