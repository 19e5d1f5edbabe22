"""fledger's ledger: a signed, append-only, verifiable log (hash chain, signatures, Merkle
proofs, storage, checkpoints). What its records mean lives outside it (federation/fleet_state.py
passes its rules in).

A pure library (stdlib, msgpack, pycryptodome, PyNaCl). See docs/ledger.md.
"""

from ledger.block import VERSION, ZERO_HASH, Block, BlockFormatError, leading_zero_bits, make_block, mine
from ledger.canonical import CanonicalError
from ledger.checkpoint import Checkpoint, NoteError, open_checkpoint, parse_verifier_key
from ledger.core import Ledger, chain_root_of
from ledger.keys import Ed25519Signer, Keyring, LedgerSigner, Signer, Verifier, key_id_of
from ledger.merkle import ProofError, verify_consistency, verify_inclusion
from ledger.replica import Event, Replica, ReplicaAlert
from ledger.storage import LedgerCorrupt, LedgerError
from ledger.verify import (
    ChainState,
    RecordRules,
    Rules,
    Signatures,
    VerifyError,
    VerifyReport,
    verify_chain,
    verify_file,
)

__all__ = [
    "VERSION", "ZERO_HASH", "Block", "BlockFormatError", "CanonicalError", "ChainState", "Checkpoint", "Ed25519Signer",
    "Event", "Keyring", "Ledger", "LedgerCorrupt", "LedgerError", "LedgerSigner", "NoteError", "ProofError",
    "RecordRules", "Replica", "ReplicaAlert", "Rules", "Signatures", "Signer", "Verifier", "VerifyError",
    "VerifyReport", "chain_root_of", "key_id_of", "leading_zero_bits", "make_block", "mine",
    "open_checkpoint", "parse_verifier_key", "verify_chain", "verify_consistency", "verify_file",
    "verify_inclusion",
]
