"""``fledger restore-model``: undo poisoned rounds by republishing an earlier global model.

    fledger keys revoke pump-07                       # first stop the hostile device
    fledger restore-model --config coordinator.toml --round 12 --reason "pump-07 poisoned 13-15" --wait 30

Checks now that the ledger records a global model for that round and that the saved model
file is exactly it (SHA-256), then leaves a request in the coordinator's state directory.
The running coordinator applies it within 2 s (at once on SIGHUP); a stopped one at its next
start. It republishes that model as the next round (a new, higher round; agents follow it) and
records a signed ``model.published`` block naming the restored round. See docs/robustness.md.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from coordinator import restore
from coordinator.storage import ModelStore
from federation import config as cfg
from federation import exit_codes
from federation.fleet_state import FleetState


def add_parser(sub: Any) -> None:
    p = sub.add_parser("restore-model", help="republish an earlier, ledger-recorded global model as the next round",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=None, help="the coordinator's TOML file (for its state_dir)")
    p.add_argument("--state-dir", type=Path, default=None, help="the coordinator's state directory "
                   "(default: from --config, FLEDGER_STATE_DIR, or state/coordinator)")
    p.add_argument("--round", type=int, required=True, help="the round whose global model is republished")
    p.add_argument("--reason", default="restored by the operator", help="recorded in the ledger")
    p.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                   help="wait until the coordinator has recorded the restore (exit 3 if it has not by then); "
                        "default: do not wait")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from coordinator.config import CoordinatorConfig

    state_dir = Path(cfg.load(CoordinatorConfig, args, section="coordinator", config_file=args.config).state_dir)
    ledger_path = state_dir / "ledger.log"
    if not ledger_path.exists():
        print(f"error: no ledger at {ledger_path}: is {state_dir} the coordinator's state directory?")
        return exit_codes.USAGE
    blocks = restore.read_blocks(ledger_path)
    fleet = FleetState.of(blocks)
    open_round = max((r for r, info in fleet.rounds.items() if info.opened_at is not None), default=1)
    if args.round > open_round:
        print(f"error: round {args.round} is not before the open round {open_round}")
        return exit_codes.USAGE
    try:
        restore.checked_model(ModelStore(state_dir / "models"), fleet.published_models, args.round)
    except restore.RestoreError as exc:
        print(f"error: {exc}")
        # A saved model that differs from the ledger's is corruption or tampering; else a usage error.
        return exit_codes.TAMPERED if isinstance(exc, restore.ModelMismatch) else exit_codes.USAGE
    request = restore.write_request(state_dir, args.round, args.reason)
    print(f"restore of round {args.round}'s model requested ({restore.request_path(state_dir)}); the running "
          "coordinator applies it within 2 s (at once on SIGHUP), a stopped one at its next start")
    if args.wait <= 0:
        return exit_codes.OK
    deadline = time.monotonic() + args.wait
    while time.monotonic() < deadline:
        for block in restore.read_blocks(ledger_path)[len(blocks) - 1:]:
            if block.data.get("request_id") == request.request_id:
                print(f"restored: round {block.data['round']} trains from round {args.round}'s model "
                      f"(ledger block {block.index})")
                return exit_codes.OK
        refused = restore.request_path(state_dir).with_name(restore.REQUEST_FILE + ".refused.txt")
        if not restore.request_path(state_dir).exists() and refused.exists():
            print(f"error: the coordinator refused the restore: {refused.read_text().strip()}")
            return exit_codes.USAGE
        time.sleep(0.5)
    print(f"error: not recorded within {args.wait:g} s (is the coordinator running?); the request stays pending")
    return exit_codes.TIMEOUT
