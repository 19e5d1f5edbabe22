"""An outsider checks a fledger ledger with tests/independent_verifier.py, written from
docs/ledger.md alone (stdlib + PyNaCl): every block hash and signature, the chain links, a
round inclusion proof, a chain consistency proof and the coordinator's checkpoint notes."""

from __future__ import annotations

import ast
import json
import struct
import sys
import zlib
from pathlib import Path

import independent_verifier as outsider
import msgpack
import pytest
from test_coordinator import TOPICS, Harness, weights

from coordinator.rounds import RoundPolicy

ALL_TYPES = {"genesis", "device.key", "device.key_revoked", "dataset", "round.opened", "update", "update.rejected",
             "aggregate", "model.published", "site.note"}


def fledger(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    from fledger.cli import main

    code = main(["--log-level", "WARNING", "ledger", *argv])
    return code, capsys.readouterr().out


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Harness:
    """A real coordinator (no broker) through a round with two devices, a recorded rejection, a
    revoked key, and a record of a type the ledger does not know."""
    tmp = tmp_path_factory.mktemp("demo")
    h = Harness(tmp)
    assert h.send("dev-a", h.update("dev-a", 1, weights(1.0), n=10)).accepted
    assert h.send("dev-b", h.update("dev-b", 1, weights(2.0), n=20)).accepted  # round 1 aggregated
    assert not h.send("dev-c", h.update("dev-c", 7, weights(3.0), n=5)).accepted  # wrong round: recorded
    h.registry.revoke("dev-c", h.devices["dev-c"].key_id)
    h.coordinator.reload_registry(h.registry)
    h.ledger.append({"type": "site.note", "text": "unknown types are stored and hashed", "n": -40000})
    h.keys.save(tmp / "coordinator.json")
    return h


def test_the_verifier_imports_nothing_from_the_project() -> None:
    tree = ast.parse(Path(outsider.__file__).read_text())
    modules = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
               for alias in node.names}
    modules |= {node.module.split(".")[0] for node in ast.walk(tree)
                if isinstance(node, ast.ImportFrom) and node.module}
    assert modules - {"__future__"} <= set(sys.stdlib_module_names) | {"nacl"}, modules


def test_an_outsider_verifies_blocks_proofs_and_checkpoints(demo: Harness, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    path = str(demo.ledger.path)
    payloads = outsider.read_frames(path)
    blocks = outsider.verify_chain(payloads, pinned_coordinator_key=demo.keys.public.sign_public)
    assert {b["data"]["type"] for b in blocks} == ALL_TYPES
    assert len(blocks) == demo.ledger.height
    # group commit: the round's close left a sealed block (no signature of its own), which the
    # outsider accepted through the links to the group's signed last block
    sealed = [b["index"] for b in blocks if b["key_id"] == "" and b["signature"] == b""]
    assert sealed and all(blocks[i + 1]["signature"] for i in sealed), sealed

    # `show --json` carries each block's exact bytes: the frame payloads, and bodies that hash to `hash`
    code, out = fledger(capsys, "show", "--json", path)
    shown = json.loads(out)
    assert code == 0 and [bytes.fromhex(b["wire_hex"]) for b in shown] == payloads
    assert all(outsider.sha256(bytes.fromhex(b["body_hex"])).hex() == b["hash"] for b in shown)

    # a device's inclusion proof
    code, out = fledger(capsys, "prove", path, "--round", "1", "--device", "dev-b", "--json")
    assert code == 0
    outsider.verify_round_proof(json.loads(out), blocks)

    # the checkpoints the coordinator published, checked with the verifier key printed by the CLI
    code, vkey = fledger(capsys, "checkpoint", path, "--verifier-key")
    assert code == 0
    notes = [p.decode() for t, p, _ in demo.published if t == TOPICS.ledger_checkpoint]
    first_origin, first_size, first_root = outsider.open_checkpoint(notes[0], vkey)
    origin, size, root = outsider.open_checkpoint(notes[-1], vkey)
    assert first_origin == origin == outsider.expected_origin(blocks)
    assert root == outsider.chain_root(blocks, size) and first_root == outsider.chain_root(blocks, first_size)
    # ... and a fresh one signed for the whole file
    code, note = fledger(capsys, "checkpoint", path, "--key", str(Path(path).parent / "coordinator.json"))
    assert code == 0
    assert outsider.open_checkpoint(note, vkey) == (origin, len(blocks), outsider.chain_root(blocks, len(blocks)))

    # consistency between the first and the last published checkpoint
    (tmp_path / "a.note").write_text(notes[0])
    (tmp_path / "b.note").write_text(notes[-1])
    code, out = fledger(capsys, "consistency", path, "--old-checkpoint", str(tmp_path / "a.note"),
                        "--new-checkpoint", str(tmp_path / "b.note"))
    result = json.loads(out)
    assert code == 0 and (result["old"], result["new"]) == (first_size, size)
    assert (bytes.fromhex(result["old_root"]), bytes.fromhex(result["new_root"])) == (first_root, root)
    outsider.verify_consistency_output(result, blocks)


def _frame(payload: bytes) -> bytes:
    length = struct.pack(">I", len(payload))
    return b"FLB1" + length + struct.pack(">I", zlib.crc32(length + payload)) + payload


def test_the_outsider_catches_tampering(demo: Harness, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    payloads = outsider.read_frames(str(demo.ledger.path))
    blocks = outsider.verify_chain(payloads)
    target = next(i for i, b in enumerate(blocks) if b["data"]["type"] == "update")

    def rewritten(i: int, payload: bytes) -> Path:
        out = tmp_path / f"tampered-{len(list(tmp_path.iterdir()))}.log"
        out.write_bytes(b"".join(_frame(payload if j == i else p) for j, p in enumerate(payloads)))
        return out

    # a changed byte with the frame's CRC fixed up: the CRC no longer protects, the hash does
    wire = payloads[target]
    body_at = wire.index(blocks[target]["body"])
    num_samples_at = body_at + blocks[target]["body"].index(b"num_samples") + len(b"num_samples")
    changed = wire[:num_samples_at] + bytes([wire[num_samples_at] ^ 1]) + wire[num_samples_at + 1:]
    with pytest.raises(outsider.Invalid, match=f"block {target}: hash"):
        outsider.verify_chain(outsider.read_frames(str(rewritten(target, changed))))
    # a flipped signature byte
    bad_sig = wire[:-1] + bytes([wire[-1] ^ 1])
    with pytest.raises(outsider.Invalid, match=f"block {target}: bad coordinator signature"):
        outsider.verify_chain(outsider.read_frames(str(rewritten(target, bad_sig))))
    # a sealed block of a commit group, changed and re-hashed so its own hash matches: the block
    # after it no longer links, so the group's signature no longer covers it
    sealed = next(i for i, b in enumerate(blocks) if b["signature"] == b"")
    body = bytearray(blocks[sealed]["body"])
    body[body.index(b"\xcb") + 8] ^= 1  # the last byte of the float64 timestamp: still canonical
    forged = msgpack.packb([bytes(body), outsider.sha256(bytes(body)), "", b""], use_bin_type=True)
    with pytest.raises(outsider.Invalid, match=f"block {sealed + 1}: index or prev_hash does not link"):
        outsider.verify_chain(outsider.read_frames(str(rewritten(sealed, forged))))
    # a chain cut after a sealed block: nothing signed proves it
    with pytest.raises(outsider.Invalid, match="last block carries no signature"):
        outsider.verify_chain(payloads[:sealed + 1])
    # a signed block stripped of its coordinator's signature where no later block seals it
    # (the genesis block), or with a key id but no signature
    genesis = outsider.unpack(payloads[0])
    for key_id in ("", genesis[2]):
        stripped = msgpack.packb([genesis[0], genesis[1], key_id, b""], use_bin_type=True)
        with pytest.raises(outsider.Invalid, match="block 0: bad coordinator signature"):
            outsider.verify_chain([stripped, *payloads[1:]])
    # a coordinator key other than the pinned one
    with pytest.raises(outsider.Invalid, match="pinned"):
        outsider.verify_chain(payloads, pinned_coordinator_key=bytes(32))
    # a damaged frame
    raw = bytearray(demo.ledger.path.read_bytes())
    raw[40] ^= 1
    (tmp_path / "damaged.log").write_bytes(bytes(raw))
    with pytest.raises(outsider.Invalid, match="CRC"):
        outsider.read_frames(str(tmp_path / "damaged.log"))

    # an altered proof, a proof for another round's root, and an altered checkpoint
    code, out = fledger(capsys, "prove", str(demo.ledger.path), "--round", "1", "--device", "dev-a", "--json")
    assert code == 0
    proof = json.loads(out)
    for field, value in (("leaf_index", 1 - proof["leaf_index"]), ("tree_size", 3),
                         ("path", [("00" * 32)] * len(proof["path"])), ("root", "11" * 32)):
        with pytest.raises(outsider.Invalid):
            outsider.verify_round_proof({**proof, field: value}, blocks)
    _, vkey = fledger(capsys, "checkpoint", str(demo.ledger.path), "--verifier-key")
    note = [p.decode() for t, p, _ in demo.published if t == TOPICS.ledger_checkpoint][-1]
    lines = note.split("\n")
    lines[1] = str(int(lines[1]) + 1)
    with pytest.raises(outsider.Invalid, match="signature"):
        outsider.open_checkpoint("\n".join(lines), vkey)
    with pytest.raises(outsider.Invalid):
        outsider.verify_consistency_output({"old": 2, "new": len(blocks), "old_root": "22" * 32,
                                            "new_root": outsider.chain_root(blocks, len(blocks)).hex(),
                                            "proof": [p.hex() for p in demo.ledger.consistency_proof(2)]})


def test_the_example_checkpoint_in_the_docs_verifies() -> None:
    doc = (Path(__file__).parent.parent / "docs" / "ledger.md").read_text()
    section = doc[doc.index("## Checkpoints"):]
    note = section.split("```\n", 2)[1]
    vkey = section.split("verifier key: `", 1)[1].split("`", 1)[0]
    origin, size, root = outsider.open_checkpoint(note, vkey)
    assert origin.startswith("fledger/plant7/") and size == 9 and len(root) == 32


def test_an_excluded_update_is_a_leaf_and_its_device_can_prove_it(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """The round tree holds every accepted update, the ones the strategy excluded too (a scaled,
    poisoned update here): its tree size is participants + excluded, as docs/ledger.md says."""
    h = Harness(tmp_path, RoundPolicy(min_clients=3, quorum=1, deadline_s=0))
    for device, value in (("dev-a", 1.1), ("dev-b", 1.2), ("dev-c", 1.1e6)):
        assert h.send(device, h.update(device, 1, weights(value))).accepted
    path = str(h.ledger.path)
    blocks = outsider.verify_chain(outsider.read_frames(path), pinned_coordinator_key=h.keys.public.sign_public)
    aggregate = next(b["data"] for b in blocks if b["data"]["type"] == "aggregate")
    assert aggregate["participants"] == ["dev-a", "dev-b"] and list(aggregate["excluded"]) == ["dev-c"]
    for device in ("dev-a", "dev-c"):
        code, out = fledger(capsys, "prove", path, "--round", "1", "--device", device, "--json")
        assert code == 0
        proof = json.loads(out)
        assert proof["tree_size"] == 3
        outsider.verify_round_proof(proof, blocks)
        with pytest.raises(outsider.Invalid):  # the size of the participants alone is not the tree's
            outsider.verify_round_proof({**proof, "tree_size": 2}, blocks)
