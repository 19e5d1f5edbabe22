"""The edge agent's settings (defaults < TOML < FLEDGER_* environment < flags).

Apart from the daemon so that `fledger agent --help` builds its parser without loading the
crypto, the envelope or torch; bench/startup.py checks its start-up cost.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from federation.config import setting
from federation.mqtt import BrokerConfig
from federation.observability import MetricsConfig


@dataclass
class AgentConfig(MetricsConfig, BrokerConfig):
    bundle: Path = setting(Path("keys/device.json"), "this device's key bundle (from `fledger keys add-device`)")
    task: str = setting("california", "task: california, mnist, or csv (your own file, see --data)")
    data: Path | None = setting(None, "for task csv: path of the local CSV file")
    target: str | None = setting(None, "for task csv: name of the target column")
    shard: str = setting("0/1", "which IID part of the data set this device holds, as i/n (demo data)")
    limit: int = setting(0, "use at most this many training samples (0: all; for quick tests)")
    state_dir: Path = setting(Path("state/agent"), "directory for the outbox and the scaler")
    threads: int = setting(1, "torch threads (several agents on one machine compete for cores)")
    seed: int = setting(0, "seed for local training")
    resend_interval: float = setting(20.0, "seconds before an unacknowledged update is sent again")
    heartbeat: float = setting(15.0, "seconds between presence heartbeats; if not even our own comes back for 4 "
                                     "of them while the broker still answers pings, reconnect")
    exit_when_done: bool = setting(True, "exit once the coordinator says training is finished")
    client_id: str = setting("", "MQTT client id (default: fledger-agent-<device>)")
    reregister: bool = setting(False, "register changed local data instead of refusing to train on it")
    accept_reset: bool = setting(False, "follow a coordinator that started a new chain or went back to an earlier "
                                        "round (an intended reset; otherwise the agent logs an ERROR and waits)")
