"""The demo prints fleet lines only: library noise (the embedded broker's tracebacks) goes to its log file."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from fledger.demo import LIBRARY_LOGGERS, send_library_logs_to


@pytest.fixture
def restore_loggers() -> Iterator[None]:
    saved = {name: (list(logging.getLogger(name).handlers), logging.getLogger(name).propagate)
             for name in LIBRARY_LOGGERS}
    yield
    for name, (handlers, propagate) in saved.items():
        logger = logging.getLogger(name)
        for handler in logger.handlers:
            if handler not in handlers:
                handler.close()
        logger.handlers, logger.propagate = handlers, propagate


def test_a_broker_traceback_lands_in_the_named_log_file_not_on_the_terminal(
        tmp_path: Path, restore_loggers: None) -> None:
    terminal = io.StringIO()  # the demo's terminal: the CLI's handler on the root logger
    root_handler = logging.StreamHandler(terminal)
    logging.getLogger().addHandler(root_handler)
    try:
        logging.getLogger("fledger").warning("a fleet line")  # reaches the terminal, as it should
        send_library_logs_to(tmp_path / "logs" / "broker.log")
        try:
            raise TimeoutError("Timeout waiting for PUBACK")
        except TimeoutError:
            logging.getLogger("amqtt.session").exception("Unhandled exception in reader coro")
        logging.getLogger("federation.mqtt").warning("disconnected from broker; reconnecting")
    finally:
        logging.getLogger().removeHandler(root_handler)
    assert terminal.getvalue() == "a fleet line\n"
    text = (tmp_path / "logs" / "broker.log").read_text()
    assert "Timeout waiting for PUBACK" in text and "Traceback" in text and "reconnecting" in text
