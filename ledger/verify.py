"""Chain verification: hashes, links, indices, proofs of work, signatures, and the record
rules of whoever builds on the log.

:class:`ChainState` checks one block at a time against what came before (used by
:func:`verify_chain`, by :class:`ledger.Ledger` on append and at open, and by
:class:`ledger.Replica`). ``check`` never mutates; ``apply`` records an accepted block. What
records mean is not the log's business: pass ``rules`` (a :class:`RecordRules` factory, such
as ``federation.fleet_state.FleetState``) and each record is checked and folded by them too.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

import msgpack

from ledger.block import VERSION, ZERO_HASH, Block, BlockFormatError, meets_difficulty
from ledger.genesis import GENESIS
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


class RecordRules(Protocol):
    """What records mean, supplied by whoever builds on the log (the log itself knows only the
    genesis record). ``check`` raises ValueError for a record that may not come next and never
    mutates; ``apply`` folds in a block already checked (genesis included). ``chain`` gives the
    fleet, the coordinator key, the verifier and whether device signatures are checked."""

    def check(self, block: Block, chain: ChainState) -> None: ...

    def apply(self, block: Block, chain: ChainState) -> None: ...


Rules = Callable[[], RecordRules]
"""Makes a fresh :class:`RecordRules` for a chain read from genesis (a class does)."""


def need(data: dict[str, Any], name: str, kind: type | tuple[type, ...], size: int | None = None) -> Any:
    """``data[name]`` if it is a ``kind`` (of ``size`` bytes), else ValueError naming the field."""
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
                 verifier: Verifier | None = None, rules: RecordRules | None = None) -> None:
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
        self.rules = rules
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
        if data["type"] != GENESIS:
            raise ValueError(f"block 0 is a {data['type']!r} record, not genesis")
        need(data, "fleet", str)
        difficulty = need(data, "difficulty", int)
        if not 0 <= difficulty <= 256:
            raise ValueError(f"difficulty {difficulty} out of range")
        if not meets_difficulty(block.hash, difficulty):
            raise ValueError(f"proof of work: hash has fewer than {difficulty} leading zero bits")
        ck = need(data, "coordinator_key", dict)
        public = need(ck, "public_key", bytes, 32)
        if need(ck, "key_id", str) != key_id_of(public):
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
        if block.data["type"] == GENESIS:
            raise ValueError("a second genesis record")
        if self.rules is not None:  # what the record means: the rules of whoever builds on the log
            self.rules.check(block, self)

    # -- state ----------------------------------------------------------------------------------
    def apply(self, block: Block) -> None:
        """Record ``block`` (already checked) as the new head."""
        if block.index == 0:
            data = block.data
            self.fleet = data["fleet"]
            self.difficulty = data["difficulty"]
            ck = data["coordinator_key"]
            self.coordinator_key_id = ck["key_id"]
            self.keyring.setdefault(ck["key_id"], ck["public_key"])
        if self.rules is not None:
            self.rules.apply(block, self)
        self.height = block.index + 1
        self.head_hash = block.hash
        if not block.unsigned:
            self.unsealed_from = None
        elif self.unsealed_from is None:
            self.unsealed_from = block.index

    def add(self, block: Block, *, signature: bool | None = None) -> None:
        self.check(block, signature=signature)
        self.apply(block)

    @property
    def coordinator_key(self) -> bytes | None:
        return self.keyring.get(self.coordinator_key_id)


def _state_for(mode: Signatures | str, trusted_coordinator_key: bytes | None,
               keyring: Keyring | None, rules: Rules | None) -> tuple[ChainState, Signatures]:
    mode = Signatures(mode)
    state = ChainState(trusted_coordinator_key=trusted_coordinator_key, keyring=keyring,
                       coordinator_signatures=mode is Signatures.ALL, device_signatures=mode is Signatures.ALL,
                       rules=rules() if rules is not None else None)
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
                 keyring: Keyring | None = None, signatures: Signatures | str = Signatures.ALL,
                 rules: Rules | None = None) -> VerifyReport:
    """Verify a whole chain from genesis; report ok or the first bad block and why. A chain must
    end with a signed block: unsigned blocks are proven only by a later signed one."""
    state, mode = _state_for(signatures, trusted_coordinator_key, keyring, rules)
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
                keyring: Keyring | None = None, signatures: Signatures | str = Signatures.ALL,
                rules: Rules | None = None) -> VerifyReport:
    """Verify a ledger file without modifying it. A torn tail is reported as a warning
    (the writer truncates it at its next start); any other damage fails naming the block."""
    state, mode = _state_for(signatures, trusted_coordinator_key, keyring, rules)
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
