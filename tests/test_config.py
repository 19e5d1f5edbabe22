"""Settings: defaults < TOML file < FLEDGER_* environment < flags; every option explained in --help."""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from coordinator.config import CoordinatorConfig
from edge_agent.daemon import AgentConfig
from federation import config as cfg


def parse(cls: type, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cfg.add_arguments(parser, cls)
    return parser.parse_args(argv)


def test_precedence(tmp_path: Path) -> None:
    toml = tmp_path / "fledger.toml"
    toml.write_text('[broker]\nbroker_port = 1999\n\n[coordinator]\nmin_clients = 5\nfleet = "plant7"\n'
                    'evaluate = true\nround-deadline = 12.5\n')
    env = {"FLEDGER_MIN_CLIENTS": "7", "FLEDGER_QUORUM": "3"}
    config = cfg.load(CoordinatorConfig, parse(CoordinatorConfig, ["--quorum", "2"]), section="coordinator",
                      config_file=toml, environ=env)
    assert config.broker_port == 1999  # [broker] is shared
    assert config.fleet == "plant7" and config.evaluate is True and config.round_deadline == 12.5
    assert config.min_clients == 7  # env beats the file
    assert config.quorum == 2  # flags beat env
    assert config.strategy == "clipped-fedavg"  # default: bounded (issue 13)
    assert isinstance(config.state_dir, Path)


def test_bad_values_give_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(cfg.ConfigError, match="min_clients"):
        cfg.load(CoordinatorConfig, None, section="coordinator", environ={"FLEDGER_MIN_CLIENTS": "two"})
    with pytest.raises(cfg.ConfigError, match="not found"):
        cfg.load(CoordinatorConfig, None, section="coordinator", config_file=tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[coordinator\n")
    with pytest.raises(cfg.ConfigError, match=str(broken)):
        cfg.load(CoordinatorConfig, None, section="coordinator", config_file=broken)


@pytest.mark.parametrize(("command", "cls"), [("coordinator", CoordinatorConfig), ("agent", AgentConfig)])
def test_help_explains_every_option(command: str, cls: type) -> None:
    result = subprocess.run([sys.executable, "-m", "fledger.cli", command, "--help"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for field in dataclasses.fields(cls):
        assert "--" + field.name.replace("_", "-") in text
        assert f"FLEDGER_{field.name.upper()}" in text
        assert field.metadata["help"].split()[0] in text


def test_password_never_on_the_command_line() -> None:
    flags = {f.name for f in dataclasses.fields(AgentConfig)}
    assert "password" not in flags and "password_file" in flags


def test_unknown_settings_are_errors_and_the_shipped_examples_load(tmp_path: Path) -> None:
    typo = tmp_path / "typo.toml"
    typo.write_text("[coordinator]\nmin_client = 10\n")
    with pytest.raises(cfg.ConfigError, match="unknown setting 'min_client'"):
        cfg.load(CoordinatorConfig, None, section="coordinator", config_file=typo)
    deploy = Path(__file__).resolve().parent.parent / "deploy" / "fledger"
    coordinator = cfg.load(CoordinatorConfig, None, section="coordinator", config_file=deploy / "coordinator.toml",
                           environ={})
    assert coordinator.fleet == "plant7" and coordinator.broker_port == 8883 and coordinator.tls_ca is not None
    agent = cfg.load(AgentConfig, None, section="agent", config_file=deploy / "agent.toml", environ={})
    assert agent.task == "csv" and agent.target == "y"


@pytest.mark.parametrize(("text", "message"), [
    ("min_clients = 10\n[coordinator]\nfleet = 'x'\n", "setting 'min_clients' outside any table"),
    ("[coordinater]\nmin_clients = 10\n", r"unknown table \[coordinater\]"),
    ("[coordinator]\nmin_clients = 2.9\n", "min_clients"),
    ("[coordinator]\nmin_clients = true\n", "min_clients"),
    ("[coordinator]\nround_deadline = nan\n", "round_deadline"),
    ("[coordinator]\nround_deadline = inf\n", "round_deadline"),
])
def test_settings_are_never_silently_misread(tmp_path: Path, text: str, message: str) -> None:
    """A misplaced key, a misspelt table, a fraction or a bool for a count, a NaN deadline:
    each used to be dropped or coerced (min_clients 2.9 -> 2, true -> 1, a NaN deadline that
    never passes); each is now an error naming it."""
    path = tmp_path / "fledger.toml"
    path.write_text(text)
    with pytest.raises(cfg.ConfigError, match=message):
        cfg.load(CoordinatorConfig, None, section="coordinator", config_file=path, environ={})
    # The same values from the environment.
    with pytest.raises(cfg.ConfigError, match="round_deadline"):
        cfg.load(CoordinatorConfig, None, section="coordinator", environ={"FLEDGER_ROUND_DEADLINE": "nan"})
    # One file may serve every role: the other roles' tables are fine.
    shared = tmp_path / "shared.toml"
    shared.write_text("[broker]\nbroker_port = 1884\n[agent]\ntask = 'mnist'\n[monitor]\n[coordinator]\nquorum = 1\n")
    assert cfg.load(CoordinatorConfig, None, section="coordinator", config_file=shared, environ={}).broker_port == 1884


def test_quorum_above_min_clients_is_refused() -> None:
    from coordinator.daemon import build_coordinator

    config = cfg.load(CoordinatorConfig, None, section="coordinator",
                      environ={"FLEDGER_MIN_CLIENTS": "2", "FLEDGER_QUORUM": "5"})
    with pytest.raises(ValueError, match=r"quorum \(5\) cannot exceed min_clients \(2\)"):
        build_coordinator(config, lambda *a: None)


def test_strategy_and_its_parameters_from_toml_and_flags(tmp_path: Path) -> None:
    from coordinator.config import strategy_params

    toml = tmp_path / "fledger.toml"
    toml.write_text('[coordinator]\nstrategy = "trimmed-mean"\ntrim_fraction = 0.1\nclip-factor = 4\n')
    config = cfg.load(CoordinatorConfig, parse(CoordinatorConfig, ["--trim-fraction", "0.3", "--krum-select", "5"]),
                      section="coordinator", config_file=toml, environ={})
    params = strategy_params(config)
    assert config.strategy == "trimmed-mean"
    assert (params.trim_fraction, params.clip_factor, params.krum_select) == (0.3, 4.0, 5)
    with pytest.raises(ValueError, match="unknown strategy"):
        strategy_params(dataclasses.replace(config, strategy="avg"))
    with pytest.raises(ValueError, match="trim_fraction"):
        strategy_params(dataclasses.replace(config, trim_fraction=0.5))


def test_async_mode_from_toml_and_flags(tmp_path: Path) -> None:
    from coordinator.config import round_policy

    toml = tmp_path / "fledger.toml"
    toml.write_text('[coordinator]\nmode = "async"\nbuffer = 3\nmax_staleness = 2\nmin_clients = 10\nquorum = 5\n')
    config = cfg.load(CoordinatorConfig, parse(CoordinatorConfig, ["--max-staleness", "6"]), section="coordinator",
                      config_file=toml, environ={})
    assert (config.mode, config.buffer, config.max_staleness) == ("async", 3, 6)
    policy = round_policy(config)
    assert (policy.min_clients, policy.quorum) == (3, 3)  # the buffer size, not min_clients
    with pytest.raises(ValueError, match="mode must be one of rounds, async"):
        round_policy(dataclasses.replace(config, mode="fedbuff"))


def test_catch_up_limits_from_toml_and_flags_and_a_non_positive_one_is_refused(tmp_path: Path) -> None:
    from coordinator.config import catch_up_limits

    toml = tmp_path / "fledger.toml"
    toml.write_text('[coordinator]\ncatch_up_interval = 2.5\ncatch_up_window_bytes = 1048576\n')
    config = cfg.load(CoordinatorConfig, parse(CoordinatorConfig, ["--catch-up-window-requests", "7"]),
                      section="coordinator", config_file=toml, environ={})
    limits = catch_up_limits(config)
    assert (limits.interval_s, limits.window_requests, limits.window_bytes) == (2.5, 7, 1 << 20)
    for name, bad in (("catch_up_interval", 0.0), ("catch_up_window_requests", -1), ("catch_up_window_bytes", 0)):
        with pytest.raises(ValueError, match=f"{name} must be > 0"):
            catch_up_limits(dataclasses.replace(config, **{name: bad}))


def test_a_gateways_upstream_needs_its_bundle_and_host_port(tmp_path: Path) -> None:
    from coordinator.config import upstream_address

    config = cfg.load(CoordinatorConfig, parse(CoordinatorConfig, ["--upstream", "top.example:1883"]),
                      section="coordinator", environ={})
    with pytest.raises(cfg.ConfigError, match="--upstream needs --upstream-bundle"):
        upstream_address(config)
    config = dataclasses.replace(config, upstream_bundle=tmp_path / "bundle.json")
    assert upstream_address(config) == ("top.example", 1883)
    for bad in ("top.example", ":1883", "top.example:port"):
        with pytest.raises(cfg.ConfigError, match="--upstream must be HOST:PORT"):
            upstream_address(dataclasses.replace(config, upstream=bad))
