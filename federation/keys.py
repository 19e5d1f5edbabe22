"""Key material of a fleet and where it lives on disk.

- The coordinator has an Ed25519 signing key (blocks, global models), an X25519 key that
  devices encrypt their updates to, and the fleet model key (AES-256) that encrypts the
  global model for every device.
- Each device has its own Ed25519 signing key. It encrypts each update to the coordinator
  with a fresh X25519 ephemeral key, so a stolen device key reveals none of its past updates.
- Files are JSON with hex-encoded keys, written with 0600 permissions (secret files).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from federation import crypto
from federation.durable import atomic_write
from ledger.keys import valid_public_key


class KeyFileError(ValueError):
    """A key file is missing, unreadable or malformed."""


SECRET_MODE = 0o600


def secret_json(payload: dict[str, Any]) -> bytes:
    """The bytes of a key file (what :func:`write_secret_json` writes)."""
    return json.dumps(payload, indent=2, sort_keys=True).encode()


def write_secret_json(path: Path, payload: dict[str, Any]) -> None:
    """Write JSON atomically with 0600 permissions from the start (never world-readable)."""
    atomic_write(Path(path), secret_json(payload), mode=SECRET_MODE)


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError as exc:
        raise KeyFileError(f"key file not found: {path}") from exc
    except (OSError, json.JSONDecodeError) as exc:
        raise KeyFileError(f"cannot read key file {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise KeyFileError(f"key file {path} does not hold a JSON object")
    return data


def _hex(data: dict[str, Any], key: str, path: Path, size: int = 32) -> bytes:
    try:
        value = bytes.fromhex(data[key])
    except (KeyError, TypeError, ValueError) as exc:
        raise KeyFileError(f"{path}: field {key!r} missing or not hex") from exc
    if len(value) != size:
        raise KeyFileError(f"{path}: field {key!r} must be {size} bytes")
    return value


@dataclass(frozen=True)
class CoordinatorPublic:
    """What devices and monitors need to trust the coordinator."""

    sign_public: bytes
    enc_public: bytes

    # Derived once per object (cached_property writes the instance dict, which a frozen
    # dataclass allows): the coordinator reads these for every update and status it handles.
    @cached_property
    def sign_key_id(self) -> str:
        return crypto.key_id_of(self.sign_public)

    @cached_property
    def enc_key_id(self) -> str:
        return crypto.key_id_of(self.enc_public)

    def to_json(self) -> dict[str, str]:
        return {"sign_public": self.sign_public.hex(), "enc_public": self.enc_public.hex()}


@dataclass(frozen=True)
class CoordinatorKeys:
    fleet: str
    sign_seed: bytes
    enc_seed: bytes
    model_key_id: str
    model_key: bytes

    @classmethod
    def generate(cls, fleet: str) -> CoordinatorKeys:
        sign_seed, _ = crypto.ed25519_generate()
        enc_seed, _ = crypto.x25519_generate()
        model_key = crypto.random_bytes(32)
        return cls(fleet, sign_seed, enc_seed, crypto.key_id_of(model_key), model_key)

    @cached_property
    def public(self) -> CoordinatorPublic:
        """Derived from the seeds once, not on every call (two scalar multiplications)."""
        return CoordinatorPublic(
            crypto.ed25519_public(self.sign_seed), crypto.x25519_public(self.enc_seed)
        )

    @cached_property
    def _signer(self) -> Callable[[bytes], bytes]:
        return crypto.ed25519_signer(self.sign_seed)

    def sign(self, message: bytes) -> bytes:
        return self._signer(message)

    def save(self, path: Path) -> None:
        write_secret_json(path, {
            "kind": "fledger.coordinator-keys", "fleet": self.fleet,
            "sign_seed": self.sign_seed.hex(), "enc_seed": self.enc_seed.hex(),
            "model_key_id": self.model_key_id, "model_key": self.model_key.hex(),
        })

    @classmethod
    def load(cls, path: Path) -> CoordinatorKeys:
        data = read_json(path)
        if data.get("kind") != "fledger.coordinator-keys":
            raise KeyFileError(f"{path} is not a coordinator key file")
        return cls(
            str(data["fleet"]), _hex(data, "sign_seed", path), _hex(data, "enc_seed", path),
            str(data["model_key_id"]), _hex(data, "model_key", path),
        )


@dataclass(frozen=True)
class DeviceBundle:
    """Everything one device needs: its identity, the coordinator's public keys and the
    fleet model key. Written by `fledger keys add-device`, installed on the device only."""

    fleet: str
    device_id: str
    sign_seed: bytes
    coordinator: CoordinatorPublic
    model_key_id: str
    model_key: bytes

    @cached_property
    def sign_public(self) -> bytes:
        return crypto.ed25519_public(self.sign_seed)

    @cached_property
    def key_id(self) -> str:
        return crypto.key_id_of(self.sign_public)

    @cached_property
    def _signer(self) -> Callable[[bytes], bytes]:
        return crypto.ed25519_signer(self.sign_seed)

    def sign(self, message: bytes) -> bytes:
        return self._signer(message)

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": "fledger.device-bundle", "fleet": self.fleet, "device_id": self.device_id,
            "sign_seed": self.sign_seed.hex(), "coordinator": self.coordinator.to_json(),
            "model_key_id": self.model_key_id, "model_key": self.model_key.hex(),
        }

    def save(self, path: Path) -> None:
        write_secret_json(path, self.to_json())

    @classmethod
    def load(cls, path: Path) -> DeviceBundle:
        data = read_json(path)
        if data.get("kind") != "fledger.device-bundle":
            raise KeyFileError(f"{path} is not a device bundle")
        coord = data.get("coordinator")
        if not isinstance(coord, dict):
            raise KeyFileError(f"{path}: coordinator section missing")
        return cls(
            str(data["fleet"]), str(data["device_id"]), _hex(data, "sign_seed", path),
            CoordinatorPublic(_hex(coord, "sign_public", path), _hex(coord, "enc_public", path)),
            str(data["model_key_id"]), _hex(data, "model_key", path),
        )


@dataclass
class DeviceRecord:
    device_id: str
    keys: dict[str, bytes] = field(default_factory=dict)  # key id -> Ed25519 public key
    revoked: set[str] = field(default_factory=set)


@dataclass
class DeviceRegistry:
    """Public keys of the fleet's devices, as the coordinator knows them (devices.json)."""

    devices: dict[str, DeviceRecord] = field(default_factory=dict)

    def add(self, device_id: str, public_key: bytes) -> str:
        key_id = crypto.key_id_of(public_key)
        record = self.devices.setdefault(device_id, DeviceRecord(device_id))
        record.keys[key_id] = public_key
        return key_id

    def revoke(self, device_id: str, key_id: str) -> None:
        record = self.devices.get(device_id)
        if record is None or key_id not in record.keys:
            raise KeyError(f"device {device_id!r} has no key {key_id!r}")
        record.revoked.add(key_id)

    def public_key(self, device_id: str, key_id: str) -> bytes | None:
        """The device's active key with this id, or None if unknown or revoked."""
        record = self.devices.get(device_id)
        if record is None or key_id in record.revoked:
            return None
        return record.keys.get(key_id)

    def save(self, path: Path) -> None:
        write_secret_json(path, {
            "kind": "fledger.device-registry",
            "devices": {
                d: {"keys": {k: v.hex() for k, v in r.keys.items()}, "revoked": sorted(r.revoked)}
                for d, r in sorted(self.devices.items())
            },
        })

    @classmethod
    def load(cls, path: Path) -> DeviceRegistry:
        if not Path(path).exists():
            return cls()
        return cls.from_json(read_json(path))

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DeviceRegistry:
        """Parse devices.json; raises :class:`KeyFileError` naming what is wrong."""
        registry = cls()
        if not isinstance(data, dict) or not isinstance(data.get("devices"), dict):
            raise KeyFileError("malformed device registry: no 'devices' map (make one with `fledger keys add-device`)")
        owners: dict[str, str] = {}  # key id -> device: a key belongs to one device only
        try:
            for device_id, entry in dict(data.get("devices", {})).items():
                keys = {str(k): bytes.fromhex(v) for k, v in dict(entry.get("keys", {})).items()}
                for key_id, public_key in keys.items():
                    if len(public_key) != crypto.KEY_BYTES or crypto.key_id_of(public_key) != key_id:
                        raise ValueError(f"key {key_id} of device {device_id} does not match its public key")
                    if not valid_public_key(public_key):
                        raise ValueError(f"key {key_id} of device {device_id} is not a valid Ed25519 public key")
                    if key_id in owners:
                        raise ValueError(f"key {key_id} is listed for both {owners[key_id]} and {device_id}")
                    owners[key_id] = str(device_id)
                registry.devices[str(device_id)] = DeviceRecord(str(device_id), keys, set(entry.get("revoked", [])))
        except (ValueError, TypeError, AttributeError) as exc:
            raise KeyFileError(f"malformed device registry: {exc}") from exc
        return registry
