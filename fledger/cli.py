"""The ``fledger`` command: broker, coordinator, agent, keys, ledger and demo."""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import io
import logging
import sys
from pathlib import Path
from typing import Any

from federation import config as cfg
from ledger import LedgerError

log = logging.getLogger("fledger")

DESCRIPTION = """Federated learning for IoT fleets over MQTT, with a verifiable ledger of every model update.

Settings come from defaults < a TOML file (--config; table [coordinator] or [agent], plus
[broker] shared by both) < FLEDGER_<NAME> environment variables < command-line flags."""


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    # amqtt and paho are chatty at INFO.
    for name in ("amqtt", "transitions", "asyncio"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _cmd_broker(args: argparse.Namespace) -> int:
    import signal
    import threading

    from fledger.broker import EmbeddedBroker

    broker = EmbeddedBroker(args.host, args.port, args.password_file).start()
    print(f"embedded MQTT broker on {broker.host}:{broker.port} (Ctrl-C to stop)", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    broker.stop()
    return 0


def _cmd_coordinator(args: argparse.Namespace) -> int:
    from coordinator import daemon

    config = cfg.load(daemon.CoordinatorConfig, args, section="coordinator", config_file=args.config)
    return daemon.run(config)


def _cmd_agent(args: argparse.Namespace) -> int:
    from edge_agent import daemon

    config = cfg.load(daemon.AgentConfig, args, section="agent", config_file=args.config)
    return daemon.run(config)


def _cmd_keys(args: argparse.Namespace) -> int:
    from fledger import keytool

    return keytool.main(args)


def _cmd_ledger(args: argparse.Namespace) -> int:
    from fledger import ledger_cli

    return ledger_cli.main(args)


def _cmd_demo(args: argparse.Namespace) -> int:
    from fledger import demo

    return demo.main(args)


def build_parser() -> argparse.ArgumentParser:
    from coordinator.daemon import CoordinatorConfig
    from edge_agent.daemon import AgentConfig

    parser = argparse.ArgumentParser(prog="fledger", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR (default: INFO)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("broker", help="run the embedded MQTT broker (amqtt)",
                       description="Run the embedded pure-Python MQTT broker (for laptops and tests; "
                                   "use mosquitto in production, see deploy/).")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=1883, help="TCP port (default: 1883)")
    p.add_argument("--password-file", type=Path, default=None,
                   help="amqtt password file (user:argon2-hash lines; see `fledger keys broker-password`); "
                        "without it the broker is anonymous and persistent sessions are not kept")
    p.set_defaults(func=_cmd_broker)

    for name, config_cls, func, text in (
        ("coordinator", CoordinatorConfig, _cmd_coordinator,
         "run the coordinator: check updates, aggregate rounds, write the ledger, publish the model"),
        ("agent", AgentConfig, _cmd_agent,
         "run an edge agent: train on local data, send signed, encrypted updates"),
    ):
        p = sub.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        p.add_argument("--config", type=Path, default=None, help="TOML configuration file")
        cfg.add_arguments(p, config_cls)
        p.set_defaults(func=func)

    from fledger import credits_cli, keytool, ledger_cli

    keytool.add_parser(sub)
    ledger_cli.add_parser(sub)
    credits_cli.add_parser(sub)

    from fledger import demo, predict

    predict.add_parser(sub)
    demo.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    # A crash in native code (torch, ssl) still leaves a traceback in the log. (Not possible when
    # stderr is no real file, as under an in-process test's capture.)
    with contextlib.suppress(io.UnsupportedOperation, AttributeError, ValueError):
        faulthandler.enable()
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.log_level)
    try:
        result: Any = args.func(args)
    except (cfg.ConfigError, OSError, ValueError, ConnectionError, LedgerError) as exc:
        log.error("%s", exc)
        return 2
    except KeyboardInterrupt:
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
