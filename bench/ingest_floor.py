"""The floor under bench/fleet.py: a subscriber that does nothing but receive (and, with
``--open``, open) N updates, in place of the coordinator.

    python bench/ingest_floor.py --port P --fleet F --keys DIR --count N [--open]

Run by ``bench/fleet.py --subscriber floor-receive|floor-open``, not by hand. It subscribes to
the fleet's update topics through the project's own ``MqttLink`` (paho, QoS 1, a persistent
session, chunk reassembly with its SHA-256 check: exactly the coordinator's receive path) and:

- ``receive``: takes each whole update off the inbox and counts it;
- ``--open``: also what the coordinator must do to an update before anything else: parse the
  envelope, verify the device's Ed25519 signature, X25519 + HKDF, AES-GCM decryption and digest,
  and decode the tensors (federation/envelope.py, federation/codec.py).

No admission rules, no spool, no ledger, no acknowledgements, no fsync. What it reaches on this
machine with the same broker and load generator is the most any coordinator written on this
stack (Python, paho) could reach, so it says how much of the gap to the crypto ceiling is the
coordinator's and how much the machine's. Prints ``ready`` when subscribed, then
``done FIRST LAST CPU`` (CLOCK_MONOTONIC of the first and last update taken, CPU seconds used
while taking them) and exits.
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from federation import envelope  # noqa: E402
from federation.codec import decode_tensors  # noqa: E402
from federation.keys import CoordinatorKeys, DeviceRegistry  # noqa: E402
from federation.mqtt import BrokerConfig, MqttLink  # noqa: E402
from federation.topics import Topics  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--fleet", required=True)
    parser.add_argument("--keys", type=Path, required=True, help="the fleet's keys directory")
    parser.add_argument("--count", type=int, required=True, help="updates to take before exiting")
    parser.add_argument("--open", action="store_true", help="also verify, decrypt and decode each update")
    parser.add_argument("--threads", type=int, default=1,
                        help="open updates on this many threads (the C code of the cryptography releases the GIL)")
    args = parser.parse_args()
    keys = CoordinatorKeys.load(args.keys / "coordinator.json")
    registry = DeviceRegistry.load(args.keys / "devices.json")
    topics = Topics(args.fleet)
    config = BrokerConfig(broker_port=args.port)
    link = MqttLink(config, f"floor-{args.fleet}", subscriptions=[topics.updates])
    if not link.start(timeout=20):
        print("could not connect", file=sys.stderr)
        return 4
    print("ready", flush=True)

    def open_update(payload: bytes) -> None:
        sealed = envelope.parse_update(payload, max_bytes=config.max_message_bytes)
        public = registry.public_key(sealed.header.device, sealed.header.key_id)
        if public is None:
            raise SystemExit(f"unknown device {sealed.header.device}")
        envelope.verify_update_signature(sealed, public)
        decode_tensors(envelope.decrypt_update(sealed, keys))

    first = 0.0
    cpu = 0.0
    pending: list[Future[None]] = []
    with ThreadPoolExecutor(max(1, args.threads)) as pool:
        for taken in range(args.count):
            message = link.inbox.get()
            if taken == 0:
                first, cpu = time.monotonic(), time.process_time()
            if args.open and args.threads > 1:
                pending.append(pool.submit(open_update, message.payload))
            elif args.open:
                open_update(message.payload)
        for future in pending:
            future.result()
    last = time.monotonic()
    print(f"done {first} {last} {time.process_time() - cpu}", flush=True)
    link.stop(timeout=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
