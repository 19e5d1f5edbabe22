"""Ledger benchmark: verification of a 100,000-block chain and the cost of an append.

    python bench/ledger_bench.py [--blocks 100000] [--sample 5000]

Prints a table and writes bench/results/ledger.json. Everything runs in this one process
(one core). The chain is a realistic mix per round: round.opened, one signed update per
device, aggregate (with Merkle root) and model.published, difficulty 0.

"all signatures" verifies every coordinator and device signature (libsodium, ~0.07 ms each);
it is measured on the whole chain, or for a quicker run on a prefix of --sample blocks and
extrapolated linearly (marked as such in the results).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from federation import records
from federation.fleet_state import FleetLedger, verify_chain, verify_file
from ledger import Ed25519Signer, storage
from ledger.block import Block

RESULTS = Path(__file__).resolve().parent / "results" / "ledger.json"


def build(path: Path, blocks: int, devices: int) -> tuple[float, int]:
    coord = Ed25519Signer(bytes(range(32)))
    signers = [Ed25519Signer(hashlib.sha256(b"dev%d" % i).digest()) for i in range(devices)]
    t = [1.7e9]

    def now() -> float:
        t[0] += 0.001
        return t[0]

    started = time.perf_counter()
    ledger = FleetLedger.open(path, signer=coord, fleet="bench", now=now, sync_every=0)
    for i, s in enumerate(signers):
        ledger.append(records.device_key(f"dev{i}", s.public_key))
    r = 0
    updates = 0
    while ledger.height < blocks:
        r += 1
        ledger.append(records.round_opened(r))
        for i, s in enumerate(signers):
            if ledger.height >= blocks - 2:
                break
            st = records.statement("bench", f"dev{i}", r, s.key_id, hashlib.md5(b"%d.%d" % (r, i)).digest(),
                                   hashlib.sha256(b"w%d.%d" % (r, i)).digest(), 1000 + i,
                                   {"loss": 0.5 / r, "mse": 0.25})
            ledger.append(records.update(st, s.sign(st)))
            updates += 1
        done = ledger.state.rounds.get(r)
        participants = sorted(done.devices) if done else []
        if ledger.height < blocks:
            ledger.append(records.aggregate(r, participants, hashlib.sha256(b"m%d" % r).digest(), "fedavg",
                                            {"test_mse": 0.3}, merkle_root=ledger.state.merkle_root_for(r)))
        if ledger.height < blocks:
            ledger.append(records.model_published(r + 1, hashlib.sha256(b"m%d" % r).digest()))
    ledger.sync()
    ledger.close()
    return time.perf_counter() - started, updates


def timed(fn: Any, repeat: int = 1) -> tuple[float, Any]:
    best, result = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def append_cost(tmp: Path, n: int, sync_every: int) -> float:
    coord = Ed25519Signer(bytes(range(32)))
    path = tmp / f"append-{sync_every}.log"
    ledger = FleetLedger.open(path, signer=coord, fleet="bench", sync_every=sync_every)
    t0 = time.perf_counter()
    for i in range(n):
        ledger.append({"type": "round.opened", "round": i})
    elapsed = time.perf_counter() - t0
    ledger.close()
    return elapsed / n


def checkpoint_cost(path: Path, n: int) -> float:
    """A signed checkpoint of the whole chain (what the coordinator publishes after every block)."""
    with FleetLedger.open(path, signer=Ed25519Signer(bytes(range(32)))) as ledger:
        t0 = time.perf_counter()
        for _ in range(n):
            ledger.signed_checkpoint()
        return (time.perf_counter() - t0) / n


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=100_000, help="chain length to verify (default 100000)")
    parser.add_argument("--devices", type=int, default=4, help="updates per round (default 4)")
    parser.add_argument("--sample", type=int, default=0,
                        help="time all signatures on this many blocks and extrapolate (default 0: the whole chain)")
    parser.add_argument("--appends", type=int, default=2_000, help="appends per append-cost measurement")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"JSON results (default {RESULTS})")
    args = parser.parse_args()

    rows: list[tuple[str, str, str]] = []
    results: dict[str, Any] = {"python": sys.version.split()[0], "machine": platform.machine(),
                               "processor": platform.processor(), "blocks": args.blocks,
                               "updates_per_round": args.devices, "difficulty": 0}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        path = tmp / "ledger.log"
        build_s, updates = build(path, args.blocks, args.devices)
        size = path.stat().st_size
        results.update(build_seconds=build_s, update_records=updates, file_bytes=size)
        rows.append(("build chain (append, fsync off)", f"{build_s:.1f} s",
                     f"{args.blocks} blocks, {updates} signed updates, {size / 1e6:.1f} MB"))

        coord_pub = Ed25519Signer(bytes(range(32))).public_key
        raw = path.read_bytes()
        t_scan, scanned = timed(lambda: storage.scan(raw), 3)
        t_parse, blocks = timed(lambda: [Block.from_bytes(p) for p in scanned.payloads], 3)
        t_none, rep = timed(lambda: verify_file(path, coord_pub, signatures="none"), 3)
        assert rep.ok and rep.height == args.blocks, rep
        t_head, rep = timed(lambda: verify_file(path, coord_pub, signatures="head"), 3)
        assert rep.ok, rep
        t_mem, rep = timed(lambda: verify_chain(blocks, coord_pub, signatures="none"), 3)
        assert rep.ok, rep
        results.update(scan_seconds=t_scan, parse_seconds=t_parse, verify_file_no_signatures_seconds=t_none,
                       verify_file_head_signature_seconds=t_head, verify_chain_in_memory_no_signatures_seconds=t_mem)
        rows.append(("  read + frame/CRC scan", f"{t_scan:.2f} s", ""))
        rows.append(("  decode blocks (canonical check)", f"{t_parse:.2f} s", ""))
        rows.append((f"verify_file {args.blocks}: no signatures", f"{t_none:.2f} s",
                     "hashes, links, indices, PoW, records, Merkle roots"))
        rows.append((f"verify_file {args.blocks}: head signature", f"{t_head:.2f} s",
                     "+ coordinator signature of the head (commits to all)"))
        rows.append(("verify_chain in memory: no signatures", f"{t_mem:.2f} s", "blocks already decoded"))

        full = not args.sample or args.sample >= args.blocks
        n_sigs = args.blocks if full else args.sample
        t_all, rep = timed(lambda: verify_chain(blocks[:n_sigs], coord_pub, signatures="all"))
        assert rep.ok, rep
        sig_count = n_sigs + sum(1 for b in blocks[:n_sigs] if b.type == "update")
        per_sig = (t_all - t_mem * n_sigs / args.blocks) / sig_count
        if full:
            t_all_full, note = t_all + t_scan + t_parse, "measured"
        else:
            t_all_full = (t_all * args.blocks / n_sigs) + t_scan + t_parse
            note = f"extrapolated from {n_sigs} blocks"
        results.update(verify_all_signatures_seconds=t_all_full, verify_all_signatures_note=note,
                       ed25519_verify_ms=per_sig * 1e3, signatures_checked_per_block=sig_count / n_sigs)
        rows.append((f"verify {args.blocks}: every signature", f"{t_all_full:.1f} s",
                     f"{note}; {per_sig * 1e3:.2f} ms per Ed25519 verify"))

        a_sync = append_cost(tmp, max(200, args.appends // 4), 1)
        a_nosync = append_cost(tmp, args.appends, 0)
        results.update(append_ms_fsync=a_sync * 1e3, append_ms_no_fsync=a_nosync * 1e3)
        rows.append(("append, fsync every block", f"{a_sync * 1e3:.3f} ms", "difficulty 0, Ed25519-signed"))
        rows.append(("append, fsync off (batched)", f"{a_nosync * 1e3:.3f} ms", "difficulty 0, Ed25519-signed"))
        t_checkpoint = checkpoint_cost(path, 1_000)
        results.update(signed_checkpoint_ms=t_checkpoint * 1e3)
        rows.append((f"signed checkpoint at height {args.blocks}", f"{t_checkpoint * 1e3:.3f} ms",
                     "chain root from the frontier + Ed25519 sign; published after every block"))

    results["target_verify_100k_under_3s"] = {"no_signatures": t_none < 3, "head_signature": t_head < 3,
                                              "all_signatures": t_all_full < 3}
    width = max(len(r[0]) for r in rows)
    print(f"{'measurement':<{width}}  {'result':>10}  notes")
    print("-" * (width + 60))
    for name, value, note in rows:
        print(f"{name:<{width}}  {value:>10}  {note}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwritten {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
