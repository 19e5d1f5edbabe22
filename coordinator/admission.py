"""Admission: may this update (or data set registration) come in? A verdict, nothing else.

Pure: no disk, no network, no clock of its own (``now`` is passed in), no state changed. The
coordinator acts on the verdict: it counts a rejection, records it in the ledger when the
sender is authenticated (``record``), acknowledges it, or hands an accepted update's weights
to the writer and the strategy. What the ledger already says (registered data sets, accepted
message ids, the per-round record caps) comes from the fold, :class:`FleetState`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from coordinator.rounds import RoundState
from federation import envelope
from federation.codec import CodecError, TensorDict, TensorSpec, check_against_spec, decode_tensors
from federation.envelope import DatasetStatement, EnvelopeError, SealedUpdate
from federation.fleet_state import FleetState
from federation.keys import CoordinatorKeys, DeviceRegistry
from federation.topics import Topics

# Bounds on what a device may claim: sums and weighted means of them must stay finite and
# encodable in the ledger (a 1e308 metric times a sample count is Inf; counts beyond 2**63 wrap).
MAX_SAMPLES = 2**40
MAX_METRICS = 32
METRIC_LIMIT = envelope.METRIC_LIMIT
MAX_REJECTION_RECORDS = 8  # per device while a round is open
MAX_REGISTRATIONS_PER_ROUND = 3  # per device key (a rotated key starts afresh): first, new data, a fix
MAX_CLOCK_AHEAD_S = 300.0  # how far ahead of ours a device's clock may be for registrations


def sane(value: float) -> bool:
    return math.isfinite(value) and abs(value) <= METRIC_LIMIT


@dataclass(frozen=True)
class UpdateVerdict:
    """``reason`` is "accepted" or why not. ``sealed`` is set once the sender is authenticated
    (its key signed the header): only then is a rejection recorded (``record``) and answered."""

    reason: str
    detail: str = ""
    device: str | None = None
    round: int | None = None
    sealed: SealedUpdate | None = None
    record: bool = False
    weights: TensorDict | None = None  # the delta, decoded and checked against the model, when accepted
    public_key: bytes | None = None  # the key its signature was verified with, when accepted

    @property
    def accepted(self) -> bool:
        return self.reason == "accepted"

    @property
    def authenticated(self) -> bool:
        return self.sealed is not None


@dataclass(frozen=True)
class Opened:
    """What :meth:`Admission.open_ahead` did of one update message's costly steps: ``parsed``
    (or why not), the signature checked with ``public_key`` (``signature_error`` None: it
    verifies), and the tensors decrypted and checked against ``spec`` (or why not; None: not
    tried)."""

    payload: bytes
    parsed: SealedUpdate | EnvelopeError
    public_key: bytes | None = None
    signature_error: EnvelopeError | None = None
    spec: TensorSpec | None = None
    weights: TensorDict | EnvelopeError | CodecError | None = None


@dataclass(frozen=True)
class RegistrationVerdict:
    reason: str  # "register", "already_registered", or why not
    detail: str = ""
    device: str | None = None
    statement: DatasetStatement | None = None


class Admission:
    def __init__(self, fleet: str, keys: CoordinatorKeys, topics: Topics, *, max_update_bytes: int) -> None:
        self.fleet = fleet
        self.keys = keys  # decrypts updates
        self.topics = topics
        self.max_update_bytes = max_update_bytes

    # -- updates ----------------------------------------------------------------------------------
    def open_ahead(self, topic: str, payload: bytes, *, registry: DeviceRegistry, round: RoundState,
                   state: FleetState, spec: TensorSpec) -> Opened:
        """The costly part of a verdict, done before it is due (on another thread, while the
        batch before is being made durable): parse, verify the device's signature, and, for an
        update the round could take, decrypt, decode and check the tensors. Pure, and it decides
        nothing: :meth:`update` with ``opened`` reaches exactly the verdict it reaches without,
        in the same order of checks, using these results where they still apply (the same
        payload, public key and spec) and computing what is missing. What it reads of ``round``
        and ``state`` only spares work: a replay or an update for another round is not
        decrypted ahead (it may still be decrypted when due, if the round moved on to it)."""
        parsed = self._parse(payload)
        if not isinstance(parsed, SealedUpdate):
            return Opened(payload, parsed)
        header = parsed.header
        public_key = registry.public_key(header.device, header.key_id)
        if public_key is None or header.fleet != self.fleet or self.topics.device_of(topic) != header.device:
            return Opened(payload, parsed)
        signature = self._verify(parsed, public_key)
        if signature is not None or parsed.version != envelope.UPDATE_VERSION or round.check(
                device=header.device, round_number=header.round, msg_id=header.msg_id,
                seen=state.accepted_msg_ids) is not None:
            return Opened(payload, parsed, public_key, signature)
        weights = self._open(parsed, spec)
        if not isinstance(weights, Exception):  # its copy of the ciphertext is no longer needed
            parsed = dataclasses.replace(parsed, ciphertext=b"")
        return Opened(payload, parsed, public_key, signature, spec, weights)

    def update(self, topic: str, payload: bytes, *, registry: DeviceRegistry, round: RoundState,
               state: FleetState, spec: TensorSpec, done: bool, opened: Opened | None = None) -> UpdateVerdict:
        """The verdict on one update message, checked end to end (decryption included);
        ``opened``: the costly steps already done by :meth:`open_ahead` (used where they apply)."""
        if opened is not None and opened.payload is not payload:
            opened = None
        topic_device = self.topics.device_of(topic)
        parsed = opened.parsed if opened is not None else self._parse(payload)
        if not isinstance(parsed, SealedUpdate):
            return UpdateVerdict(parsed.reason, parsed.detail, topic_device)
        sealed = parsed
        header = sealed.header
        if header.fleet != self.fleet:
            return UpdateVerdict("wrong_fleet", f"update for fleet {header.fleet!r}", header.device)
        if topic_device != header.device:
            return UpdateVerdict("topic_mismatch", f"device {header.device!r} published on {topic!r}", header.device)
        public_key = registry.public_key(header.device, header.key_id)
        if public_key is None:
            known = registry.devices.get(header.device)
            reason = "revoked_key" if known and header.key_id in known.revoked else "unknown_key"
            return UpdateVerdict(reason, f"device {header.device!r} key {header.key_id!r}", header.device)
        verified = opened is not None and opened.public_key is not None and opened.public_key == public_key
        bad_signature = opened.signature_error if verified and opened is not None else self._verify(sealed, public_key)
        if bad_signature is not None:
            return UpdateVerdict(bad_signature.reason, bad_signature.detail, header.device, header.round)

        # From here on the sender is authenticated: rejections go to the ledger too.
        def rejected(reason: str, detail: str, *, record: bool = True) -> UpdateVerdict:
            return UpdateVerdict(reason, detail, header.device, header.round, sealed, record)

        if sealed.version != envelope.UPDATE_VERSION:
            # An older agent: refused by name (in its acknowledgement and the ledger), not misread.
            return rejected("unsupported_version",
                            f"update envelope v{sealed.version} (full weights); this coordinator takes "
                            f"v{envelope.UPDATE_VERSION} (a delta against a named base model): upgrade the agent")

        round_problem = round.check(device=header.device, round_number=header.round, msg_id=header.msg_id,
                                    seen=state.accepted_msg_ids)
        if round_problem is not None:
            # A byte-identical replay is not recorded again: it would let anyone grow the ledger.
            return rejected(round_problem, f"open round is {round.number}", record=round_problem != "replay")
        if done:
            return rejected("training_done", "the federation has finished its rounds")
        if not 0 < header.num_samples <= MAX_SAMPLES:
            return rejected("bad_sample_count", f"num_samples={header.num_samples}")
        if len(header.metrics) > MAX_METRICS or not all(sane(v) for v in header.metrics.values()):
            return rejected("bad_metrics", f"need <= {MAX_METRICS} finite metrics of magnitude <= {METRIC_LIMIT:g}")
        base = state.published_models.get(header.round)
        if base is None or base != header.base_sha256:
            return rejected("wrong_base", f"the delta is against model {header.base_sha256.hex()[:16]}, not the "
                                          f"model of version {header.round}")
        registered = state.datasets.get(header.device)
        if registered is None or registered.sha256 != header.dataset_sha256:
            return rejected("dataset_not_registered", "the update names a data set this device has not registered")
        if verified and opened is not None and opened.spec is spec and opened.weights is not None:
            weights = opened.weights
        else:  # (from the payload again if the copy opened ahead dropped its ciphertext)
            full = sealed if sealed.ciphertext or opened is None else self._parse(payload)
            weights = self._open(full, spec) if isinstance(full, SealedUpdate) else full
        if isinstance(weights, dict):  # accepted below
            sealed = dataclasses.replace(sealed, ciphertext=b"")  # the verdict keeps the header, not the bytes
        if isinstance(weights, EnvelopeError):
            return rejected(weights.reason, weights.detail)
        if isinstance(weights, CodecError):
            return rejected("bad_tensors", str(weights))
        return UpdateVerdict("accepted", "", header.device, header.round, sealed, weights=weights,
                             public_key=public_key)

    def _parse(self, payload: bytes) -> SealedUpdate | EnvelopeError:
        try:
            return envelope.parse_update(payload, max_bytes=self.max_update_bytes)
        except EnvelopeError as exc:
            return exc

    @staticmethod
    def _verify(sealed: SealedUpdate, public_key: bytes) -> EnvelopeError | None:
        try:
            envelope.verify_update_signature(sealed, public_key)
        except EnvelopeError as exc:
            return exc
        return None

    def _open(self, sealed: SealedUpdate, spec: TensorSpec) -> TensorDict | EnvelopeError | CodecError:
        """Decrypt, decode and check the tensors against the model; the error instead of raising."""
        try:
            weights = decode_tensors(envelope.decrypt_update(sealed, self.keys))
            check_against_spec(weights, spec)
        except (EnvelopeError, CodecError) as exc:
            return exc
        return weights

    @staticmethod
    def may_record_rejection(state: FleetState, device: str, msg_id: bytes | None) -> bool:
        """A rejection of an authenticated sender is recorded once per message id (the ciphertext
        and tag are not signed: anyone who saw one genuine update can make endless variants),
        and at most :data:`MAX_REJECTION_RECORDS` per device while a round is open (even a
        stolen key, naming any round it likes, adds a few blocks per round)."""
        return msg_id not in state.rejected_msg_ids and state.rejections_this_round[device] < MAX_REJECTION_RECORDS

    # -- data set registrations -------------------------------------------------------------------
    def registration(self, topic: str, payload: bytes, *, registry: DeviceRegistry) -> RegistrationVerdict:
        """Is it a genuine registration of this fleet's device, on its own topic? (``register``
        then means: go on to :meth:`registration_news`.)"""
        try:
            statement = envelope.open_dataset(payload, registry.public_key)
        except EnvelopeError as exc:
            return RegistrationVerdict(f"registration_{exc.reason}", exc.detail, self.topics.device_of(topic))
        if statement.device != self.topics.device_of(topic) or statement.fleet != self.fleet:
            return RegistrationVerdict("registration_topic_mismatch", f"{statement.device!r} on {topic!r}")
        return RegistrationVerdict("register", "", statement.device, statement)

    @staticmethod
    def registration_news(statement: DatasetStatement, *, registry: DeviceRegistry, state: FleetState,
                          now: float) -> RegistrationVerdict:
        """Does a genuine registration change what the ledger says? ``register`` if it is to be
        recorded, ``already_registered`` for a resend, else why not."""
        def verdict(reason: str, detail: str = "") -> RegistrationVerdict:
            return RegistrationVerdict(reason, detail, statement.device, statement)

        current = state.datasets.get(statement.device)
        if current is not None and current.sha256 == statement.sha256:
            return verdict("already_registered")
        if statement.created > now + MAX_CLOCK_AHEAD_S:
            # Ordering uses the device's clock; a statement from the far future would make every
            # later genuine registration look stale.
            return verdict("registration_from_future",
                           f"created {statement.created - now:.0f}s ahead of the coordinator's clock")
        current_key = current.key_id if current is not None else None
        superseded = current_key is not None and current_key != statement.key_id and \
            registry.public_key(statement.device, current_key) is None  # made with a revoked key
        registered_at = current.created if current is not None and current.created is not None else float("-inf")
        if statement.created <= registered_at and not superseded:
            # An older registration replayed: it must not switch the device back to old data.
            return verdict("registration_stale", "not newer than the device's current registration")
        # Capped per round like rejections: a stolen key cannot register data set after data set.
        if state.registrations_this_round[(statement.device, statement.key_id)] >= MAX_REGISTRATIONS_PER_ROUND:
            return verdict("registration_rate", f"more than {MAX_REGISTRATIONS_PER_ROUND} new data sets "
                           "in one round; try again next round")
        return verdict("register")
