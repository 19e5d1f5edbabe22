"""A monitor's replica: ingest blocks one at a time, verify each, alert on misbehaviour."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from ledger.block import Block, BlockFormatError
from ledger.keys import Keyring, key_id_of
from ledger.verify import ChainState, Rules, VerifyError


class ReplicaAlert(Exception):
    """The coordinator (or whoever publishes blocks) misbehaved.

    ``kind``: "malformed", "bad_hash", "bad_signature", "fork" (a different block at the head
    index, or a block that does not extend our head), "rewrite" (a different block at an index
    below the head: history was rewritten), "invalid" (breaks a chain rule), "gap" (blocks
    missing; raised only with ``strict_gaps`` or when too many blocks are pending)."""

    def __init__(self, kind: str, index: int, reason: str) -> None:
        super().__init__(f"{kind} at block {index}: {reason}")
        self.kind = kind
        self.index = index
        self.reason = reason


@dataclass(frozen=True)
class Event:
    # "appended", "duplicate", "gap", "held" (an unsigned block waiting for the signed block that
    # seals it), or "ignored" (by offer(): not the coordinator's)
    kind: str
    index: int
    height: int  # replica height after this block
    message: str = ""


MAX_UNVERIFIED_CANDIDATES = 16  # per index, while no coordinator key is known (anyone may publish)
MAX_UNSEALED_AHEAD = 4096  # unsigned blocks are held only this far past the head (a commit group is <= 1000)


class Replica:
    """Verified copy of the chain's hashes and state, fed block by block (no I/O).

    A block ahead of the head is held back (a gap: ask the coordinator to replay from
    :attr:`height`) and applied as soon as the missing blocks arrive."""

    def __init__(self, trusted_coordinator_key: bytes | None = None, keyring: Keyring | None = None, *,
                 strict_gaps: bool = False, max_pending: int = 100_000, device_signatures: bool = True,
                 on_append: Callable[[Block], None] | None = None, genesis_hash: bytes | None = None,
                 trust_on_first_use: bool = False, rules: Rules | None = None) -> None:
        self.state = ChainState(trusted_coordinator_key=trusted_coordinator_key, keyring=keyring,
                                device_signatures=device_signatures, rules=rules() if rules is not None else None)
        self.trusted_coordinator_key = trusted_coordinator_key
        self.hashes: list[bytes] = []
        self.head: Block | None = None
        # held-back blocks by index; several candidates only while no key is known to tell them apart
        self.pending: dict[int, dict[bytes, Block]] = {}
        # Unsigned blocks past the head, by index then hash: a commit group's blocks, applied once
        # the group's signed last block arrives and their hashes link it to our head. Anyone may
        # publish unsigned blocks, so several candidates per index, and never an alert.
        self.unsealed: dict[int, dict[bytes, Block]] = {}
        self._verified: set[bytes] = set()  # hashes of held-back blocks whose signature was checked
        self.strict_gaps = strict_gaps
        self.max_pending = max_pending
        # Called with each block once it is verified and applied, in chain order: what a
        # monitor stores must be what it verified, never bytes merely received at that index.
        self.on_append = on_append
        # How offer() learns the coordinator key when it is not given: from the genesis block
        # with this hash, or (only if asked for) from the first genesis that signs itself.
        self.genesis_hash = genesis_hash
        self.trust_on_first_use = trust_on_first_use
        self.ignored: Counter[str] = Counter()  # reason -> messages offer() dropped

    def coordinator_key(self) -> bytes | None:
        """The key every block must be signed with: the pinned one, or the genesis's once applied."""
        if self.height:
            return self.state.keyring.get(self.state.coordinator_key_id)
        return self.trusted_coordinator_key

    def offer(self, raw: bytes) -> Event:
        """Take a message from an untrusted channel (an MQTT topic anyone with rights, or a
        broker without ACLs, may publish to). Only blocks the pinned coordinator key signed
        reach :meth:`ingest`; anything else (junk, a bad hash, another key, a block that cannot
        be checked yet) is counted in :attr:`ignored` and returned as an "ignored" event, never
        an alert. A :class:`ReplicaAlert` therefore always means the coordinator itself signed
        a contradiction (fork, rewrite, invalid block) or withholds blocks (gap)."""
        try:
            block = Block.from_bytes(raw)
        except BlockFormatError as exc:
            return self._ignore("malformed", -1, str(exc))
        if block.computed_hash() != block.hash:
            return self._ignore("bad_hash", block.index, "hash does not match the block's contents")
        key = self.coordinator_key()
        if key is not None and block.unsigned and block.index:
            return self._hold_unsealed(block)
        if key is not None:
            if block.key_id != key_id_of(key) or not self.state.verifier.verify(key, block.hash, block.signature):
                return self._ignore("not_coordinator_signed", block.index, f"signed by key {block.key_id!r}")
            return self.ingest(block)
        if block.index != 0:
            return self._ignore("unverifiable", block.index, "the coordinator key is not known before the genesis")
        if self.genesis_hash is not None:
            if block.hash != self.genesis_hash:
                return self._ignore("not_pinned_genesis", 0, f"genesis {block.hash.hex()[:16]} is not the pinned one")
            return self.ingest(block)  # authentic by its hash: a bad one is the coordinator's own
        if not self.trust_on_first_use:
            return self._ignore("unverifiable", 0, "no coordinator key or genesis hash pinned")
        try:
            return self.ingest(block)
        except ReplicaAlert as exc:  # a genesis that does not even verify itself is junk
            return self._ignore("bad_genesis", 0, str(exc))

    def _ignore(self, reason: str, index: int, detail: str) -> Event:
        self.ignored[reason] += 1
        return Event("ignored", index, self.height, f"{reason}: {detail}")

    @property
    def height(self) -> int:
        return self.state.height

    def missing(self) -> tuple[int, int] | None:
        """(first, last) missing index when signed blocks are held back, else None."""
        if not self.pending:
            return None
        return self.height, min(self.pending) - 1

    @property
    def waiting_for_seal(self) -> bool:
        """Unsigned blocks are held whose signed block has not arrived (ask for a replay if it stays so)."""
        return bool(self.unsealed)

    def _hold_unsealed(self, block: Block) -> Event:
        i = block.index
        if i < self.height:
            if block.hash == self.hashes[i]:
                return Event("duplicate", i, self.height)
            return self._ignore("unsigned_mismatch", i, "an unsigned block that differs from the verified one")
        held = self.unsealed.setdefault(i, {})
        if block.hash not in held:
            if (len(held) >= MAX_UNVERIFIED_CANDIDATES or i >= self.height + MAX_UNSEALED_AHEAD
                    or sum(map(len, self.unsealed.values())) >= self.max_pending):
                if not held:
                    del self.unsealed[i]
                return self._ignore("unsealed_overflow", i, "too many unsigned blocks held")
            held[block.hash] = block
        before = self.height
        self._drain()
        if self.height > i >= before:
            return Event("appended", i, self.height)
        return Event("held", i, self.height, "unsigned: applied when the signed block that seals it arrives")

    def _sealed_run(self, block: Block) -> list[Block] | None:
        """The held unsigned blocks from our head up to ``block`` (signed), if all are here and
        their hashes link ``block`` to our head; else None."""
        need, run = block.prev_hash, []
        for index in range(block.index - 1, self.height - 1, -1):
            candidate = self.unsealed.get(index, {}).get(need)
            if candidate is None:
                return None
            run.append(candidate)
            need = candidate.prev_hash
        if need != self.state.head_hash:
            return None
        run.reverse()
        return run

    def _take_sealed(self, run: list[Block], seal: Block) -> None:
        for block in run:  # proven by the seal's signature through the hash links
            self._take(block)
        self._take(seal)
        for index in [k for k in self.unsealed if k < self.height]:
            del self.unsealed[index]

    def _drain(self) -> None:
        """Apply held blocks that now extend the head: the next signed block, or a signed block
        further on with every unsigned block between."""
        while True:
            if self.height in self.pending:
                candidates = self.pending.pop(self.height)
                self._verified.difference_update(candidates)
                chosen = self._choose(candidates)
                if chosen is None:
                    return  # only junk was held for this index: it stays missing until the replay brings it
                self._take(chosen)
                self.unsealed.pop(chosen.index, None)
                continue
            if not self.pending or not self.unsealed or not self.height:
                return
            first = min(self.pending)
            for seal in self.pending[first].values():
                run = self._sealed_run(seal)
                if run is not None and self._signed_by_coordinator(seal):
                    del self.pending[first]
                    self._verified.difference_update([seal.hash])
                    self._take_sealed(run, seal)
                    break
            else:
                return

    def _signed_by_coordinator(self, block: Block) -> bool:
        try:
            self.state.check_signature(block)
        except VerifyError:
            return False
        return True

    def ingest(self, block: Block | bytes) -> Event:
        """Verify and take one block; raise :class:`ReplicaAlert` on misbehaviour."""
        if not isinstance(block, Block):
            try:
                block = Block.from_bytes(block)
            except BlockFormatError as exc:
                raise ReplicaAlert("malformed", self.height, str(exc)) from None
        i = block.index
        if block.computed_hash() != block.hash:
            raise ReplicaAlert("bad_hash", i, "hash does not match the block's contents")
        if block.unsigned and i:
            return self._hold_unsealed(block)
        if self.height:  # we know the coordinator key: check the signature before anything else
            try:
                self.state.check_signature(block)
            except VerifyError as exc:
                raise ReplicaAlert("bad_signature", i, exc.reason) from None
            signed = True
        elif self.trusted_coordinator_key is not None:  # pinned: also a genesis must carry its signature
            if not self.state.verifier.verify(self.trusted_coordinator_key, block.hash, block.signature):
                raise ReplicaAlert("bad_signature", i, "not signed by the trusted coordinator key")
            signed = True
        else:
            signed = False  # no key known yet: checked when the genesis block arrives
        if i < self.height:
            if block.hash == self.hashes[i]:
                return Event("duplicate", i, self.height)
            kind = "fork" if i == self.height - 1 else "rewrite"
            raise ReplicaAlert(kind, i, f"coordinator-signed block {block.hash.hex()[:16]} differs from the "
                                        f"block {self.hashes[i].hex()[:16]} seen before at this index")
        if i > self.height and signed and self.height:
            run = self._sealed_run(block)
            if run is not None:
                self._take_sealed(run, block)
                self._drain()
                return Event("appended", i, self.height)
        if i > self.height:
            held = self.pending.get(i, {})
            if signed and any(h != block.hash and h in self._verified for h in held):
                raise ReplicaAlert("fork", i, "two different signed blocks at this index")
            if self.strict_gaps:
                raise ReplicaAlert("gap", i, f"blocks {self.height}..{i - 1} missing")
            if not signed and len(held) >= MAX_UNVERIFIED_CANDIDATES and block.hash not in held:
                raise ReplicaAlert("gap", i, f"more than {MAX_UNVERIFIED_CANDIDATES} different unverified blocks "
                                             "at this index (pin the coordinator key to tell them apart)")
            if len(self.pending) >= self.max_pending and i not in self.pending:
                raise ReplicaAlert("gap", i, f"blocks {self.height}..{min(self.pending) - 1} still missing "
                                             f"with {len(self.pending)} blocks held back")
            if signed:
                self._verified.add(block.hash)
            self.pending[i] = held
            held[block.hash] = block
            return Event("gap", i, self.height, f"blocks {self.height}..{min(self.pending) - 1} missing; "
                                                f"replay from {self.height}")
        self._take(block)
        self.unsealed.pop(i, None)
        self._drain()
        return Event("appended", i, self.height)

    def _choose(self, candidates: dict[bytes, Block]) -> Block | None:
        """The one held-back candidate the coordinator signed; None if none is (blocks held while
        no key was known may be anyone's: on a broker without ACLs anyone can publish)."""
        good: list[Block] = []
        for block in candidates.values():
            try:
                self.state.check_signature(block)
                good.append(block)
            except VerifyError:
                pass
        if len(good) > 1:
            raise ReplicaAlert("fork", self.height, "two different signed blocks at this index")
        return good[0] if good else None

    def _take(self, block: Block) -> None:
        try:
            # signatures of later blocks were checked in ingest(); genesis carries its own key
            self.state.check(block, signature=block.index == 0)
        except VerifyError as exc:
            if block.prev_hash != self.state.head_hash:
                raise ReplicaAlert("fork", block.index, exc.reason) from None
            kind = "bad_signature" if "signature" in exc.reason else "invalid"
            raise ReplicaAlert(kind, block.index, exc.reason) from None
        self.state.apply(block)
        self.hashes.append(block.hash)
        self.head = block
        if self.on_append is not None:
            self.on_append(block)

    def ingest_all(self, blocks: Iterable[Block | bytes]) -> int:
        n = 0
        for block in blocks:
            self.ingest(block)
            n += 1
        return n
