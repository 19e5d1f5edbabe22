"""Configuration: defaults < TOML file < FLEDGER_* environment < command-line flags.

Each setting is a dataclass field whose ``metadata["help"]`` is the text of its ``--flag``,
so ``--help`` always explains every option and the three sources cannot drift apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    pass


TABLES = ("broker", "coordinator", "agent", "monitor")  # one file may serve every role


def setting(default: Any, help: str, *, secret_file: bool = False) -> Any:
    return dataclasses.field(default=default, metadata={"help": help, "secret_file": secret_file})


def _base_type(annotation: Any) -> type:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _base_type(args[0])
    return annotation if isinstance(annotation, type) else str


def _convert(kind: type, raw: Any, name: str) -> Any:
    if raw is None:
        return None
    try:
        if kind is bool:
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if kind is Path:
            return Path(raw).expanduser()
        if kind is int:
            # TOML gives 2.9 or true; int() would quietly make them 2 and 1
            if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
                raise ValueError(raw)
            return int(raw)
        if kind is float:
            if isinstance(raw, bool):
                raise ValueError(raw)
            value = float(raw)
            if not math.isfinite(value):  # a NaN deadline never passes; Inf is what 0 means
                raise ConfigError(f"setting {name}: {raw!r} is not a finite number")
            return value
        return kind(raw)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"setting {name}: cannot read {raw!r} as {kind.__name__}") from exc


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One ``--flag`` per field; defaults stay None so we can tell 'not given'."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = _base_type(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata.get('help', '')} (default: {f.default}; env FLEDGER_{f.name.upper()})"
        if kind is bool:
            parser.add_argument(flag, dest=f.name, default=None, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, default=None, metavar=f.name.upper(), help=help_text)


def load(cls: type[T], args: argparse.Namespace | None, *, section: str, config_file: Path | None = None,
         environ: typing.Mapping[str, str] | None = None) -> T:
    """Build ``cls`` from its defaults, the ``[section]`` of a TOML file, env and flags."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    if config_file is not None:
        try:
            document = tomllib.loads(Path(config_file).read_text())
        except FileNotFoundError as exc:
            raise ConfigError(f"config file not found: {config_file}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {config_file}: {exc}") from exc
        for key, value in document.items():
            if key not in TABLES:
                where = f"table [{key}]" if isinstance(value, dict) else f"setting {key!r} outside any table"
                raise ConfigError(f"config file {config_file}: unknown {where}; settings go in the tables "
                                  f"{', '.join(f'[{t}]' for t in TABLES)}")
        for table_name in ("broker", section):
            table = document.get(table_name, {})
            if not isinstance(table, dict):
                raise ConfigError(f"config file {config_file}: [{table_name}] must be a table")
            for key, raw in table.items():
                name = key.replace("-", "_")
                if name not in names:
                    # A typo must not be silently ignored (e.g. "min_client = 10").
                    raise ConfigError(f"config file {config_file}: unknown setting {key!r} in [{table_name}]; "
                                      f"known: {', '.join(sorted(names))}")
                values[name] = raw
    for name in names:
        env_value = environ.get(f"FLEDGER_{name.upper()}")
        if env_value is not None:
            values[name] = env_value
    if args is not None:
        for name in names:
            flag_value = getattr(args, name, None)
            if flag_value is not None:
                values[name] = flag_value
    converted = {n: _convert(_base_type(hints[n]), v, n) for n, v in values.items()}
    return cls(**converted)


def read_secret(path: Path | None, what: str) -> str | None:
    """Read a one-line secret (e.g. a broker password) from a file, never from argv."""
    if path is None:
        return None
    try:
        return Path(path).read_text().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} file {path}: {exc}") from exc
