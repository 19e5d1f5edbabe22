"""The coordinator's settings (defaults < TOML < FLEDGER_* environment < flags), and their checks.

Each setting is checked on its own here (:func:`check_settings`, and the builders of what the
parts take: :func:`round_policy`, :func:`strategy_params`, :func:`replay_limits`,
:func:`catch_up_limits`), before the daemon opens a file or connects; a gateway's upstream
broker by :func:`upstream_address`.

Apart from the daemon so that `fledger coordinator --help` builds its parser without loading the
ledger, the crypto or the service (only numpy and paho, for defaults shared with them);
bench/startup.py checks its start-up cost.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from coordinator.aggregation import DEFAULT_STRATEGY, STRATEGIES, StrategyParams
from coordinator.catch_up import CatchUpLimits
from coordinator.dashboard import DashboardConfig
from coordinator.replay import ReplayLimits
from coordinator.rounds import MODES, RoundPolicy
from coordinator.stopping import CENTRAL_TEST_SETS, stop_target
from federation.config import ConfigError, setting
from federation.mqtt import BrokerConfig
from federation.observability import MetricsConfig

DEFAULT_REPLAY_BATCH = 10_000  # ledger blocks per replay request: bounded, the monitor asks again


@dataclass
class CoordinatorConfig(DashboardConfig, MetricsConfig, BrokerConfig):
    fleet: str = setting("demo", "fleet name (a topic level; letters, digits, '_' and '-')")
    state_dir: Path = setting(Path("state/coordinator"), "directory for ledger, models and spool")
    keys: Path = setting(Path("keys/coordinator.json"), "coordinator key file (from `fledger keys init`)")
    devices: Path = setting(Path("keys/devices.json"), "device registry (public keys; `fledger keys add-device`); "
                                                       "re-read every 2 s and on SIGHUP: changes apply live")
    task: str = setting("california", "model/task: california, mnist, or csv")
    csv_features: int = setting(0, "for task csv: number of feature columns of the model")
    min_clients: int = setting(2, "aggregate a round as soon as this many updates are in")
    quorum: int = setting(1, "after the deadline, aggregate with at least this many updates")
    mode: str = setting("rounds", "rounds (synchronous: every update belongs to the open round) or async "
                                  "(FedBuff: aggregate every --buffer updates, whatever model version each "
                                  "trained from, stale ones down-weighted by 1/sqrt(1+staleness))")
    buffer: int = setting(0, "async: aggregate once this many updates are in (0: --min-clients)")
    max_staleness: int = setting(4, "async: refuse (too_stale) an update trained from a model more than this many "
                                    "versions behind the current one")
    upstream: str = setting("", "HOST:PORT of an upstream coordinator's broker: this coordinator is then a gateway, "
                                "a device of that fleet (--upstream-bundle): each round's aggregate goes upstream "
                                "as one update, and the upstream's next model is the next round's (empty: none)")
    upstream_bundle: Path | None = setting(None, "the device bundle (fledger keys add-device of the upstream fleet) "
                                                 "this gateway uses upstream")
    upstream_username: str | None = setting(None, "MQTT user name on the upstream broker")
    upstream_password_file: Path | None = setting(None, "file holding the MQTT password on the upstream broker")
    round_deadline: float = setting(300.0, "seconds a round stays open before a quorum may close it (0: none)")
    keep_models: int = setting(10, "keep the model files of this many latest rounds, plus any the ledger marks as "
                                   "restore targets (0: keep all); the ledger keeps every model's hash")
    deadline_factor: float = setting(1.5, "adaptive deadline: a round stays open at least this many times the "
                                          "90th percentile of the devices' reported training times (0: fixed)")
    round_deadline_max: float = setting(0.0, "upper bound of the adaptive deadline (0: 10 x round_deadline)")
    rounds: int = setting(0, "stop after this many rounds (0: run until stopped)")
    stop_at: str = setting("", "stop once a round's model reaches this target, e.g. test_mse<=0.25 or "
                               "test_accuracy>=0.98 (test_*: --evaluate; clients_*: mean of what the devices "
                               "report); the metric as the ledger's aggregate record names it (empty: none)")
    strategy: str = setting(DEFAULT_STRATEGY, "aggregation: clipped-fedavg (FedAvg with each update's distance from "
                            "the global model bounded), median, trimmed-mean, krum, multi-krum, or the unbounded "
                            "fedavg and mean (trusted fleets only); see docs/robustness.md")
    clip_factor: float = setting(StrategyParams.clip_factor, "clipped-fedavg: clip updates farther from the global "
                                 "model than this x the round's median distance, and cap sample counts at this x "
                                 "the median count (0: off)")
    exclude_factor: float = setting(StrategyParams.exclude_factor, "clipped-fedavg: leave out updates farther than "
                                    "this x the median distance (0: never; else >= 1 and >= clip_factor)")
    clip_norm: float = setting(StrategyParams.clip_norm, "clipped-fedavg: absolute bound on an update's L2 distance "
                               "from the global model (0: none)")
    trim_fraction: float = setting(StrategyParams.trim_fraction, "trimmed-mean: fraction of values cut at each end, "
                                   "per coordinate (0 to < 0.5)")
    krum_byzantine: int = setting(StrategyParams.byzantine, "krum, multi-krum: hostile updates tolerated "
                                  "(-1: the most possible, (n - 3) // 2)")
    krum_select: int = setting(StrategyParams.krum_select, "multi-krum: updates averaged (0: n - krum_byzantine)")
    max_update_bytes: int = setting(64 * 1024 * 1024, "largest update accepted, checked before decoding")
    difficulty: int = setting(0, "ledger proof of work: leading zero bits per block (0: off)")
    evaluate: bool = setting(False, "evaluate each new global model on the task's held-out test set")
    seed: int = setting(0, "seed for the initial model")
    client_id: str = setting("", "MQTT client id (default: fledger-coordinator-<fleet>)")
    replay_batch: int = setting(DEFAULT_REPLAY_BATCH, "ledger blocks sent per replay request from a monitor "
                                                      "(it asks again for the rest)")
    replay_bytes: int = setting(ReplayLimits.max_bytes, "bytes of blocks sent per replay request at most")
    replay_interval: float = setting(ReplayLimits.interval_s, "seconds between two served replay requests of one "
                                                              "requester (others are counted and dropped)")
    replay_requester_window_bytes: int = setting(ReplayLimits.requester_window_bytes,
                                                 "bytes of replayed blocks per requester per 10 s window")
    replay_window_bytes: int = setting(ReplayLimits.window_bytes,
                                       "bytes of replayed blocks for all requesters together per 10 s window")
    catch_up_interval: float = setting(CatchUpLimits.interval_s, "seconds between two served catch-up requests of "
                                       "one requester (others are counted and dropped; agents retry after 5 s, "
                                       "doubling)")
    catch_up_window_requests: int = setting(CatchUpLimits.window_requests, "catch-up requests served per 10 s window, "
                                            "all requesters together (a fleet rejoining at once)")
    catch_up_window_bytes: int = setting(CatchUpLimits.window_bytes, "bytes of catch-up answers (models, status, "
                                         "ledger head) per 10 s window, all requesters together; keep it above "
                                         "the model message's size")
    presence_timeout: float = setting(45.0, "mark a device offline after this many seconds without a heartbeat "
                                            "(0: only its Last Will)")
    new_chain: bool = setting(False, "start a new ledger in an empty state directory although the broker shows "
                                     "this fleet's earlier chain (every agent must then accept the reset; refused "
                                     "while models of the old chain are there; no effect on an existing ledger)")
    head_wait: float = setting(3.0, "seconds to wait at start for the fleet's retained ledger head on the broker "
                                    "(compared with the local ledger: a coordinator never starts behind it)")
    heartbeat: float = setting(15.0, "seconds between status republications; if not even our own status comes "
                                     "back for 4 of them while the broker still answers pings, reconnect")

    clients: Path = setting(Path("keys/clients.json"), "prediction client registry (`fledger keys add-client`); "
                                                       "re-read every 2 s and on SIGHUP")
    predict_fee: int = setting(1, "fee of a prediction in the smallest unit (integer), see --predict-fee-per")
    predict_fee_per: str = setting("request", "charge the fee per 'request' or per 'row'")
    predict_max_rows: int = setting(1024, "most rows (or images) in one prediction request")
    predict_max_bytes: int = setting(1 << 20, "largest prediction request accepted, checked before decoding")
    predict_scaler: Path | None = setting(None, "an agent's scaler.json: maps prediction inputs and outputs to "
                                                "original units (required for task csv; california's is "
                                                "computed from the vendored data)")


def replay_limits(config: CoordinatorConfig) -> ReplayLimits:
    """The replay bounds, checked (ValueError: each must be > 0) before anything is opened."""
    return ReplayLimits(interval_s=config.replay_interval, max_blocks=config.replay_batch,
                        max_bytes=config.replay_bytes, requester_window_bytes=config.replay_requester_window_bytes,
                        window_bytes=config.replay_window_bytes).check()


def catch_up_limits(config: CoordinatorConfig) -> CatchUpLimits:
    """The catch-up bounds, checked (ValueError: each must be > 0) before anything is opened."""
    return CatchUpLimits(interval_s=config.catch_up_interval, window_requests=config.catch_up_window_requests,
                         window_bytes=config.catch_up_window_bytes).check()


def round_policy(config: CoordinatorConfig) -> RoundPolicy:
    """The round settings, checked (ValueError) before anything is opened or connected."""
    if not config.heartbeat > 0:
        raise ValueError(f"heartbeat must be > 0 seconds, not {config.heartbeat}")
    if config.quorum > config.min_clients:
        raise ValueError(f"quorum ({config.quorum}) cannot exceed min_clients ({config.min_clients}): a round "
                         "closes as soon as min_clients updates are in")
    if config.mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, not {config.mode!r}")
    if config.buffer < 0 or config.max_staleness < 0:
        raise ValueError("buffer and max_staleness must be >= 0")
    if config.keep_models < 0:
        raise ValueError(f"keep_models must be >= 0 (0: keep every model file), not {config.keep_models}")
    size = config.buffer if config.mode == "async" and config.buffer else config.min_clients
    return RoundPolicy(size, min(config.quorum, size), config.round_deadline, config.deadline_factor,
                       config.round_deadline_max)


def strategy_params(config: CoordinatorConfig) -> StrategyParams:
    """The strategy and its settings, checked (ValueError) before anything is opened."""
    if config.strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {config.strategy!r}; choose from {', '.join(sorted(STRATEGIES))}")
    return StrategyParams(clip_factor=config.clip_factor, exclude_factor=config.exclude_factor,
                          clip_norm=config.clip_norm, trim_fraction=config.trim_fraction,
                          byzantine=config.krum_byzantine, krum_select=config.krum_select)


def check_settings(config: CoordinatorConfig) -> None:
    """Every setting that can be checked without opening a file (ValueError, ConfigError)."""
    round_policy(config)
    strategy_params(config)
    catch_up_limits(config)
    replay_limits(config)
    if config.evaluate and config.task not in CENTRAL_TEST_SETS:
        raise ConfigError(f"--evaluate: the coordinator has no test set for task {config.task} (its data is on the "
                          "devices); leave --evaluate off and watch the devices' clients_* metrics instead")
    stop_target(config.stop_at, task=config.task, evaluates=config.evaluate)


def upstream_address(config: CoordinatorConfig) -> tuple[str, int]:
    """A gateway's upstream broker (``--upstream HOST:PORT``, with ``--upstream-bundle``), checked (ConfigError)."""
    if config.upstream_bundle is None:
        raise ConfigError("--upstream needs --upstream-bundle (this gateway's device bundle of the upstream fleet)")
    host, _, port = config.upstream.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--upstream must be HOST:PORT, not {config.upstream!r}")
    return host, int(port)
