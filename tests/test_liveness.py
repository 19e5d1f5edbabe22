"""Application-level liveness on real processes: a path that keeps the MQTT connection up (pings,
acknowledgements) but stops delivering data must not stall a role for good. Coordinator and
agents reach mosquitto through a proxy that goes half-dead (tests/mqtt_proxy.py); each notices
that not even its own heartbeat comes back, reconnects, and the fleet finishes its rounds."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import BrokerInfo
from federation_run import Federation
from mqtt_proxy import PUBLISH, MqttProxy
from test_reliability import check_final_ledger, finish, log_text, wait_for

from federation.mqtt import LivenessWatchdog

ECHO_LOST = "not even our own echo"


@pytest.fixture
def proxy(mosquitto_broker: BrokerInfo) -> Iterator[MqttProxy]:
    proxy = MqttProxy(mosquitto_broker.host, mosquitto_broker.port)
    try:
        yield proxy
    finally:
        proxy.close()


def test_watchdog_counts_silence_from_the_last_arrival() -> None:
    dog = LivenessWatchdog(4.0, now=100.0)
    assert dog.silent_for(104.0) is None
    assert dog.silent_for(104.5) == 4.5
    dog.note(104.5)
    dog.note(90.0)  # a late stamp from another thread does not turn the clock back
    assert dog.silent_for(108.0) is None
    with pytest.raises(ValueError):
        LivenessWatchdog(0.0, now=0.0)


def test_roles_reconnect_when_data_stops_but_the_connection_stays_up(proxy: MqttProxy, tmp_path: Path) -> None:
    fed = Federation(tmp_path, proxy.host, proxy.port, rounds=2, limit=200,
                     # 3.1.1: the proxy parses MQTT 3.1.1 packets (no MQTT 5 probe connections either)
                     extra_coordinator=["--heartbeat", "1", "--keepalive", "2", "--head-wait", "1",
                                        "--mqtt-version", "3.1.1"],
                     extra_agent=["--heartbeat", "1", "--keepalive", "2", "--mqtt-version", "3.1.1"])
    try:
        fed.start_coordinator()
        wait_for("the coordinator connected", lambda: "as fledger-coordinator-test (" in log_text(fed, "coordinator"),
                 60, fed)
        assert proxy.stall() == 1  # the coordinator hears nothing from now on: no registration, no update
        for i in range(len(fed.devices)):
            fed.start_agent(i)
        wait_for("the coordinator to notice and reconnect",
                 lambda: ECHO_LOST in log_text(fed, "coordinator"), 60, fed)
        for device in fed.devices:
            wait_for(f"{device} connected", lambda d=device: f"as fledger-agent-{d} (" in log_text(fed, d), 60, fed)
        proxy.stall()  # now the agents too (and the coordinator's new connection)
        for device in fed.devices:
            wait_for(f"{device} to notice and reconnect", lambda d=device: ECHO_LOST in log_text(fed, d), 60, fed)
        finish(fed, 120)
    finally:
        fed.stop()
    assert proxy.dropped[PUBLISH] > 0 and sum(proxy.passed_while_stalled.values()) > 0  # alive, but no data
    check_final_ledger(fed, 2, list(fed.devices))
