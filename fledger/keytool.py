"""``fledger keys``: provision the fleet's coordinator keys and per-device bundles."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from federation.keys import CoordinatorKeys, DeviceBundle, DeviceRegistry, write_secret_json
from federation.topics import check_name

COORDINATOR_FILE = "coordinator.json"
REGISTRY_FILE = "devices.json"


def bundle_path(directory: Path, device: str) -> Path:
    return Path(directory) / f"device-{device}.json"


def init_fleet(directory: Path, fleet: str, *, force: bool = False) -> CoordinatorKeys:
    check_name("fleet", fleet)
    path = Path(directory) / COORDINATOR_FILE
    if path.exists() and not force:
        raise FileExistsError(f"{path} exists; refusing to replace the fleet's keys (use --force)")
    keys = CoordinatorKeys.generate(fleet)
    keys.save(path)
    DeviceRegistry().save(Path(directory) / REGISTRY_FILE)
    return keys


def add_device(directory: Path, device: str) -> tuple[Path, str]:
    """Create a device's signing key and bundle, and register its public key."""
    from federation import crypto

    check_name("device id", device)
    keys = CoordinatorKeys.load(Path(directory) / COORDINATOR_FILE)
    seed, public = crypto.ed25519_generate()
    bundle = DeviceBundle(keys.fleet, device, seed, keys.public, keys.model_key_id, keys.model_key)
    path = bundle_path(directory, device)
    bundle.save(path)
    registry = DeviceRegistry.load(Path(directory) / REGISTRY_FILE)
    key_id = registry.add(device, public)
    registry.save(Path(directory) / REGISTRY_FILE)
    return path, key_id


def revoke_device_key(directory: Path, device: str, key_id: str) -> None:
    registry = DeviceRegistry.load(Path(directory) / REGISTRY_FILE)
    registry.revoke(device, key_id)
    registry.save(Path(directory) / REGISTRY_FILE)


def write_broker_password(path: Path, user: str, password: str) -> None:
    """Append/replace ``user`` in an amqtt password file (argon2 hash)."""
    from fledger.broker import hash_password

    lines: list[str] = []
    if path.exists():
        lines = [ln for ln in path.read_text().splitlines() if not ln.startswith(f"{user}:")]
    lines.append(f"{user}:{hash_password(password)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write("\n".join(lines) + "\n")


def add_parser(sub: Any) -> None:
    p = sub.add_parser("keys", help="create fleet and device keys",
                       description="Provision keys. Secret files are written with 0600 permissions.")
    p.add_argument("--dir", type=Path, default=Path("keys"), help="key directory (default: ./keys)")
    ks = p.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    a = ks.add_parser("init", help="create the coordinator's keys for a new fleet")
    a.add_argument("--fleet", required=True, help="fleet name")
    a.add_argument("--force", action="store_true", help="replace existing keys (devices must be re-provisioned)")
    a = ks.add_parser("add-device", help="create a device's key bundle and register its public key")
    a.add_argument("device", help="device id (letters, digits, '_' and '-')")
    a = ks.add_parser("revoke", help="revoke a device key (its updates are rejected from then on)")
    a.add_argument("device")
    a.add_argument("key_id")
    a = ks.add_parser("list", help="list registered devices and key ids")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    directory: Path = args.dir
    if args.keys_command == "init":
        keys = init_fleet(directory, args.fleet, force=args.force)
        print(f"fleet {keys.fleet}: coordinator keys in {directory / COORDINATOR_FILE} "
              f"(signing key id {keys.public.sign_key_id})")
    elif args.keys_command == "add-device":
        path, key_id = add_device(directory, args.device)
        print(f"device {args.device}: bundle {path} (key id {key_id}); install it on the device only")
    elif args.keys_command == "revoke":
        revoke_device_key(directory, args.device, args.key_id)
        print(f"revoked key {args.key_id} of {args.device}; restart the coordinator to apply")
    elif args.keys_command == "list":
        registry = DeviceRegistry.load(directory / REGISTRY_FILE)
        for device, record in sorted(registry.devices.items()):
            for key_id in record.keys:
                print(f"{device}\t{key_id}\t{'revoked' if key_id in record.revoked else 'active'}")
    return 0


__all__ = ["add_device", "bundle_path", "init_fleet", "write_broker_password", "write_secret_json"]
