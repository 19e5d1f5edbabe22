"""The agent's pin on its fleet's chain (pure rules and the file)."""

from __future__ import annotations

from pathlib import Path

from edge_agent import chain_pin
from edge_agent.chain_pin import ChainPin

PIN = ChainPin("aa" * 32, "11" * 32, 5, 40)


def test_only_a_continuation_of_the_pinned_chain_is_followed(tmp_path: Path) -> None:
    assert chain_pin.judge(None, PIN) is None
    assert chain_pin.judge(PIN, ChainPin("aa" * 32, "11" * 32, 6, 45)) is None
    assert chain_pin.judge(PIN, ChainPin("aa" * 32, "", 5, 40)) is None  # a coordinator that does not say
    assert "new chain" in str(chain_pin.judge(PIN, ChainPin("aa" * 32, "22" * 32, 9, 90)))
    assert "backwards from round 5" in str(chain_pin.judge(PIN, ChainPin("aa" * 32, "11" * 32, 3, 20)))
    assert "backwards" in str(chain_pin.judge(PIN, ChainPin("aa" * 32, "11" * 32, 5, 39)))
    assert "different coordinator key" in str(chain_pin.judge(PIN, ChainPin("bb" * 32, "11" * 32, 6, 45)))
    assert chain_pin.advance(PIN, ChainPin("aa" * 32, "11" * 32, 6, 45)) == ChainPin("aa" * 32, "11" * 32, 6, 45)
    reset = ChainPin("aa" * 32, "22" * 32, 1, 3)
    assert chain_pin.advance(PIN, reset) == reset  # an accepted reset re-pins
    chain_pin.save(tmp_path, PIN)
    assert chain_pin.load(tmp_path) == PIN
    (tmp_path / chain_pin.FILE).write_text("{broken")
    assert chain_pin.load(tmp_path) is None
