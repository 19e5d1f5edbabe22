"""The fleet's state: one fold of the ledger that every reader uses.

:class:`FleetState` reads the records of :mod:`federation.records` and :mod:`federation.credits`
in chain order. It is the ledger's record rules (``check`` refuses a record that may not come
next, ``apply`` folds one in) and the state they leave: the device keys and revocations, the
data sets, each round's accepted updates and Merkle leaves, the models the chain names, and
the prediction accounts. The verifier (``fledger ledger verify``, monitors), coordinator
recovery, ``predict`` and credits all read it, so a record means the same thing everywhere;
an agent, which holds one block and not the chain, reads it with :func:`model_named_by`.

Use it through the log: ``FleetLedger.open(path, ...)`` (or ``rules=FleetState`` with
:meth:`ledger.Ledger.open`, :func:`ledger.verify_file`, :class:`ledger.Replica`), then read
``ledger.state``. ``check`` never mutates; ``apply`` runs after the block is durable.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import msgpack

from federation import credits, records
from ledger import Keyring, Ledger, Signatures, Verifier, VerifyReport, merkle
from ledger import verify as log_verify
from ledger.block import Block
from ledger.keys import key_id_of
from ledger.merkle import ProofError
from ledger.verify import ChainState, need


@dataclass
class RoundInfo:
    leaves: list[bytes] = field(default_factory=list)  # leaf hashes, in order accepted
    devices: list[str] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)  # indices of the update blocks
    updates: list[dict[str, Any]] = field(default_factory=list)  # the update records, in order accepted
    aggregate: int | None = None  # index of the aggregate block
    opened_at: float | None = None  # timestamp of its round.opened block


@dataclass(frozen=True)
class RoundResult:
    """What a round's aggregate record says, as reports and dashboards show it."""

    round: int
    participants: list[str]  # the devices whose updates were used
    num_samples: int | None  # their training samples together (None: not recorded)
    metrics: dict[str, float | None]  # None: recorded but not a number (an evaluation that failed)
    model_sha256: bytes  # the model it produced (the one round+1 trains from)
    strategy: str | None
    block: int  # index of the aggregate block
    hash: bytes  # its hash
    time: float  # its timestamp

    @classmethod
    def of(cls, block: Block) -> RoundResult:
        data = block.data
        metrics, samples, digest, strategy = (data.get(name) for name in ("metrics", "num_samples", "model_sha256",
                                                                          "strategy"))
        return cls(int(data["round"]), [str(p) for p in data.get("participants") or ()],
                   samples if type(samples) is int else None,
                   {str(k): (float(v) if isinstance(v, (int, float)) else None) for k, v in metrics.items()}
                   if isinstance(metrics, dict) else {},
                   bytes(digest) if isinstance(digest, bytes) else b"", strategy if isinstance(strategy, str) else None,
                   block.index, block.hash, block.timestamp)


class RunHistory:
    """The run round by round, as ``fledger report`` and the coordinator's dashboard show it: the
    task, the open round, each aggregated round's :class:`RoundResult` and the rejections recorded.

    A small fold (no update records): :class:`FleetState` keeps one (``state.history``), and a reader
    fed block by block without the chain (the dashboard) folds its own. ``apply`` checks nothing."""

    def __init__(self) -> None:
        self.task: str | None = None  # the task the initial model.published names
        self.open_round: int | None = None  # the newest round.opened
        self.results: dict[int, RoundResult] = {}  # aggregated rounds, in the order aggregated
        # Rejections recorded, by reason, per round open when each was recorded (a device may claim
        # any round number); 0: before the first round opened.
        self.rejected: dict[int, Counter[str]] = {}

    def apply(self, block: Block) -> None:
        data = block.data
        kind = data.get("type")
        if kind == records.ROUND_OPENED:
            self.open_round = int(data["round"])
        elif kind == records.MODEL_PUBLISHED and data.get("initial"):
            task = data.get("task")
            if isinstance(task, dict) and task.get("task"):
                self.task = str(task["task"])
        elif kind == records.UPDATE_REJECTED:
            key = self.open_round if self.open_round is not None else 0
            self.rejected.setdefault(key, Counter())[str(data.get("reason"))] += 1
        elif kind == records.AGGREGATE:
            result = RoundResult.of(block)
            self.results[result.round] = result

    def rejected_in(self, round_number: int | None) -> Counter[str]:
        """Rejections recorded while ``round_number`` was the open round, by reason."""
        return Counter(self.rejected.get(round_number, {})) if round_number is not None else Counter()

    def rejected_unaggregated(self) -> Counter[str]:
        """Rejections recorded while no aggregated round was open (the open round's, and any before
        the first round opened), by reason."""
        total: Counter[str] = Counter()
        for round_number, counts in self.rejected.items():
            if round_number not in self.results:
                total.update(counts)
        return total


@dataclass(frozen=True)
class Registration:
    """A device's current data set as the ledger records it."""

    sha256: bytes
    created: float | None  # the device's clock in its signed statement (None: an operator's record)
    key_id: str | None  # the key that signed it (None: an operator's record)


def model_named_by(data: dict[str, Any]) -> tuple[int, bytes] | None:
    """(round it trains, model SHA-256) if the record names a global model, else None.

    An aggregate of round R names the model round R+1 trains from; ``model.published`` names
    the model of its own round. The agents' check of a model's block and the fold read this."""
    kind = data.get("type")
    if kind not in (records.AGGREGATE, records.MODEL_PUBLISHED):
        return None
    round_number, digest = data.get("round"), data.get("model_sha256")
    if type(round_number) is not int or not isinstance(digest, bytes):
        return None
    return round_number + (1 if kind == records.AGGREGATE else 0), digest


def starts_model(data: dict[str, Any]) -> bool:
    """Does the record set the model the newest round trains from (an aggregate, the initial
    model, a model an operator restored, or a gateway's upstream model)? A plain
    ``model.published`` after an aggregate only repeats it."""
    kind = data.get("type")
    return kind == records.AGGREGATE or (kind == records.MODEL_PUBLISHED and
                                         (bool(data.get("initial")) or "restores" in data or "upstream" in data))


class FleetState:
    """Everything the fleet's records say so far (see the module docstring)."""

    def __init__(self) -> None:
        self.fleet = ""
        self.genesis_hash = b""
        self.height = 0
        self.device_keys: dict[str, tuple[str, bytes]] = {}  # key_id -> (device, public key)
        self.revoked: set[str] = set()
        self.rounds: dict[int, RoundInfo] = {}
        self.published_models: dict[int, bytes] = {}  # round -> model it trains from (model.published)
        self.published_rounds: set[int] = set()  # rounds with a model.published record
        self.restored_rounds: set[int] = set()  # restore sources and the rounds they opened
        self.applied_restores: set[str] = set()  # request ids of restores
        self.model_block: Block | None = None  # the block naming the model the newest round trains from
        self.model_blocks: dict[bytes, Block] = {}  # model SHA-256 -> first block that names it
        self.datasets: dict[str, Registration] = {}
        self.accepted_msg_ids: set[bytes] = set()
        self.rejected_msg_ids: set[bytes] = set()  # message ids whose rejection is recorded
        # Records per device (rejections) and per (device, key id) (registrations) since the
        # newest round opened: the coordinator caps both per round.
        self.rejections_this_round: Counter[str] = Counter()
        self.registrations_this_round: Counter[tuple[str, str]] = Counter()
        self.accounts = credits.Accounts()  # pay-per-prediction balances (federation/credits.py)
        self.history = RunHistory()  # task, open round, aggregated rounds' results, rejections per round

    @classmethod
    def of(cls, blocks: Iterable[Block]) -> FleetState:
        """The fold of blocks already verified (no checks: for a ledger opened with other rules)."""
        state, chain = cls(), ChainState()  # apply reads nothing from the chain
        for block in blocks:
            state.apply(block, chain)
        return state

    # -- reading --------------------------------------------------------------------------------
    def keys_of(self, device: str) -> set[str]:
        return {key_id for key_id, (owner, _) in self.device_keys.items() if owner == device}

    def merkle_root_for(self, round_number: int) -> bytes:
        """The root an aggregate of ``round_number`` records: over its accepted updates, in order."""
        info = self.rounds.get(round_number)
        return merkle.root(info.leaves if info else [])

    @property
    def model_round(self) -> int | None:
        """The round the newest model opens (None before the first model)."""
        if self.model_block is None:
            return None
        named = model_named_by(self.model_block.data)
        return named[0] if named else None

    # -- rules ----------------------------------------------------------------------------------
    def check(self, block: Block, chain: ChainState) -> None:
        """Raise ValueError unless ``block`` (not the genesis) may come next. Never mutates."""
        data = block.data
        kind = data["type"]
        if kind == records.DEVICE_KEY:
            device = need(data, "device", str)
            public = need(data, "public_key", bytes, 32)
            key_id = need(data, "key_id", str)
            if key_id != key_id_of(public):
                raise ValueError(f"device key_id {key_id!r} does not match its public key")
            if not chain.verifier.valid_key(public):
                raise ValueError("device public key is not a valid Ed25519 point")
            owner = self.device_keys.get(key_id)
            if owner is not None and owner[0] != device:
                raise ValueError(f"key {key_id} is already registered to device {owner[0]!r}")
            if key_id in self.revoked:
                raise ValueError(f"key {key_id} was revoked and cannot be registered again")
        elif kind == records.DEVICE_KEY_REVOKED:
            device = need(data, "device", str)
            key_id = need(data, "key_id", str)
            need(data, "reason", str)
            owner = self.device_keys.get(key_id)
            if owner is None or owner[0] != device:
                raise ValueError(f"revokes key {key_id} that is not registered to device {device!r}")
        elif kind == records.DATASET:
            device = need(data, "device", str)
            sha256 = need(data, "sha256", bytes, 32)
            if need(data, "size", int) < 0:
                raise ValueError("negative dataset size")
            if "schema" not in data:
                raise ValueError("field 'schema' missing")
            if "statement" in data:  # a registration the device signed: check it like an update
                self._check_dataset_statement(device, sha256, data, chain)
        elif kind == records.UPDATE:
            self._check_update(data, chain)
        elif kind == records.UPDATE_REJECTED:
            need(data, "device", str)
            if data.get("round") is not None:
                need(data, "round", int)
            need(data, "reason", str)
            need(data, "digest", bytes, 32)
        elif kind == records.ROUND_OPENED:
            need(data, "round", int)
        elif kind == records.MODEL_PUBLISHED:
            round_number = need(data, "round", int)
            digest = need(data, "model_sha256", bytes, 32)
            if "restores" in data:  # an operator's undo: an earlier recorded model, as a new round
                restored = need(data, "restores", int)
                if self.published_models.get(restored) != digest:
                    raise ValueError(f"restores round {restored}, but that is not the model the chain recorded "
                                     "for that round")
                if round_number <= max(self.published_models, default=0):
                    raise ValueError(f"a restored model must open a new round, above {max(self.published_models)}")
            if "upstream" in data:  # a gateway's next model: its upstream coordinator's, after its own aggregate
                need(data, "upstream", dict)
                if round_number in self.published_models:
                    raise ValueError(f"round {round_number} already has a published model")
        elif kind == records.AGGREGATE:
            self._check_aggregate(data)
        elif kind in credits.TYPES:
            self.accounts.check(data, fleet=chain.fleet, verify_order=lambda m, s: _owner_signed(chain, m, s))
        # any other type: open, stored and hashed, nothing more to check

    def _active_device_key(self, device: str, key_id: str) -> tuple[str, bytes]:
        owner = self.device_keys.get(key_id)
        if owner is None or owner[0] != device:
            raise ValueError(f"device {device!r} key {key_id} is not registered earlier in the chain")
        if key_id in self.revoked:
            raise ValueError(f"device {device!r} key {key_id} was revoked")
        return owner

    def _check_dataset_statement(self, device: str, sha256: bytes, data: dict[str, Any], chain: ChainState) -> None:
        key_id = need(data, "key_id", str)
        statement = need(data, "statement", bytes)
        device_sig = need(data, "device_sig", bytes, 64)
        owner = self._active_device_key(device, key_id)
        try:
            fields = msgpack.unpackb(statement, raw=False)
        except Exception:
            raise ValueError("dataset statement is not msgpack") from None
        if not isinstance(fields, dict) or fields.get("device") != device or fields.get("sha256") != sha256:
            raise ValueError("dataset record differs from the device's signed statement")
        if chain.device_signatures and not chain.verifier.verify(owner[1], statement, device_sig):
            raise ValueError(f"bad device signature on the dataset registration of {device!r}")

    def _check_update(self, data: dict[str, Any], chain: ChainState) -> None:
        device = need(data, "device", str)
        round_number = need(data, "round", int)
        key_id = need(data, "key_id", str)
        statement = need(data, "statement", bytes)
        device_sig = need(data, "device_sig", bytes, 64)
        need(data, "weights_sha256", bytes, 32)
        need(data, "num_samples", int)
        need(data, "metrics", dict)
        owner = self._active_device_key(device, key_id)
        try:
            fields = records.decode_statement(statement)
        except ValueError as exc:
            raise ValueError(f"device statement: {exc}") from None
        if fields["fleet"] != chain.fleet:
            raise ValueError(f"statement is for fleet {fields['fleet']!r}, not {chain.fleet!r}")
        for name in ("device", "round", "key_id", "weights_sha256", "num_samples", "metrics"):
            if fields[name] != data[name] or type(fields[name]) is not type(data[name]):
                raise ValueError(f"record field {name!r} differs from the device's signed statement")
        base = fields.get("base_sha256")
        if base is not None and base != self.published_models.get(round_number):
            # A delta (update envelope v2) counts only against the model the chain published for its version.
            raise ValueError(f"the update's delta is against base {_hex(base)}, not the model published for "
                             f"version {round_number}")
        if "version" in data:  # asynchronous mode: the buffer it joins and how stale its base was
            round_number = self._check_staleness(data, round_number)
        info = self.rounds.get(round_number)
        if info is not None:
            if info.aggregate is not None:
                raise ValueError(f"update for round {round_number}, which was aggregated in block {info.aggregate}")
            if device in info.devices:
                raise ValueError(f"second accepted update of {device!r} in round {round_number}")
        if chain.device_signatures and not chain.verifier.verify(owner[1], statement, device_sig):
            raise ValueError(f"bad device signature of {device!r} (key {key_id})")

    def _check_staleness(self, data: dict[str, Any], base_version: int) -> int:
        """An asynchronous update's ``version`` (the model version whose buffer it joins: the
        newest), ``staleness`` (version - its base's) and ``weight`` (1/sqrt(1+staleness)); returns
        the version."""
        version = need(data, "version", int)
        staleness = need(data, "staleness", int)
        weight = need(data, "weight", float)
        if version != self.model_round:
            raise ValueError(f"update joins version {version}, but the newest model is version {self.model_round}")
        if staleness != version - base_version or staleness < 0:
            raise ValueError(f"staleness {staleness} is not version {version} minus its base's {base_version}")
        if weight != records.staleness_weight(staleness):
            raise ValueError(f"weight {weight} is not 1/sqrt(1+{staleness})")
        return version

    def _check_aggregate(self, data: dict[str, Any]) -> None:
        round_number = need(data, "round", int)
        participants = need(data, "participants", list)
        if not all(isinstance(p, str) for p in participants):
            raise ValueError("participants must be device ids (strings)")
        root = need(data, "merkle_root", bytes, 32)
        need(data, "model_sha256", bytes, 32)
        info = self.rounds.get(round_number, RoundInfo())
        if info.aggregate is not None:
            raise ValueError(f"round {round_number} was already aggregated in block {info.aggregate}")
        need(data, "strategy", str)
        if "strategy_params" in data:
            need(data, "strategy_params", dict)
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
        if data.get("mode") == "async":  # what was aggregated, with what staleness and weight
            limit = need(data, "max_staleness", int)
            for name in ("staleness", "weights"):
                recorded = need(data, name, dict)
                field_name = "staleness" if name == "staleness" else "weight"
                actual = {u["device"]: u.get(field_name) for u in info.updates}
                if recorded != actual:
                    raise ValueError(f"{name} {recorded} are not those of version {round_number}'s updates {actual}")
            if any(s > limit for s in data["staleness"].values()):
                raise ValueError(f"an update staler than max_staleness {limit} was aggregated")
        expected = merkle.root(info.leaves)
        if root != expected:
            raise ValueError(f"merkle_root {root.hex()[:16]} is not the root of round {round_number}'s "
                             f"{len(info.leaves)} accepted updates ({expected.hex()[:16]})")

    # -- fold -----------------------------------------------------------------------------------
    def apply(self, block: Block, chain: ChainState) -> None:
        """Fold in ``block`` (already checked, genesis included)."""
        data = block.data
        kind = data["type"]
        self.height = block.index + 1
        self.history.apply(block)
        if block.index == 0:
            self.fleet = str(data.get("fleet", ""))
            self.genesis_hash = block.hash
        elif kind == records.DEVICE_KEY:
            self.device_keys[data["key_id"]] = (data["device"], data["public_key"])
        elif kind == records.DEVICE_KEY_REVOKED:
            self.revoked.add(data["key_id"])
        elif kind == records.DATASET:
            key_id = str(data.get("key_id"))
            signed = isinstance(data.get("statement"), bytes)
            self.datasets[data["device"]] = Registration(data["sha256"], _statement_created(data),
                                                         key_id if signed else None)
            self.registrations_this_round[(data["device"], key_id)] += 1
        elif kind == records.UPDATE:
            info = self.rounds.setdefault(data.get("version", data["round"]), RoundInfo())
            info.leaves.append(merkle.leaf_hash(records.update_leaf(data["statement"], data["device_sig"])))
            info.devices.append(data["device"])
            info.blocks.append(block.index)
            info.updates.append(data)
            self.accepted_msg_ids.add(_statement_field(data, "msg_id"))
        elif kind == records.UPDATE_REJECTED:
            if isinstance(data.get("msg_id"), bytes):
                self.rejected_msg_ids.add(data["msg_id"])
            self.rejections_this_round[str(data.get("device"))] += 1
        elif kind == records.ROUND_OPENED:
            self.rounds.setdefault(data["round"], RoundInfo()).opened_at = block.timestamp
            self.rejections_this_round.clear()  # the caps count from the open round's start
            self.registrations_this_round.clear()
        elif kind == records.AGGREGATE:
            self.rounds.setdefault(data["round"], RoundInfo()).aggregate = block.index
        elif kind == records.MODEL_PUBLISHED:
            self.published_models[data["round"]] = data["model_sha256"]
            self.published_rounds.add(data["round"])
            if "restores" in data:  # a model an operator restored stays restorable
                self.restored_rounds.update({int(data["restores"]), int(data["round"])})
                if isinstance(data.get("request_id"), str):
                    self.applied_restores.add(data["request_id"])
        elif kind in credits.TYPES:
            self.accounts.apply(data, block.index)
        if starts_model(data):
            self.model_block = block
        named = model_named_by(data)
        if named is not None:
            self.model_blocks.setdefault(named[1], block)

    # -- proofs ---------------------------------------------------------------------------------
    def inclusion_proof(self, blocks: list[Block], round: int, device: str) -> RoundProof:
        """Proof that ``device``'s accepted update is in round ``round``'s aggregate Merkle root
        (``blocks``: the chain this state was folded from)."""
        info = self.rounds.get(round)
        if info is None or info.aggregate is None:
            raise ProofError(f"round {round} has no aggregate block yet")
        if device not in info.devices:
            raise ProofError(f"device {device!r} has no accepted update in round {round} "
                             f"(participants: {', '.join(info.devices) or 'none'})")
        i = info.devices.index(device)
        update = info.updates[i]
        aggregate = blocks[info.aggregate]
        return RoundProof(round, device, update["statement"], update["device_sig"],
                          records.update_leaf(update["statement"], update["device_sig"]), i, len(info.leaves),
                          merkle.inclusion_proof(info.leaves, i), aggregate.data["merkle_root"],
                          aggregate.index, info.blocks[i])


def _owner_signed(chain: ChainState, message: bytes, signature: bytes) -> bool:
    """The owner's orders are signed by the coordinator's key (checked with device signatures)."""
    if not chain.device_signatures:
        return True
    public = chain.coordinator_key
    return public is not None and chain.verifier.verify(public, message, signature)


def _decisions(data: dict[str, Any], name: str) -> dict[str, Any]:
    """An aggregate's ``excluded`` or ``clipped`` map: device -> {"reason": str, ...}."""
    value = data.get(name, {})
    if not isinstance(value, dict):
        raise ValueError(f"field {name!r} must be a map of device -> reason")
    for device, why in value.items():
        if not isinstance(why, dict) or not isinstance(why.get("reason"), str):
            raise ValueError(f"{name} entry of {device!r} must give its reason")
    return value


def _hex(value: Any) -> str:
    return value.hex()[:16] if isinstance(value, bytes) else repr(value)


def _statement_field(record: dict[str, Any], name: str) -> Any:
    return msgpack.unpackb(record["statement"], raw=False)[name]


def _statement_created(record: dict[str, Any]) -> float | None:
    """``created`` of a device-signed registration (None for an operator's record without one)."""
    if not isinstance(record.get("statement"), bytes):
        return None
    fields = msgpack.unpackb(record["statement"], raw=False)
    created = fields.get("created") if isinstance(fields, dict) else None
    return float(created) if isinstance(created, (int, float)) and not isinstance(created, bool) else None


# -- the log with the fleet's rules ---------------------------------------------------------------
class FleetLedger(Ledger):
    """A :class:`ledger.Ledger` whose records are checked and folded by :class:`FleetState`."""

    @classmethod
    def open(cls, path: str | Path, *args: Any, **kwargs: Any) -> FleetLedger:
        kwargs.setdefault("rules", FleetState)
        return cast(FleetLedger, super().open(path, *args, **kwargs))

    @property
    def state(self) -> FleetState:
        """The fold up to the head (updated by every append, after the block is written)."""
        rules = self.rules
        if not isinstance(rules, FleetState):
            raise TypeError(f"{self.path} was opened without the fleet's rules")
        return rules

    def inclusion_proof(self, round: int, device: str) -> RoundProof:
        """Proof that ``device``'s accepted update is in round ``round``'s aggregate Merkle root."""
        with self._lock:
            return self.state.inclusion_proof(self.blocks(), round, device)


def verify_chain(blocks: Iterable[Block], trusted_coordinator_key: bytes | None = None, *,
                       keyring: Keyring | None = None,
                       signatures: Signatures | str = Signatures.ALL) -> VerifyReport:
    """:func:`ledger.verify_chain` with the fleet's record rules."""
    return log_verify.verify_chain(blocks, trusted_coordinator_key, keyring=keyring, signatures=signatures,
                                   rules=FleetState)


def verify_file(path: str | Path, trusted_coordinator_key: bytes | None = None, *,
                      keyring: Keyring | None = None,
                      signatures: Signatures | str = Signatures.ALL) -> VerifyReport:
    """:func:`ledger.verify_file` with the fleet's record rules."""
    return log_verify.verify_file(path, trusted_coordinator_key, keyring=keyring, signatures=signatures,
                                  rules=FleetState)


# -- round proofs ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class RoundProof:
    """What a device needs to check that its update went into round ``round``'s aggregate."""

    round: int
    device: str
    statement: bytes
    device_sig: bytes
    leaf: bytes  # leaf data = records.update_leaf(statement, device_sig)
    leaf_index: int
    tree_size: int
    path: list[bytes]
    root: bytes
    aggregate_index: int  # block holding the root
    update_index: int  # block holding the update record

    def verify(self, aggregate: Block | None = None, coordinator_key: bytes | None = None) -> bool:
        try:
            verify_round_proof(self, aggregate, coordinator_key)
        except ProofError:
            return False
        return True

    def to_dict(self) -> dict[str, Any]:
        return {"round": self.round, "device": self.device, "statement": self.statement.hex(),
                "device_sig": self.device_sig.hex(), "leaf": self.leaf.hex(), "leaf_index": self.leaf_index,
                "tree_size": self.tree_size, "path": [p.hex() for p in self.path], "root": self.root.hex(),
                "aggregate_index": self.aggregate_index, "update_index": self.update_index}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RoundProof:
        try:
            return cls(int(d["round"]), str(d["device"]), bytes.fromhex(d["statement"]),
                       bytes.fromhex(d["device_sig"]), bytes.fromhex(d["leaf"]), int(d["leaf_index"]),
                       int(d["tree_size"]), [bytes.fromhex(p) for p in d["path"]], bytes.fromhex(d["root"]),
                       int(d["aggregate_index"]), int(d["update_index"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ProofError(f"malformed proof: {exc}") from exc


def verify_round_proof(proof: RoundProof, aggregate: Block | None = None, coordinator_key: bytes | None = None,
                       *, statement: bytes | None = None) -> None:
    """Raise :class:`ProofError` unless the proof shows the update is in the round's Merkle root.

    With ``aggregate`` the root must be that block's ``merkle_root`` (and the block intact); with
    ``coordinator_key`` the block's signature must verify too; with ``statement`` the proof must be
    about exactly that statement (what the device itself signed)."""
    if statement is not None and statement != proof.statement:
        raise ProofError("the proof is about a different statement")
    if proof.leaf != records.update_leaf(proof.statement, proof.device_sig):
        raise ProofError("leaf is not the encoding of the statement and signature")
    try:
        fields = records.decode_statement(proof.statement)
    except ValueError as exc:
        raise ProofError(str(exc)) from exc
    # In asynchronous mode an update trained from version v may be aggregated into a later one.
    if fields["device"] != proof.device or not isinstance(fields["round"], int) or fields["round"] > proof.round:
        raise ProofError(f"the statement is by {fields['device']!r} for round {fields['round']}, "
                         f"not by {proof.device!r} for round {proof.round} or before")
    if not merkle.verify_inclusion(merkle.leaf_hash(proof.leaf), proof.leaf_index, proof.tree_size, proof.path,
                                   proof.root):
        raise ProofError(f"inclusion path does not lead to root {proof.root.hex()[:16]}")
    if aggregate is not None:
        data = aggregate.data
        if aggregate.computed_hash() != aggregate.hash:
            raise ProofError("aggregate block hash does not match its contents")
        if data.get("type") != records.AGGREGATE or data.get("round") != proof.round:
            raise ProofError(f"block {aggregate.index} is not the aggregate of round {proof.round}")
        if data.get("merkle_root") != proof.root:
            raise ProofError(f"root differs from block {aggregate.index}'s merkle_root")
        # The tree holds every accepted update: the participants and the excluded ones.
        participants = list(data.get("participants", [])) + list(data.get("excluded", {}))
        if proof.device not in participants:
            raise ProofError(f"{proof.device!r} is not among round {proof.round}'s participants")
        if proof.tree_size != len(participants):  # the root alone does not fix the tree size
            raise ProofError(f"tree size {proof.tree_size} but round {proof.round} has {len(participants)} "
                             "accepted updates")
        if coordinator_key is not None and aggregate.unsigned:
            raise ProofError(f"block {aggregate.index} is sealed (no signature of its own): verify the chain up to "
                             "its commit group's signed block instead")
        if coordinator_key is not None and not Verifier().verify(coordinator_key, aggregate.hash,
                                                                 aggregate.signature):
            raise ProofError(f"block {aggregate.index}: bad coordinator signature")
