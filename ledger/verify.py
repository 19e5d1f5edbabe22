"""Chain verification: hashes, links, indices, proofs of work, signatures and record rules.

:class:`ChainState` checks one block at a time against what came before (used by
:func:`verify_chain`, by :class:`ledger.Ledger` on append and at open, and by
:class:`ledger.Replica`). ``check`` never mutates; ``apply`` records an accepted block.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import msgpack

from ledger import credits, merkle, records
from ledger.block import VERSION, ZERO_HASH, Block, BlockFormatError, meets_difficulty
from ledger.keys import Keyring, Verifier, key_id_of
from ledger.storage import TornTail
from ledger.storage import read as read_frames


class Signatures(StrEnum):
    """Which signatures a verification checks.

    ALL: the coordinator's on every block and the device's on every update.
    HEAD: only the coordinator's signature on the last block checked (it commits to every
    earlier block through the hash chain); device signatures skipped. NONE: no signatures."""

    ALL = "all"
    HEAD = "head"
    NONE = "none"


class VerifyError(ValueError):
    def __init__(self, index: int, reason: str) -> None:
        super().__init__(f"block {index}: {reason}")
        self.index = index
        self.reason = reason


@dataclass(frozen=True)
class VerifyReport:
    ok: bool
    height: int  # number of blocks that verified
    bad_index: int | None = None
    reason: str = ""
    head_hash: bytes = b""
    fleet: str = ""
    signatures: str = Signatures.ALL.value
    warnings: tuple[str, ...] = ()

    def __str__(self) -> str:
        if self.ok:
            extra = "" if self.signatures == "all" else f" (signatures checked: {self.signatures})"
            warn = "".join(f"; warning: {w}" for w in self.warnings)
            return f"chain of {self.height} blocks verified, head {self.head_hash.hex()[:16]}{extra}{warn}"
        return f"block {self.bad_index}: {self.reason}"


@dataclass
class RoundInfo:
    leaves: list[bytes] = field(default_factory=list)  # leaf hashes, in order accepted
    devices: list[str] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)  # indices of the update blocks
    aggregate: int | None = None  # index of the aggregate block


def _need(data: dict[str, Any], name: str, kind: type | tuple[type, ...], size: int | None = None) -> Any:
    value: Any = data.get(name)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        kinds = kind if isinstance(kind, tuple) else (kind,)
        raise ValueError(f"field {name!r} missing or not {'/'.join(k.__name__ for k in kinds)}")
    if size is not None and len(data[name]) != size:
        raise ValueError(f"field {name!r} must be {size} bytes")
    return value


class ChainState:
    """Everything a verifier remembers about the chain so far."""

    def __init__(self, *, trusted_coordinator_key: bytes | None = None, keyring: Keyring | None = None,
                 coordinator_signatures: bool = True, device_signatures: bool = True,
                 verifier: Verifier | None = None) -> None:
        self.trusted_coordinator_key = trusted_coordinator_key
        self.keyring: dict[str, bytes] = dict(keyring or {})
        self.coordinator_signatures = coordinator_signatures
        self.device_signatures = device_signatures
        self.verifier = verifier or Verifier()
        self.height = 0
        self.head_hash = ZERO_HASH
        self.fleet = ""
        self.difficulty = 0
        self.coordinator_key_id = ""
        self.device_keys: dict[str, tuple[str, bytes]] = {}  # key_id -> (device, public key)
        self.revoked: set[str] = set()
        self.rounds: dict[int, RoundInfo] = {}
        self.published_models: dict[int, bytes] = {}  # round -> model it trains from (model.published)
        self.accounts = credits.Accounts()  # pay-per-prediction balances (ledger/credits.py)
        # First of the unsigned blocks at the head that no signed block covers yet (None: the
        # head is signed). The hash chain makes a signed block's signature cover them all.
        self.unsealed_from: int | None = None

    # -- checks ---------------------------------------------------------------------------------
    def check(self, block: Block, *, signature: bool | None = None) -> None:
        """Raise :class:`VerifyError` if ``block`` cannot be the next block."""
        i = self.height
        if block.index != i:
            raise VerifyError(block.index, f"index {block.index} where {i} was expected")
        if block.version != VERSION:
            raise VerifyError(i, f"unsupported block version {block.version}")
        if hashlib.sha256(block.body).digest() != block.hash:
            raise VerifyError(i, "hash does not match the block's contents")
        if block.prev_hash != self.head_hash:
            raise VerifyError(i, f"prev_hash {block.prev_hash.hex()[:16]} does not link to block {i - 1} "
                                 f"({self.head_hash.hex()[:16]})" if i else "genesis prev_hash is not zero")
        try:
            if i == 0:
                self._check_genesis(block)
            else:
                if not meets_difficulty(block.hash, self.difficulty):
                    raise ValueError(f"proof of work: hash has fewer than {self.difficulty} leading zero bits")
                self._check_record(block)
        except VerifyError:
            raise
        except ValueError as exc:
            raise VerifyError(i, str(exc)) from None
        except (TypeError, KeyError, AttributeError) as exc:  # a record of the wrong shape
            raise VerifyError(i, f"malformed {block.data.get('type')!r} record: {type(exc).__name__}: {exc}") from None
        if block.unsigned:
            if i == 0:
                raise VerifyError(0, "the genesis block carries no coordinator signature")
        elif signature if signature is not None else self.coordinator_signatures:
            self.check_signature(block)

    def check_signature(self, block: Block) -> None:
        key_id = block.key_id
        public: bytes | None
        if block.index or self.height:  # after genesis (another genesis too): the coordinator we know
            expected, public = self.coordinator_key_id, self.keyring.get(self.coordinator_key_id)
        elif self.trusted_coordinator_key is not None:  # pinned: the genesis must be signed by that key
            expected, public = key_id_of(self.trusted_coordinator_key), self.trusted_coordinator_key
        else:  # trust on first use: the genesis names its own key
            expected, public = self._genesis_key(block)
        if key_id != expected:
            raise VerifyError(block.index, f"signed by key {key_id!r}, not the coordinator's {expected!r}")
        if public is None or not self.verifier.verify(public, block.hash, block.signature):
            raise VerifyError(block.index, f"bad coordinator signature (key {key_id})")

    def _genesis_key(self, block: Block) -> tuple[str, bytes]:
        ck = block.data.get("coordinator_key")
        if not isinstance(ck, dict) or not isinstance(ck.get("public_key"), bytes):
            raise VerifyError(0, "genesis has no coordinator_key with a public_key")
        return str(ck.get("key_id")), ck["public_key"]

    def _check_genesis(self, block: Block) -> None:
        data = block.data
        if data["type"] != records.GENESIS:
            raise ValueError(f"block 0 is a {data['type']!r} record, not genesis")
        _need(data, "fleet", str)
        difficulty = _need(data, "difficulty", int)
        if not 0 <= difficulty <= 256:
            raise ValueError(f"difficulty {difficulty} out of range")
        if not meets_difficulty(block.hash, difficulty):
            raise ValueError(f"proof of work: hash has fewer than {difficulty} leading zero bits")
        ck = _need(data, "coordinator_key", dict)
        public = _need(ck, "public_key", bytes, 32)
        if _need(ck, "key_id", str) != key_id_of(public):
            raise ValueError("coordinator key_id does not match its public key")
        if not self.verifier.valid_key(public):
            raise ValueError("coordinator public key is not a valid Ed25519 point")
        if self.trusted_coordinator_key is not None and public != self.trusted_coordinator_key:
            raise ValueError(f"genesis names coordinator key {ck['key_id']}, not the trusted key "
                             f"{key_id_of(self.trusted_coordinator_key)}")
        known = self.keyring.get(ck["key_id"])
        if known is not None and known != public:
            raise ValueError(f"keyring holds a different public key for {ck['key_id']}")

    def _check_record(self, block: Block) -> None:
        data = block.data
        kind = data["type"]
        if kind == records.GENESIS:
            raise ValueError("a second genesis record")
        if kind == records.DEVICE_KEY:
            device = _need(data, "device", str)
            public = _need(data, "public_key", bytes, 32)
            key_id = _need(data, "key_id", str)
            if key_id != key_id_of(public):
                raise ValueError(f"device key_id {key_id!r} does not match its public key")
            if not self.verifier.valid_key(public):
                raise ValueError("device public key is not a valid Ed25519 point")
            owner = self.device_keys.get(key_id)
            if owner is not None and owner[0] != device:
                raise ValueError(f"key {key_id} is already registered to device {owner[0]!r}")
            if key_id in self.revoked:
                raise ValueError(f"key {key_id} was revoked and cannot be registered again")
        elif kind == records.DEVICE_KEY_REVOKED:
            device = _need(data, "device", str)
            key_id = _need(data, "key_id", str)
            _need(data, "reason", str)
            owner = self.device_keys.get(key_id)
            if owner is None or owner[0] != device:
                raise ValueError(f"revokes key {key_id} that is not registered to device {device!r}")
        elif kind == records.DATASET:
            device = _need(data, "device", str)
            sha256 = _need(data, "sha256", bytes, 32)
            if _need(data, "size", int) < 0:
                raise ValueError("negative dataset size")
            if "schema" not in data:
                raise ValueError("field 'schema' missing")
            if "statement" in data:  # a registration the device signed: check it like an update
                self._check_dataset_statement(device, sha256, data)
        elif kind == records.UPDATE:
            self._check_update(block)
        elif kind == records.UPDATE_REJECTED:
            _need(data, "device", str)
            if data.get("round") is not None:
                _need(data, "round", int)
            _need(data, "reason", str)
            _need(data, "digest", bytes, 32)
        elif kind == records.ROUND_OPENED:
            _need(data, "round", int)
        elif kind == records.MODEL_PUBLISHED:
            round_number = _need(data, "round", int)
            digest = _need(data, "model_sha256", bytes, 32)
            if "restores" in data:  # an operator's undo: an earlier recorded model, as a new round
                restored = _need(data, "restores", int)
                if self.published_models.get(restored) != digest:
                    raise ValueError(f"restores round {restored}, but that is not the model the chain recorded "
                                     "for that round")
                if round_number <= max(self.published_models, default=0):
                    raise ValueError(f"a restored model must open a new round, above {max(self.published_models)}")
        elif kind == records.AGGREGATE:
            self._check_aggregate(block)
        elif kind in credits.TYPES:
            self.accounts.check(data, fleet=self.fleet, verify_order=self._owner_signed)
        # any other type: open, stored and hashed, nothing more to check

    def _owner_signed(self, message: bytes, signature: bytes) -> bool:
        """The owner's orders are signed by the coordinator's key (checked with device signatures)."""
        if not self.device_signatures:
            return True
        public = self.keyring.get(self.coordinator_key_id)
        return public is not None and self.verifier.verify(public, message, signature)

    def _active_device_key(self, device: str, key_id: str) -> tuple[str, bytes]:
        owner = self.device_keys.get(key_id)
        if owner is None or owner[0] != device:
            raise ValueError(f"device {device!r} key {key_id} is not registered earlier in the chain")
        if key_id in self.revoked:
            raise ValueError(f"device {device!r} key {key_id} was revoked")
        return owner

    def _check_dataset_statement(self, device: str, sha256: bytes, data: dict[str, Any]) -> None:
        key_id = _need(data, "key_id", str)
        statement = _need(data, "statement", bytes)
        device_sig = _need(data, "device_sig", bytes, 64)
        owner = self._active_device_key(device, key_id)
        try:
            fields = msgpack.unpackb(statement, raw=False)
        except Exception:
            raise ValueError("dataset statement is not msgpack") from None
        if not isinstance(fields, dict) or fields.get("device") != device or fields.get("sha256") != sha256:
            raise ValueError("dataset record differs from the device's signed statement")
        if self.device_signatures and not self.verifier.verify(owner[1], statement, device_sig):
            raise ValueError(f"bad device signature on the dataset registration of {device!r}")

    def _check_update(self, block: Block) -> None:
        data = block.data
        device = _need(data, "device", str)
        round_number = _need(data, "round", int)
        key_id = _need(data, "key_id", str)
        statement = _need(data, "statement", bytes)
        device_sig = _need(data, "device_sig", bytes, 64)
        _need(data, "weights_sha256", bytes, 32)
        _need(data, "num_samples", int)
        _need(data, "metrics", dict)
        owner = self._active_device_key(device, key_id)
        try:
            fields = records.decode_statement(statement)
        except ValueError as exc:
            raise ValueError(f"device statement: {exc}") from None
        if fields["fleet"] != self.fleet:
            raise ValueError(f"statement is for fleet {fields['fleet']!r}, not {self.fleet!r}")
        for name in ("device", "round", "key_id", "weights_sha256", "num_samples", "metrics"):
            if fields[name] != data[name] or type(fields[name]) is not type(data[name]):
                raise ValueError(f"record field {name!r} differs from the device's signed statement")
        info = self.rounds.get(round_number)
        if info is not None:
            if info.aggregate is not None:
                raise ValueError(f"update for round {round_number}, which was aggregated in block {info.aggregate}")
            if device in info.devices:
                raise ValueError(f"second accepted update of {device!r} in round {round_number}")
        if self.device_signatures and not self.verifier.verify(owner[1], statement, device_sig):
            raise ValueError(f"bad device signature of {device!r} (key {key_id})")

    def _check_aggregate(self, block: Block) -> None:
        data = block.data
        round_number = _need(data, "round", int)
        participants = _need(data, "participants", list)
        if not all(isinstance(p, str) for p in participants):
            raise ValueError("participants must be device ids (strings)")
        root = _need(data, "merkle_root", bytes, 32)
        _need(data, "model_sha256", bytes, 32)
        info = self.rounds.get(round_number, RoundInfo())
        if info.aggregate is not None:
            raise ValueError(f"round {round_number} was already aggregated in block {info.aggregate}")
        _need(data, "strategy", str)
        if "strategy_params" in data:
            _need(data, "strategy_params", dict)
        # What was used: participants = the round's accepted devices minus the excluded ones;
        # a clipped update was used (scaled), so its device is a participant. Records older than
        # the "excluded"/"clipped" fields have neither: participants = accepted, as before.
        excluded = _decisions(data, "excluded")
        clipped = _decisions(data, "clipped")
        used = sorted(map(str, participants))
        if len(set(participants)) != len(participants) or set(used) & set(excluded):
            raise ValueError(f"participants {participants} repeat a device or include an excluded one")
        if sorted(used + list(excluded)) != sorted(info.devices):
            raise ValueError(f"participants {participants} plus excluded {sorted(excluded)} are not the devices with "
                             f"accepted updates in round {round_number} ({info.devices})")
        if not set(clipped) <= set(used):
            raise ValueError(f"clipped devices {sorted(set(clipped) - set(used))} are not participants of round "
                             f"{round_number}")
        expected = merkle.root(info.leaves)
        if root != expected:
            raise ValueError(f"merkle_root {root.hex()[:16]} is not the root of round {round_number}'s "
                             f"{len(info.leaves)} accepted updates ({expected.hex()[:16]})")

    # -- state ----------------------------------------------------------------------------------
    def apply(self, block: Block) -> None:
        """Record ``block`` (already checked) as the new head."""
        data = block.data
        kind = data["type"]
        if block.index == 0:
            self.fleet = data["fleet"]
            self.difficulty = data["difficulty"]
            ck = data["coordinator_key"]
            self.coordinator_key_id = ck["key_id"]
            self.keyring.setdefault(ck["key_id"], ck["public_key"])
        elif kind == records.DEVICE_KEY:
            self.device_keys[data["key_id"]] = (data["device"], data["public_key"])
        elif kind == records.DEVICE_KEY_REVOKED:
            self.revoked.add(data["key_id"])
        elif kind == records.UPDATE:
            info = self.rounds.setdefault(data["round"], RoundInfo())
            info.leaves.append(merkle.leaf_hash(records.update_leaf(data["statement"], data["device_sig"])))
            info.devices.append(data["device"])
            info.blocks.append(block.index)
        elif kind == records.AGGREGATE:
            self.rounds.setdefault(data["round"], RoundInfo()).aggregate = block.index
        elif kind == records.MODEL_PUBLISHED:
            self.published_models[data["round"]] = data["model_sha256"]
        elif kind in credits.TYPES:
            self.accounts.apply(data, block.index)
        self.height = block.index + 1
        self.head_hash = block.hash
        if not block.unsigned:
            self.unsealed_from = None
        elif self.unsealed_from is None:
            self.unsealed_from = block.index

    def add(self, block: Block, *, signature: bool | None = None) -> None:
        self.check(block, signature=signature)
        self.apply(block)

    def merkle_root_for(self, round_number: int) -> bytes:
        info = self.rounds.get(round_number)
        return merkle.root(info.leaves if info else [])


def _decisions(data: dict[str, Any], name: str) -> dict[str, Any]:
    """An aggregate's ``excluded`` or ``clipped`` map: device -> {"reason": str, ...}."""
    value = data.get(name, {})
    if not isinstance(value, dict):
        raise ValueError(f"field {name!r} must be a map of device -> reason")
    for device, why in value.items():
        if not isinstance(why, dict) or not isinstance(why.get("reason"), str):
            raise ValueError(f"{name} entry of {device!r} must give its reason")
    return value


def _state_for(mode: Signatures | str, trusted_coordinator_key: bytes | None,
               keyring: Keyring | None) -> tuple[ChainState, Signatures]:
    mode = Signatures(mode)
    state = ChainState(trusted_coordinator_key=trusted_coordinator_key, keyring=keyring,
                       coordinator_signatures=mode is Signatures.ALL, device_signatures=mode is Signatures.ALL)
    return state, mode


def sealed_length(payloads: Sequence[bytes]) -> int:
    """How many frames remain once an *unsealed tail* is set aside: the unsigned blocks after the
    last signed one, which a commit group wrote but whose sealing block never reached the disk
    (never acknowledged). Only the tail's outer arrays are read; an unreadable frame, or a file
    whose blocks are all unsigned (an unsigned genesis), counts as sealed so the full check
    reports it."""
    for end in range(len(payloads), 0, -1):
        try:
            outer = msgpack.unpackb(payloads[end - 1], raw=False)
        except Exception:
            return len(payloads)
        if type(outer) is not list or len(outer) != 4 or outer[2] or outer[3]:
            return end
    return len(payloads)


def unsealed_text(first: int, end: int) -> str:
    return (f"unsealed tail: blocks {first}..{end - 1} carry no signature and no signed block follows them "
            "(a commit group cut short by a crash, never acknowledged)")


def verify_chain(blocks: Iterable[Block], trusted_coordinator_key: bytes | None = None, *,
                 keyring: Keyring | None = None, signatures: Signatures | str = Signatures.ALL) -> VerifyReport:
    """Verify a whole chain from genesis; report ok or the first bad block and why. A chain must
    end with a signed block: unsigned blocks are proven only by a later signed one."""
    state, mode = _state_for(signatures, trusted_coordinator_key, keyring)
    last: Block | None = None
    for block in blocks:
        try:
            state.add(block)
        except VerifyError as exc:
            return _bad(state, exc.index if exc.index == state.height else state.height, exc.reason, mode)
        last = block
    if state.unsealed_from is not None:
        return _bad(state, state.unsealed_from, unsealed_text(state.unsealed_from, state.height), mode)
    return _finish(state, last, mode)


def _bad(state: ChainState, index: int, reason: str, mode: Signatures) -> VerifyReport:
    return VerifyReport(False, state.height, index, reason, state.head_hash, state.fleet, mode.value)


def _finish(state: ChainState, last: Block | None, mode: Signatures, warnings: tuple[str, ...] = ()) -> VerifyReport:
    if last is None:
        return VerifyReport(False, 0, 0, "empty ledger: no genesis block", signatures=mode.value)
    if mode is Signatures.HEAD:
        try:
            state.check_signature(last)
        except VerifyError as exc:
            return _bad(state, exc.index, exc.reason, mode)
    return VerifyReport(True, state.height, None, "", state.head_hash, state.fleet, mode.value, warnings)


def verify_file(path: str | Path, trusted_coordinator_key: bytes | None = None, *,
                keyring: Keyring | None = None, signatures: Signatures | str = Signatures.ALL) -> VerifyReport:
    """Verify a ledger file without modifying it. A torn tail is reported as a warning
    (the writer truncates it at its next start); any other damage fails naming the block."""
    state, mode = _state_for(signatures, trusted_coordinator_key, keyring)
    try:
        scanned = read_frames(path, strict=False)
    except OSError as exc:
        return VerifyReport(False, 0, 0, f"cannot read {path}: {exc}", signatures=mode.value)
    last: Block | None = None
    sealed = sealed_length(scanned.payloads)
    for i, payload in enumerate(scanned.payloads[:sealed]):
        try:
            block = Block.from_bytes(payload)
        except BlockFormatError as exc:
            return _bad(state, i, f"{exc} (byte {scanned.offsets[i]})", mode)
        try:
            state.add(block)
        except VerifyError as exc:
            return _bad(state, i, f"{exc.reason} (byte {scanned.offsets[i]})", mode)
        last = block
    if scanned.error is not None:  # the whole frames before the damage verified: report the damage
        return _bad(state, scanned.error.index, f"{scanned.error.reason} (byte {scanned.error.offset})", mode)
    warnings: tuple[str, ...] = ()
    if sealed < len(scanned.payloads):
        warnings += (f"{unsealed_text(sealed, len(scanned.payloads))}; not counted, and the writer cuts it "
                     "at its next start",)
    if scanned.torn is not None:
        warnings += (_torn_text(scanned.torn, len(scanned.payloads)),)
    return _finish(state, last, mode, warnings)


def _torn_text(torn: TornTail, height: int) -> str:
    return (f"torn tail of {torn.length} bytes at byte {torn.offset} after block {height - 1} "
            f"({torn.reason}); the writer truncates it at its next start")
