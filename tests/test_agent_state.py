"""The agent's record of the last round it trained: a restart must never refuse to start
because of it, and never forget a round it can read."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from edge_agent.agent import _read_round


@pytest.mark.parametrize("content, expected", [(None, 0), ("7", 7), ("12\n", 12), ("", 0), ("x7", 0), ("-3", 0)])
def test_last_trained_round_is_read_or_safely_zero(tmp_path: Path, content: str | None, expected: int,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "last_trained_round"
    if content is not None:
        path.write_text(content)
    with caplog.at_level(logging.WARNING):
        assert _read_round(path) == expected
    garbled = content is not None and not content.strip().lstrip("-").isdigit()
    assert garbled == any("not a round number" in r.getMessage() for r in caplog.records)
