"""The ``fledger`` command: broker, coordinator, agent, keys, ledger and demo.

Start-up is cheap: the parser registers only the command being run (``fledger --help`` lists
them all from :data:`COMMANDS` without importing any), and torch is imported only where a model
is trained or evaluated. ``bench/startup.py`` measures it.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import importlib
import io
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from federation import config as cfg
from federation import exit_codes
from fledger import __version__, logs

log = logging.getLogger("fledger")

DESCRIPTION = """Federated learning for IoT fleets over MQTT, with a verifiable ledger of every model update.

Settings come from defaults < a TOML file (--config; table [coordinator] or [agent], plus
[broker] shared by both) < FLEDGER_<NAME> environment variables < command-line flags.

exit codes (every command):
""" + "\n".join(f"  {code:>3}  {text}" for code, text in exit_codes.MEANING.items())


def _cmd_broker(args: argparse.Namespace) -> int:
    import signal
    import threading

    import amqtt  # noqa: F401  (missing: a one-line "install the broker extra", not a traceback)

    from fledger import keytool
    from fledger.broker import EmbeddedBroker

    password_file = args.password_file
    if password_file is None and not args.anonymous:
        password_file = keytool.broker_password_db(args.keys)
        if not password_file.exists():
            raise cfg.ConfigError(f"no broker password file {password_file}: run `fledger keys --dir {args.keys} "
                                  "init` (or give --password-file), or --anonymous for a test broker without "
                                  "logins or access control")
    if args.anonymous:
        if password_file is not None or args.acl_file is not None:
            raise cfg.ConfigError("--anonymous has no user names, so no --password-file or --acl-file")
        log.warning("anonymous broker: no logins and NO access control (any client may publish anything); "
                    "for tests only")
    clients: tuple[str, ...] = ()
    if not args.anonymous and args.password_file is None:  # the fleet's logins: its prediction clients too
        clients = keytool.active_clients(args.keys)
    broker = EmbeddedBroker(args.host, args.port, password_file, args.acl_file, clients).start()
    mode = "anonymous, no access control" if args.anonymous else \
        f"logins from {password_file}, ACL {args.acl_file or 'fledger/fledger.acl'}" + \
        (f" with prediction clients {', '.join(clients)}" if clients else "")
    print(f"embedded MQTT broker on {broker.host}:{broker.port} ({mode}; Ctrl-C to stop)", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    signal.signal(signal.SIGHUP, lambda *_: log.info("SIGHUP: the embedded broker has nothing to reload"))
    stop.wait()
    broker.stop()
    return 0


def _cmd_coordinator(args: argparse.Namespace) -> int:
    from coordinator import daemon
    from coordinator.config import CoordinatorConfig

    config = cfg.load(CoordinatorConfig, args, section="coordinator", config_file=args.config)
    return daemon.run(config)


def _cmd_agent(args: argparse.Namespace) -> int:
    from edge_agent import daemon
    from edge_agent.config import AgentConfig

    config = cfg.load(AgentConfig, args, section="agent", config_file=args.config)
    return daemon.run(config)


def _add_broker(sub: Any) -> None:
    p = sub.add_parser("broker", help=COMMANDS["broker"][0],
                       description="Run the embedded pure-Python MQTT broker (for laptops and tests; "
                                   "use mosquitto in production, see deploy/). It checks logins against the "
                                   "fleet's password file (made by `fledger keys init` and `add-device`) and "
                                   "enforces the same ACL as the mosquitto deployment (fledger/fledger.acl). "
                                   "Needs the broker extra: pip install 'fledger[broker]'.")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=1883, help="TCP port (default: 1883)")
    p.add_argument("--keys", type=Path, default=Path("keys"),
                   help="the fleet's key directory: its broker/passwords is used unless --password-file is "
                        "given (default: ./keys)")
    p.add_argument("--password-file", type=Path, default=None,
                   help="amqtt password file (user:argon2-hash lines; see `fledger keys broker-password`)")
    p.add_argument("--acl-file", type=Path, default=None,
                   help="mosquitto-format ACL file to enforce (default: fledger's, as deploy/mosquitto ships)")
    p.add_argument("--anonymous", action="store_true",
                   help="no logins and no access control: any client may publish anything (tests only)")
    p.set_defaults(func=_cmd_broker)


def _add_role(sub: Any, name: str, config_cls: type, func: Any) -> None:
    text = COMMANDS[name][0]
    p = sub.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
    p.add_argument("--config", type=Path, default=None, help="TOML configuration file")
    cfg.add_arguments(p, config_cls)
    p.set_defaults(func=func)


def _add_coordinator(sub: Any) -> None:
    from coordinator.config import CoordinatorConfig

    _add_role(sub, "coordinator", CoordinatorConfig, _cmd_coordinator)


def _add_agent(sub: Any) -> None:
    from edge_agent.config import AgentConfig

    _add_role(sub, "agent", AgentConfig, _cmd_agent)


def _module_parser(module: str) -> Any:
    return lambda sub: importlib.import_module(module).add_parser(sub)


# name -> (one-line help, registers the full subparser). Only the chosen command's parser is
# built, so `fledger keys ...` never imports the coordinator, the agent or torch.
COMMANDS: dict[str, tuple[str, Any]] = {
    "broker": ("run the embedded MQTT broker (amqtt)", _add_broker),
    "coordinator": ("run the coordinator: check updates, aggregate rounds, write the ledger, publish the model",
                    _add_coordinator),
    "agent": ("run an edge agent: train on local data, send signed, encrypted updates", _add_agent),
    "keys": ("create fleet and device keys", _module_parser("fledger.keytool")),
    "ledger": ("verify, show, prove or follow a ledger", _module_parser("fledger.ledger_cli")),
    "status": ("the fleet from the coordinator's signed status (round, devices, rejections, ledger head)",
               _module_parser("fledger.status_cli")),
    "report": ("PNG plots of a run from the ledger and saved models", _module_parser("fledger.report")),
    "credits": ("pay-per-prediction accounts: deposit, withdraw, balance, receipt",
                _module_parser("fledger.credits_cli")),
    "predict": ("predict with a saved global model, or ask the fleet's prediction service (--remote)",
                _module_parser("fledger.predict")),
    "restore-model": ("republish a ledger-recorded earlier global model as the next round (undo a poisoned round)",
                      _module_parser("fledger.restore_cli")),
    "demo": ("run broker, coordinator and two agents on California Housing and MNIST",
             _module_parser("fledger.demo")),
}


def _chosen_command(argv: Sequence[str]) -> str | None:
    """The subcommand named in ``argv`` (the first word that is not a global option or its value)."""
    takes_value = {"--log-level", "--log-format"}
    words = iter(argv)
    for word in words:
        if word in takes_value:
            next(words, None)
        elif not word.startswith("-"):
            return word
    return None


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser; given ``argv``, only the command it names is fully registered (fast start-up)."""
    parser = argparse.ArgumentParser(prog="fledger", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"fledger {__version__}")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR (default: INFO)")
    parser.add_argument("--log-format", choices=logs.FORMATS, default=os.environ.get("FLEDGER_LOG_FORMAT", "text"),
                        help="text (ISO 8601 UTC timestamps) or json (one object a line); under systemd each "
                             "line also carries its journald priority (default: text; env FLEDGER_LOG_FORMAT)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = None if argv is None else _chosen_command(argv)
    for name, (text, register) in COMMANDS.items():
        if argv is None or name == chosen:
            register(sub)
        else:
            sub.add_parser(name, help=text, add_help=False)  # listed in --help; never parsed
    return parser


def exit_code_for(exc: BaseException) -> int:
    """The documented exit code (federation/exit_codes.py) for an error no command handled."""
    from coordinator.storage import StorageError
    from ledger import LedgerError
    from ledger.storage import LedgerCorrupt
    from ledger.verify import VerifyError

    if isinstance(exc, KeyboardInterrupt):
        return exit_codes.INTERRUPTED
    if isinstance(exc, (LedgerCorrupt, VerifyError)):
        return exit_codes.TAMPERED
    if isinstance(exc, StorageError):
        return exit_codes.STATE
    if isinstance(exc, TimeoutError):
        return exit_codes.TIMEOUT
    if isinstance(exc, ConnectionError):
        return exit_codes.UNREACHABLE
    if isinstance(exc, (ValueError, OSError, ImportError, LedgerError)) or type(exc).__name__ == "DatasetError":
        return exit_codes.USAGE
    return exit_codes.INTERNAL


def _missing_extra(exc: ImportError) -> str:
    extra = {"torch": "train", "amqtt": "broker", "zarr": "mnist", "pure_ml": "mnist"}
    name = (exc.name or "").split(".")[0]
    if name in extra:
        return (f"this command needs {name}, which is not installed: pip install 'fledger[{extra[name]}]' "
                "(see README, Install)")
    return str(exc)


def main(argv: list[str] | None = None) -> int:
    # A crash in native code (torch, ssl) still leaves a traceback in the log. (Not possible when
    # stderr is no real file, as under an in-process test's capture.)
    with contextlib.suppress(io.UnsupportedOperation, AttributeError, ValueError):
        faulthandler.enable()
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    logs.setup(args.log_level, args.log_format)
    try:
        result: Any = args.func(args)
    except KeyboardInterrupt:
        return exit_codes.INTERRUPTED
    except Exception as exc:
        code = exit_code_for(exc)
        if code == exit_codes.INTERNAL:
            log.exception("internal error (a bug; please report it with this log)")
        else:
            log.error("%s", _missing_extra(exc) if isinstance(exc, ImportError) else exc)
        return code
    return int(result or 0)


def entry() -> None:
    """The ``fledger`` program (console script and ``python -m fledger.cli``)."""
    argv = sys.argv[1:]
    code = main(argv)
    if _chosen_command(argv) == "agent":
        # The agent has saved its state (outbox and last round written and fsynced) and closed its
        # link. With torch loaded the interpreter's teardown alone takes ~3 s on a small or busy
        # machine, and SIGTERM must end the service within 5 s: skip it.
        logging.shutdown()
        with contextlib.suppress(OSError, ValueError):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
