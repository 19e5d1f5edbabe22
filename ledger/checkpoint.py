"""Signed tree heads as C2SP checkpoints: https://c2sp.org/tlog-checkpoint over https://c2sp.org/signed-note.

A checkpoint is a short text, signed with Ed25519 as a "signed note", that commits to the
chain's Merkle tree (RFC 6962, leaves = block hashes) at one size::

    fledger/demo/3f1c0a9e2b7d4c51          <- origin: names the log
    42                                     <- tree size: number of blocks
    Jd5K...base64 of the 32-byte root...=  <- root hash
                                           <- blank line
    — fledger/demo/3f1c0a9e2b7d4c51 AbCd...base64(4-byte key id || 64-byte signature)

Standard transparency tooling (witnesses, Go's ``golang.org/x/mod/sumdb/note``, the
transparency-dev ``formats/log`` package) reads and checks it with the verifier key
``<name>+<key id hex>+<base64(0x01 || public key)>`` (:func:`verifier_key`).

No well-kept Python library implements signed notes (sigstore-python keeps a private one for
Rekor's ECDSA notes), so this module follows the two specifications directly; Ed25519 itself is
PyNaCl's (libsodium). Pure: no I/O, no clock.

Domain separation from block signatures: the coordinator's key signs block hashes (always
exactly 32 bytes) and note texts (always longer: the root line alone is 45 bytes), so no
signature of one kind can be taken for the other.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from ledger.keys import Signer, Verifier
from ledger.merkle import EMPTY_ROOT, HASH_SIZE, Frontier, leaf_hash, root

ED25519 = 0x01  # signature type byte of Ed25519 in signed-note
MAX_SIGNATURES = 100  # as golang.org/x/mod/sumdb/note (the spec requires accepting at least 16)
MAX_NOTE_BYTES = 1 << 20
EM_DASH_SPACE = "\u2014 "


class NoteError(ValueError):
    """A signed note or checkpoint is malformed, or not validly signed by the expected key."""


def check_name(name: str) -> str:
    """A key name (and a checkpoint origin): non-empty UTF-8 without Unicode spaces, '+' or control characters."""
    if (not isinstance(name, str) or not name or "+" in name or any(c.isspace() for c in name)
            or any(ord(c) < 0x20 or ord(c) == 0x7F for c in name)):
        raise NoteError(f"{name!r} is not a valid note key name (non-empty, no spaces, no '+')")
    return name


def _b64decode(text: str, what: str) -> bytes:
    """Standard base64 with padding (RFC 4648 §4), refusing non-canonical encodings."""
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise NoteError(f"{what} is not base64") from None
    if base64.b64encode(raw).decode() != text:
        raise NoteError(f"{what} is not canonical base64")
    return raw


def key_id(name: str, public_key: bytes) -> bytes:
    """signed-note key ID: the first 4 bytes of SHA-256(name || 0x0A || 0x01 || public key)."""
    if not isinstance(public_key, bytes | bytearray) or len(public_key) != 32:
        raise NoteError("an Ed25519 public key is 32 bytes")
    return hashlib.sha256(check_name(name).encode() + b"\n" + bytes([ED25519]) + bytes(public_key)).digest()[:4]


def verifier_key(name: str, public_key: bytes) -> str:
    """The verifier key string ``<name>+<8 hex key id>+<base64(0x01 || public key)>`` that note tooling takes."""
    return f"{name}+{key_id(name, public_key).hex()}+{base64.b64encode(bytes([ED25519]) + public_key).decode()}"


def parse_verifier_key(vkey: str) -> tuple[str, bytes]:
    """(name, 32-byte Ed25519 public key) of a verifier key string; its key id must match."""
    if not isinstance(vkey, str):
        raise NoteError(f"a verifier key is text, not {type(vkey).__name__}")
    parts = vkey.strip().split("+", 2)
    if len(parts) != 3:
        raise NoteError("a verifier key is <name>+<key id>+<base64 key>")
    name, hex_id, encoded = parts
    check_name(name)
    raw = _b64decode(encoded, "verifier key")
    if len(raw) != 33 or raw[0] != ED25519:
        raise NoteError("not an Ed25519 verifier key (0x01 followed by 32 bytes)")
    if len(hex_id) != 8 or hex_id.lower() != key_id(name, raw[1:]).hex():
        raise NoteError("verifier key id does not match its name and key")
    return name, raw[1:]


def sign_note(text: str, name: str, signer: Signer) -> str:
    """A signed note: ``text`` (ending in a newline, no blank line at the end), a blank line, one signature line."""
    _check_text(text)
    signature = signer.sign(text.encode())
    blob = base64.b64encode(key_id(name, signer.public_key) + signature).decode()
    return f"{text}\n{EM_DASH_SPACE}{name} {blob}\n"


def _check_text(text: str) -> None:
    if not text.endswith("\n") or text.endswith("\n\n"):
        raise NoteError("note text must end in one newline")
    if any(ord(c) < 0x20 and c != "\n" for c in text):
        raise NoteError("note text must not contain control characters other than newline")


def open_note(note: str | bytes, name: str, public_key: bytes) -> str:
    """The text of ``note`` if it carries a valid signature by the key (``name``, ``public_key``).

    As the signed-note spec and Go's ``note.Open``: the text ends at the last blank line;
    every signature line must be well-formed; signatures by other keys are ignored; a signature
    by this key that fails rejects the note; no signature by this key rejects it."""
    if isinstance(note, bytes):
        if len(note) > MAX_NOTE_BYTES:
            raise NoteError(f"note longer than {MAX_NOTE_BYTES} bytes")
        try:
            note = note.decode("utf-8")
        except UnicodeDecodeError:
            raise NoteError("note is not UTF-8") from None
    if not isinstance(note, str):
        raise NoteError(f"a note is text, not {type(note).__name__}")
    if len(note.encode()) > MAX_NOTE_BYTES:
        raise NoteError(f"note longer than {MAX_NOTE_BYTES} bytes")
    if any(ord(c) < 0x20 and c != "\n" for c in note):
        raise NoteError("note contains control characters")
    split = note.rfind("\n\n")
    if split < 0 or not note.endswith("\n"):
        raise NoteError("malformed note: no blank line before the signatures")
    text, lines = note[: split + 1], note[split + 2:].splitlines()
    if not lines:
        raise NoteError("malformed note: no signature lines")
    if len(lines) > MAX_SIGNATURES:
        raise NoteError(f"more than {MAX_SIGNATURES} signatures")
    wanted = key_id(name, public_key)
    verified = False
    for line in lines:
        if not line.startswith(EM_DASH_SPACE):
            raise NoteError("malformed signature line (must start with an em dash and a space)")
        signer_name, _, blob = line[len(EM_DASH_SPACE):].partition(" ")
        check_name(signer_name)
        raw = _b64decode(blob, "signature")
        if len(raw) < 5:
            raise NoteError("signature too short")
        if signer_name != name or raw[:4] != wanted:
            continue  # another key's signature (a witness, a rotated key): not ours to check
        if not Verifier().verify(public_key, text.encode(), raw[4:]):
            raise NoteError(f"invalid signature by {name}")
        verified = True
    if not verified:
        raise NoteError(f"no signature by {name}+{wanted.hex()}")
    return text


@dataclass(frozen=True)
class Checkpoint:
    """A log's tree head: origin, tree size and RFC 6962 root (plus optional extension lines)."""

    origin: str
    size: int
    root: bytes
    extensions: tuple[str, ...] = ()

    def text(self) -> str:
        """The note text (what is signed)."""
        check_name(self.origin)
        if type(self.size) is not int or self.size < 0 or len(self.root) != HASH_SIZE:
            raise NoteError("a checkpoint has a size >= 0 and a 32-byte root")
        if any(not line or "\n" in line for line in self.extensions):
            raise NoteError("extension lines must be non-empty single lines")
        lines = [self.origin, str(self.size), base64.b64encode(self.root).decode(), *self.extensions]
        return "\n".join(lines) + "\n"

    @classmethod
    def parse(cls, text: str) -> Checkpoint:
        """Parse a checkpoint's note text (strictly, per tlog-checkpoint)."""
        if not text.endswith("\n"):
            raise NoteError("checkpoint text must end in a newline")
        lines = text[:-1].split("\n")
        if len(lines) < 3:
            raise NoteError("a checkpoint has at least three lines: origin, tree size, root hash")
        origin, size_text, root_text, *extensions = lines
        if not origin:
            raise NoteError("empty checkpoint origin")
        if not size_text.isascii() or not size_text.isdigit() or (size_text != "0" and size_text[0] == "0"):
            raise NoteError(f"tree size {size_text!r} is not a decimal number without leading zeros")
        size = int(size_text)
        if size >= 2**64:
            raise NoteError("tree size out of range")
        root = _b64decode(root_text, "root hash")
        if len(root) != HASH_SIZE:
            raise NoteError(f"root hash is {len(root)} bytes, not {HASH_SIZE}")
        if size == 0 and root != EMPTY_ROOT:
            raise NoteError("a checkpoint of size 0 must carry the empty tree's root")
        if any(not line for line in extensions):
            raise NoteError("empty extension line")
        return cls(origin, size, root, tuple(extensions))


def sign_checkpoint(checkpoint: Checkpoint, signer: Signer) -> str:
    """The checkpoint as a signed note, signed under the key name = its origin (as the spec recommends)."""
    return sign_note(checkpoint.text(), checkpoint.origin, signer)


def open_checkpoint(note: str | bytes, origin: str, public_key: bytes) -> Checkpoint:
    """Verify a checkpoint note from the log ``origin`` signed by ``public_key`` and parse it.

    Raises :class:`NoteError` if the note is malformed, not signed by that key, or about another log."""
    checkpoint = Checkpoint.parse(open_note(note, origin, public_key))
    if checkpoint.origin != origin:
        raise NoteError(f"checkpoint is for log {checkpoint.origin!r}, not {origin!r}")
    return checkpoint



def origin_of(fleet: str, genesis_hash: bytes) -> str:
    """A fledger ledger's checkpoint origin: ``fledger/<fleet>/<first 8 bytes of the genesis hash, hex>``."""
    return check_name(f"fledger/{fleet}/{genesis_hash[:8].hex()}")


class SplitView(Exception):
    """The log signed a checkpoint whose root is not the root of the blocks it signed: two histories."""


class CheckpointWatch:
    """A monitor's check of the log's signed checkpoints against the blocks it verified itself.

    Feed it the verified block hashes (``blocks``) and the notes as they arrive (``note``): a
    note not signed by the log's key raises :class:`NoteError` (anyone may publish junk: the
    caller ignores it); a signed note is compared with the root of the monitor's own chain at
    its size — now if the monitor has that many blocks, else when it does — and a mismatch
    raises :class:`SplitView`. Pure; O(log n) per block."""

    MAX_PENDING = 64  # signed notes ahead of our chain, kept until we catch up (newest kept)

    def __init__(self, origin: str, public_key: bytes) -> None:
        self.origin, self.public_key = origin, public_key
        self._frontier = Frontier()
        self._pending: dict[int, Checkpoint] = {}
        self.latest: Checkpoint | None = None  # the largest checkpoint confirmed against our blocks

    def note(self, raw: str | bytes, hashes: Sequence[bytes]) -> Checkpoint:
        checkpoint = open_checkpoint(raw, self.origin, self.public_key)
        self._pending[checkpoint.size] = checkpoint
        while len(self._pending) > self.MAX_PENDING:
            del self._pending[min(self._pending)]
        self.blocks(hashes)
        return checkpoint

    def blocks(self, hashes: Sequence[bytes]) -> list[Checkpoint]:
        """Catch up with the chain (``hashes``: every verified block hash, in order); returns the
        checkpoints confirmed by it."""
        confirmed = []
        for size in sorted(s for s in self._pending if s <= self._frontier.size):  # at or below our height
            ours = self._frontier.root() if size == self._frontier.size else root([leaf_hash(h) for h in hashes[:size]])
            confirmed.append(self._confirm(self._pending.pop(size), ours))
        while self._frontier.size < len(hashes):
            self._frontier.append(leaf_hash(hashes[self._frontier.size]))
            if self._frontier.size in self._pending:
                confirmed.append(self._confirm(self._pending.pop(self._frontier.size), self._frontier.root()))
        return confirmed

    def _confirm(self, checkpoint: Checkpoint, ours: bytes) -> Checkpoint:
        if ours != checkpoint.root:
            raise SplitView(f"the log signed a checkpoint at size {checkpoint.size} with root {checkpoint.root.hex()} "
                            f"but its signed blocks give {ours.hex()}: two different histories")
        if self.latest is None or checkpoint.size >= self.latest.size:
            self.latest = checkpoint
        return checkpoint
