"""`fledger restore-model`: checks the request against the ledger and the saved model file at
once (clear errors, documented exit codes), and the coordinator applies it exactly once."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from test_coordinator import Harness, weights

from coordinator import restore
from coordinator.restore import apply_request
from federation import exit_codes
from fledger.cli import main


def test_restore_model_command_checks_then_the_coordinator_applies_it_once(tmp_path: Path,
                                                                           capsys: object) -> None:
    h = Harness(tmp_path)
    assert h.send("dev-a", h.update("dev-a", 1, weights(1.0))).accepted
    assert h.send("dev-b", h.update("dev-b", 1, weights(1.0))).accepted  # round 2 is open
    state = ["restore-model", "--state-dir", str(tmp_path)]
    assert main([*state, "--round", "7"]) == exit_codes.USAGE  # not before the open round
    assert main([*state, "--round", "0"]) == exit_codes.USAGE  # no model recorded for it
    assert main(["restore-model", "--state-dir", str(tmp_path / "nowhere"), "--round", "1"]) == exit_codes.USAGE
    assert not restore.request_path(tmp_path).exists()
    good = h.coordinator.models.path(1).read_bytes()
    h.coordinator.models.save(1, weights(5.0))  # the saved file is not the ledger's model
    assert main([*state, "--round", "1"]) == exit_codes.TAMPERED
    h.coordinator.models.path(1).write_bytes(good)
    assert main([*state, "--round", "1", "--reason", "test", "--wait", "0.5"]) == exit_codes.TIMEOUT  # none runs
    request = restore.read_request(tmp_path)
    assert request is not None and (request.round, request.reason) == (1, "test")

    apply_request(h.coordinator, tmp_path)  # what the daemon does every 2 s and on SIGHUP
    assert not restore.request_path(tmp_path).exists()
    assert h.coordinator.round is not None and h.coordinator.round.number == 3
    np.testing.assert_allclose(h.coordinator.global_model["w"], 0.0)  # round 1's (initial) model
    restore.atomic_write(restore.request_path(tmp_path), json.dumps(request.to_json()).encode())
    apply_request(h.coordinator, tmp_path)  # the same request again (a crash before removal)
    assert h.coordinator.round.number == 3 and not restore.request_path(tmp_path).exists()
    restore.atomic_write(restore.request_path(tmp_path), b'{"round": 99, "reason": "x", "request_id": "y"}')
    apply_request(h.coordinator, tmp_path)  # refused: kept aside with the reason
    refused = tmp_path / (restore.REQUEST_FILE + ".refused.txt")
    assert "not before the open round" in refused.read_text() and h.coordinator.round.number == 3
