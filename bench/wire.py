"""Wire bytes vs raw, and coordinator ingest vs the crypto ceiling (no network).

For each demo model: raw float32 bytes, the msgpack tensor codec, the sealed update envelope,
and the origin system's JSON list of floats. Then how many updates a second the coordinator's
whole input path (parse, verify, decrypt, decode, check, spool, ledger, running sum) takes, next
to the cost of the cryptography alone (X25519 + HKDF, AES-256-GCM, Ed25519 verify, SHA-256).

    python bench/wire.py [--updates 200]   -> table on stdout, bench/results/wire.json
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

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from coordinator.rounds import RoundPolicy  # noqa: E402
from coordinator.service import Coordinator, CoordinatorSettings  # noqa: E402
from coordinator.storage import ModelStore, Spool  # noqa: E402
from federation import crypto, envelope  # noqa: E402
from federation.codec import decode_tensors, encode_tensors  # noqa: E402
from federation.fleet_state import FleetLedger  # noqa: E402
from federation.keys import CoordinatorKeys, DeviceBundle, DeviceRegistry  # noqa: E402
from federation.tasks import get_task  # noqa: E402
from federation.topics import Topics  # noqa: E402
from ledger import Ed25519Signer  # noqa: E402


def wire_sizes(task_name: str) -> dict[str, Any]:
    torch.manual_seed(0)
    state = {k: v.detach().numpy() for k, v in get_task(task_name).build_model().state_dict().items()}
    raw = sum(a.nbytes for a in state.values())
    codec = encode_tensors(state)
    keys = CoordinatorKeys.generate("bench")
    bundle = DeviceBundle("bench", "dev", crypto.ed25519_generate()[0], keys.public, keys.model_key_id, keys.model_key)
    sealed = envelope.seal_update(bundle, 1, codec, 100, {"train_loss": 0.1}, dataset_sha256=bytes(32),
                                  base_sha256=bytes(32))
    as_json = json.dumps({k: v.tolist() for k, v in state.items()}).encode()
    return {"task": task_name, "parameters": int(sum(a.size for a in state.values())), "raw_bytes": raw,
            "codec_bytes": len(codec), "envelope_bytes": len(sealed), "json_floats_bytes": len(as_json),
            "envelope_over_raw": len(sealed) / raw, "json_over_envelope": len(as_json) / len(sealed)}


def ingest(task_name: str, updates: int) -> dict[str, Any]:
    torch.manual_seed(0)
    model = {k: v.detach().numpy().copy() for k, v in get_task(task_name).build_model().state_dict().items()}
    keys = CoordinatorKeys.generate("bench")
    registry = DeviceRegistry()
    devices = []
    for i in range(updates):
        seed, public = crypto.ed25519_generate()
        registry.add(f"d{i}", public)
        devices.append(DeviceBundle("bench", f"d{i}", seed, keys.public, keys.model_key_id, keys.model_key))
    topics = Topics("bench")
    rng = np.random.default_rng(0)
    dataset = hashlib.sha256(b"bench").digest()
    with tempfile.TemporaryDirectory() as tmp:
        ledger = FleetLedger.open(Path(tmp) / "ledger.log", signer=Ed25519Signer(keys.sign_seed), fleet="bench")
        coordinator = Coordinator(
            CoordinatorSettings("bench", RoundPolicy(min_clients=updates + 1, quorum=1, deadline_s=0)),
            keys, registry, ledger, ModelStore(Path(tmp) / "models"), Spool(Path(tmp) / "spool"),
            initial_model=lambda: model, publish=lambda t, p, r: None, topics=topics)
        coordinator.start()
        for bundle in devices:
            coordinator.handle_registration(topics.register(bundle.device_id),
                                            envelope.seal_dataset(bundle, dataset, 1, {}))
        payloads = []
        for bundle in devices:
            weights = {k: (v + rng.standard_normal(v.shape).astype(v.dtype) * 0.01) if v.dtype.kind == "f" else v
                       for k, v in model.items()}
            payloads.append((bundle, envelope.seal_update(bundle, 1, encode_tensors(weights), 100, {},
                                                          dataset_sha256=dataset, base_sha256=bytes(32))))
        start = time.perf_counter()
        for bundle, payload in payloads:
            outcome = coordinator.handle_update(topics.update(bundle.device_id), payload)
            assert outcome.accepted, outcome
        ingest_s = time.perf_counter() - start
        ledger.close()
    # The cryptography alone, on the same payloads.
    start = time.perf_counter()
    for bundle, payload in payloads:
        sealed = envelope.parse_update(payload, max_bytes=1 << 30)
        envelope.verify_update_signature(sealed, bundle.sign_public)
        decode_tensors(envelope.decrypt_update(sealed, keys))
    crypto_s = time.perf_counter() - start
    return {"task": task_name, "updates": updates, "ingest_per_s": updates / ingest_s,
            "crypto_only_per_s": updates / crypto_s, "ingest_over_crypto_time": ingest_s / crypto_s,
            "ingest_ms_per_update": 1000 * ingest_s / updates, "crypto_ms_per_update": 1000 * crypto_s / updates}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--updates", type=int, default=200, help="updates per ingest run (default 200)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "wire.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    sizes = [wire_sizes(t) for t in ("california", "mnist")]
    print(f"{'task':<11}{'params':>9}{'raw B':>10}{'envelope B':>12}{'env/raw':>9}{'JSON B':>11}{'JSON/env':>9}")
    for r in sizes:
        print(f"{r['task']:<11}{r['parameters']:>9}{r['raw_bytes']:>10}{r['envelope_bytes']:>12}"
              f"{r['envelope_over_raw']:>9.3f}{r['json_floats_bytes']:>11}{r['json_over_envelope']:>9.2f}")
    rates = [ingest(t, args.updates) for t in ("california", "mnist")]
    print(f"\n{'task':<11}{'updates':>8}{'ingest/s':>10}{'crypto/s':>10}{'ingest ms':>11}{'crypto ms':>11}")
    for r in rates:
        print(f"{r['task']:<11}{r['updates']:>8}{r['ingest_per_s']:>10.1f}{r['crypto_only_per_s']:>10.1f}"
              f"{r['ingest_ms_per_update']:>11.2f}{r['crypto_ms_per_update']:>11.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"python": platform.python_version(), "torch": torch.__version__,
                                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                    "wire": sizes, "ingest": rates}, indent=2))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
