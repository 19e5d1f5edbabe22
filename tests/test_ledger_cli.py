"""`fledger ledger verify|show|prove|consistency|follow` as a user runs them."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import BrokerInfo
from test_coordinator import FLEET, TOPICS, Harness, weights

from federation import records
from federation.fleet_state import FleetLedger
from federation.mqtt import BrokerConfig, MqttLink
from ledger import Ed25519Signer, LedgerError, make_block


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fledger.cli", "--log-level", "WARNING", *args],
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def finished_round(tmp_path: Path) -> Harness:
    (tmp_path / "coordinator").mkdir()
    h = Harness(tmp_path / "coordinator")
    assert h.send("dev-a", h.update("dev-a", 1, weights(1.0), n=10)).accepted
    assert h.send("dev-b", h.update("dev-b", 1, weights(2.0), n=20)).accepted
    return h


def test_verify_show_prove_consistency(finished_round: Harness, tmp_path: Path) -> None:
    h = finished_round
    path = tmp_path / "copy.log"
    shutil.copy(h.ledger.path, path)
    height = h.ledger.height
    result = cli("ledger", "verify", str(path))
    assert result.returncode == 0 and f"chain of {height} blocks verified" in result.stdout

    shown = json.loads(cli("ledger", "show", "--json", str(path)).stdout)
    assert [b["index"] for b in shown] == list(range(height))
    table = cli("ledger", "show", str(path)).stdout
    assert "aggregate" in table and "genesis" in table

    proof = cli("ledger", "prove", str(path), "--round", "1", "--device", "dev-b")
    assert proof.returncode == 0 and "proof verified" in proof.stdout
    missing = cli("ledger", "prove", str(path), "--round", "1", "--device", "dev-c")
    assert missing.returncode == 1 and "no proof" in missing.stderr

    consistency = cli("ledger", "consistency", str(path), "--old", "3")
    assert consistency.returncode == 0 and json.loads(consistency.stdout)["verified"] is True
    # A monitor that recorded the root at height 3 checks a later file against that root: a
    # file whose history differs from what it saw does not verify.
    recorded = json.loads(consistency.stdout)["old_root"]
    good = cli("ledger", "consistency", str(path), "--old", "3", "--old-root", recorded)
    assert good.returncode == 0 and json.loads(good.stdout)["verified"] is True
    other = cli("ledger", "consistency", str(path), "--old", "3", "--old-root", "00" * 32)
    assert other.returncode == 1 and json.loads(other.stdout)["verified"] is False


def test_verify_names_the_tampered_block(finished_round: Harness, tmp_path: Path) -> None:
    h = finished_round
    aggregate = next(b for b in h.ledger if b.data["type"] == "aggregate")
    path = tmp_path / "tampered.log"
    data = bytearray(h.ledger.path.read_bytes())
    # Change the participants' sample count inside the aggregate block's bytes on disk.
    needle = aggregate.to_bytes()
    at = bytes(data).index(needle) + len(needle) // 2
    data[at] ^= 0x01
    path.write_bytes(bytes(data))
    result = cli("ledger", "verify", str(path))
    assert result.returncode == 1
    assert f"block {aggregate.index}" in result.stdout + result.stderr


def _wait_for(proc: subprocess.Popen[str], text: str, timeout: float = 30) -> None:
    assert proc.stderr is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if text in line:
            return
        if not line and proc.poll() is not None:
            break
    raise AssertionError(f"follower never said {text!r}")


def _follower(broker: BrokerInfo, copy: Path, key: bytes, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "fledger.cli", "ledger", "follow", "--fleet", FLEET, "--broker-host", broker.host,
         "--broker-port", str(broker.port), "--from-file", str(copy), "--timeout", "60",
         "--coordinator-key", key.hex(), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _publish_to(follower: subprocess.Popen[str], broker: BrokerInfo, block: bytes | tuple[bytes, ...],
                before: tuple[bytes, ...] = (), topic: str = TOPICS.ledger_blocks,
                until_said: tuple[str, ...] = ()) -> tuple[str, str]:
    """Once the follower is connected, publish ``before`` (e.g. forgeries) and one block (or
    several) as the coordinator would (or another payload on ``topic``); the follower's output. With
    ``until_said``, ``before`` alone is sent until the follower has logged each of those texts,
    so the block cannot reach it ahead of them (it would finish without having seen them)."""
    assert follower.stderr is not None
    publisher = MqttLink(BrokerConfig(broker_host=broker.host, broker_port=broker.port), "test-block-publisher")
    publisher.start(timeout=20)
    try:
        _wait_for(follower, "connected to")
        said: list[str] = []
        reader = threading.Thread(target=lambda: said.extend(iter(follower.stderr.readline, "")), daemon=True)
        reader.start()
        # Not retained: a publish before the broker has the follower's subscription is lost, so
        # send it again until the follower has seen it (a duplicate is harmless).
        deadline = time.monotonic() + 60
        while follower.poll() is None and time.monotonic() < deadline:
            for junk in before:
                publisher.publish(TOPICS.ledger_blocks, junk, wait=10)
            if all(text in "".join(said) for text in until_said):
                for payload in block if isinstance(block, tuple) else (block,):
                    publisher.publish(topic, payload, wait=10)
            time.sleep(0.5)
        out = follower.communicate(timeout=30)[0]
        reader.join(timeout=10)
        return out, "".join(said)
    finally:
        publisher.stop()
        if follower.poll() is None:
            follower.kill()


def test_follow_verifies_new_blocks_live(finished_round: Harness, embedded_broker: BrokerInfo,
                                         tmp_path: Path) -> None:
    h = finished_round
    copy = tmp_path / "seen.log"
    shutil.copy(h.ledger.path, copy)
    block = h.ledger.append({"type": "operator.note", "text": "open record types are fine"})
    follower = _follower(embedded_broker, copy, h.keys.public.sign_public, "--until-height", str(h.ledger.height))
    out, err = _publish_to(follower, embedded_broker, block.to_bytes())
    assert follower.returncode == 0, err
    assert f"replica verified to height {h.ledger.height}" in out


def test_follow_takes_a_commit_group_once_its_signed_block_arrives(finished_round: Harness,
                                                                  embedded_broker: BrokerInfo, tmp_path: Path) -> None:
    """A group's unsigned blocks, with an unsigned forgery at the same index, then the signed last
    block: the monitor stores exactly the coordinator's chain."""
    h = finished_round
    copy = tmp_path / "seen.log"
    shutil.copy(h.ledger.path, copy)
    group = h.ledger.append_many([{"type": "operator.note", "i": i} for i in range(3)])
    assert [b.unsigned for b in group] == [True, True, False]
    forged = make_block(group[0].index, group[0].timestamp, {"type": "operator.note", "i": -1}, group[0].prev_hash)
    replica = tmp_path / "replica"
    follower = _follower(embedded_broker, copy, h.keys.public.sign_public, "--until-height", str(h.ledger.height),
                         "--replica", str(replica))
    out, err = _publish_to(follower, embedded_broker, group[-1].to_bytes(),
                           before=(forged.to_bytes(), *(b.to_bytes() for b in group[:-1])))
    assert follower.returncode == 0, err
    assert f"replica verified to height {h.ledger.height}" in out and "ALERT" not in err
    from fledger.ledger_cli import ReplicaFile

    assert ReplicaFile(replica).load() == [b.to_bytes() for b in h.ledger]


def test_follow_ignores_and_counts_what_the_coordinator_did_not_sign(
        finished_round: Harness, embedded_broker: BrokerInfo, tmp_path: Path) -> None:
    """On a broker where anyone may publish (the anonymous embedded one): junk as the retained
    ledger head before the monitor starts, 12 junk bytes on the blocks topic, and a valid-looking
    next block signed by another key. None is an alert or an exit; the monitor verifies the
    coordinator's next block, counts the rest and stores only what the coordinator signed."""
    h = finished_round
    copy = tmp_path / "seen.log"
    shutil.copy(h.ledger.path, copy)
    with FleetLedger.open(tmp_path / "forged.log", signer=Ed25519Signer(bytes(range(32))), fleet=FLEET) as other:
        while other.height <= h.ledger.height:
            other.append(records.round_opened(other.height))
        foreign = other.block(h.ledger.height)  # at the very index the monitor waits for
    block = h.ledger.append({"type": "operator.note", "text": "the genuine next block"})
    junk_head = MqttLink(BrokerConfig(broker_host=embedded_broker.host, broker_port=embedded_broker.port), "junk")
    junk_head.start(timeout=20)
    try:
        assert junk_head.publish(TOPICS.ledger_head, b"\x00junk-head\xff", retain=True, wait=10)
    finally:
        junk_head.stop()
    replica = tmp_path / "replica"
    follower = _follower(embedded_broker, copy, h.keys.public.sign_public, "--until-height", str(h.ledger.height),
                         "--replica", str(replica))
    out, err = _publish_to(follower, embedded_broker, block.to_bytes(), before=(b"twelve bytes", foreign.to_bytes()),
                           until_said=("did not sign: malformed", "did not sign: not_coordinator_signed"))
    assert follower.returncode == 0, err
    assert f"replica verified to height {h.ledger.height}" in out
    assert "ALERT" not in err
    assert "did not sign: malformed" in err and "did not sign: not_coordinator_signed" in err
    from fledger.ledger_cli import ReplicaFile

    stored = ReplicaFile(replica).load()
    assert stored == [b.to_bytes() for b in h.ledger]  # the coordinator's blocks, and only those


def test_follow_exit_codes_tell_usage_broker_and_tampering_apart(finished_round: Harness, tmp_path: Path) -> None:
    """2: nothing pinned (usage); 4: no broker; 5: a replica file that another key wrote;
    1 for tampering is asserted by the rewrite test below and by `ledger verify`."""
    from fledger.broker import free_port

    h = finished_round
    copy = tmp_path / "seen.log"
    shutil.copy(h.ledger.path, copy)
    port = str(free_port())  # nothing listens there
    base = ("ledger", "follow", "--fleet", FLEET, "--broker-host", "127.0.0.1", "--broker-port", port)
    unpinned = cli(*base)
    assert unpinned.returncode == 2 and "pin the coordinator" in unpinned.stderr
    unreachable = cli(*base, "--coordinator-key", h.keys.public.sign_public.hex(), "--timeout", "3")
    assert unreachable.returncode == 4, unreachable.stderr
    other_replica = tmp_path / "other-replica"
    from fledger.ledger_cli import ReplicaFile

    with FleetLedger.open(tmp_path / "other.log", signer=Ed25519Signer(bytes(range(32))), fleet=FLEET) as other:
        ReplicaFile(other_replica).append(other.block(0).to_bytes())
    forked = cli(*base, "--coordinator-key", h.keys.public.sign_public.hex(), "--replica", str(other_replica))
    assert forked.returncode == 5 and "does not verify" in forked.stderr
    bad_genesis = cli(*base, "--genesis", "12ab")
    assert bad_genesis.returncode == 2 and "--genesis" in bad_genesis.stderr
    assert cli("ledger", "verify", str(tmp_path / "missing.log")).returncode == 2
    assert cli("ledger", "consistency", str(copy), "--old", "999").returncode == 2  # usage, not tampering


def test_follow_alerts_when_the_coordinator_rewrites_history(finished_round: Harness,
                                                             embedded_broker: BrokerInfo, tmp_path: Path) -> None:
    h = finished_round
    copy = tmp_path / "seen.log"
    shutil.copy(h.ledger.path, copy)
    # The same coordinator key signs a different history: valid hashes and signatures, other blocks.
    with FleetLedger.open(tmp_path / "rewritten.log", signer=Ed25519Signer(h.keys.sign_seed), fleet=FLEET) as other:
        for i in range(4):
            other.append(records.round_opened(100 + i))
        forged = other.block(2)
    assert forged.hash != h.ledger.block(2).hash
    follower = _follower(embedded_broker, copy, h.keys.public.sign_public)
    _, err = _publish_to(follower, embedded_broker, forged.to_bytes())
    assert follower.returncode == 1
    assert "ALERT" in err and "rewrite" in err and "block 2" in err


def test_replica_file_recovers_from_a_torn_write(tmp_path: Path) -> None:
    from fledger.ledger_cli import ReplicaFile

    store = ReplicaFile(tmp_path / "replica")
    store.append(b"block-0")
    store.append(b"block-1")
    with open(tmp_path / "replica", "ab") as handle:
        handle.write((100).to_bytes(4, "big") + b"half a blo")  # killed mid-write
    assert store.load() == [b"block-0", b"block-1"]
    store.append(b"block-2")
    assert store.load() == [b"block-0", b"block-1", b"block-2"]


def test_new_monitor_catches_up_by_replay_from_a_running_coordinator(embedded_broker: BrokerInfo,
                                                                      tmp_path: Path) -> None:
    """No file: the monitor learns the head (retained), asks the coordinator to replay from 0,
    and verifies the whole chain it is sent."""
    from federation_run import Federation

    fed = Federation(tmp_path, embedded_broker.host, embedded_broker.port, rounds=0, limit=200)  # runs on
    try:
        fed.start_all()
        height = _height_once(fed, "aggregate", 120)
        assert height, fed.log_tail()
        follower = _follow(fed, embedded_broker, height, tmp_path / "replica")
    finally:
        fed.stop()
    assert follower.returncode == 0, follower.stderr[-2000:]
    reached = int(follower.stdout.split("replica verified to height ")[1].split(",")[0])
    assert reached >= height  # the chain may have grown while it caught up
    assert (tmp_path / "replica").stat().st_size > 0


def test_bad_files_give_a_clear_error_not_a_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                      caplog: pytest.LogCaptureFixture) -> None:
    from fledger.cli import main

    corrupt = tmp_path / "ledger.log"
    corrupt.write_bytes(b"FLB1" + bytes(40))
    bundle = tmp_path / "bundle.json"
    bundle.write_text('{"coordinator": {}}')
    scaler = tmp_path / "scaler.json"
    scaler.write_text('{"features": {"mean": [0], "std": [1]}}')
    rows = tmp_path / "rows.csv"
    rows.write_text("a,b\n1\n")
    for argv in (["ledger", "show", str(corrupt)],
                 ["ledger", "verify", str(corrupt), "--coordinator-key", str(bundle)],
                 ["predict", "--task", "csv", "--model", str(corrupt), "--data", str(rows), "--scaler", str(scaler)]):
        caplog.clear()
        assert main(argv) == 2, argv
        assert caplog.records and caplog.records[-1].levelname == "ERROR", argv


def test_a_monitor_catches_up_in_batches_on_a_quiet_fleet(embedded_broker: BrokerInfo, tmp_path: Path) -> None:
    """A replay is capped per request (here 2 blocks) and no agent is running, so no new block
    will prompt the monitor: it must ask again by itself until it holds the whole chain."""
    from federation_run import Federation

    fed = Federation(tmp_path, embedded_broker.host, embedded_broker.port, rounds=0,
                     extra_coordinator=["--replay-batch", "2"])
    try:
        fed.start_coordinator()
        height = _height_once(fed, "round.opened", 60)
        assert height >= 5, fed.log_tail()
        follower = _follow(fed, embedded_broker, height, tmp_path / "replica")
    finally:
        fed.stop()
    assert follower.returncode == 0, follower.stderr[-2000:]
    assert f"replica verified to height {height}" in follower.stdout


def _height_once(fed: Any, record_type: str, timeout: float) -> int:
    """The coordinator's ledger height once it holds a ``record_type`` block (0 on timeout)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.3)
        try:
            with FleetLedger.open(fed.state / "ledger.log") as ledger:
                if any(b.data["type"] == record_type for b in ledger):
                    return ledger.height
        except (FileNotFoundError, ValueError, LedgerError):  # not created yet, or no genesis yet
            pass
    return 0


def _follow(fed: Any, broker: BrokerInfo, height: int, replica: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fledger.cli", "ledger", "follow", "--fleet", fed.fleet, "--broker-host",
         broker.host, "--broker-port", str(broker.port), "--until-height", str(height),
         "--timeout", "60", "--replica", str(replica), "--coordinator-key", str(fed.keys / "coordinator.json")],
        capture_output=True, text=True, timeout=90)


def test_follow_alerts_on_a_gap_only_when_the_coordinator_signed_past_it(
        finished_round: Harness, embedded_broker: BrokerInfo, tmp_path: Path) -> None:
    """Two real monitors, no coordinator process to answer their replay requests, --gap-timeout 2.
    Both are sent blocks far ahead signed by ANOTHER key (and junk): that is no gap, no alert, and
    the first runs into its --timeout (exit 3). Then the other is also sent the coordinator's own
    block one past the next: a gap the coordinator's signature proves, unfilled, so exit 1 (gap)."""
    h = finished_round
    copy = tmp_path / "seen.log"
    shutil.copy(h.ledger.path, copy)
    height = h.ledger.height
    with FleetLedger.open(tmp_path / "forged.log", signer=Ed25519Signer(bytes(range(32))), fleet=FLEET) as other:
        while other.height <= height + 5:
            other.append(records.round_opened(other.height))
        foreign = [other.block(i).to_bytes() for i in (height + 1, height + 5)]
    h.ledger.append({"type": "operator.note", "text": "withheld"})
    signed_ahead = h.ledger.append({"type": "operator.note", "text": "signed past the gap"}).to_bytes()
    key = h.keys.public.sign_public
    fooled = _follower(embedded_broker, copy, key, "--gap-timeout", "2", "--timeout", "6", "--client-id", "fooled")
    gapped = _follower(embedded_broker, copy, key, "--gap-timeout", "2", "--timeout", "30", "--client-id", "gapped")
    publisher = MqttLink(BrokerConfig(broker_host=embedded_broker.host, broker_port=embedded_broker.port),
                         "test-gap-publisher")
    publisher.start(timeout=20)
    try:
        _wait_for(fooled, "connected to")
        _wait_for(gapped, "connected to")
        deadline = time.monotonic() + 40
        while (fooled.poll() is None or gapped.poll() is None) and time.monotonic() < deadline:
            for raw in (*foreign, b"twelve bytes"):
                publisher.publish(TOPICS.ledger_blocks, raw, wait=10)
            if fooled.poll() is not None:  # both follow the same topic: the signed block once it is gone
                publisher.publish(TOPICS.ledger_blocks, signed_ahead, wait=10)
            time.sleep(1.0)
    finally:
        publisher.stop()
    _, fooled_err = fooled.communicate(timeout=30)
    _, gapped_err = gapped.communicate(timeout=30)
    assert fooled.returncode == 3 and "ALERT" not in fooled_err, fooled_err[-2000:]
    assert "not_coordinator_signed" in fooled_err
    assert gapped.returncode == 1, gapped_err[-2000:]
    assert f"ALERT: gap at block {height}" in gapped_err


def test_follow_with_a_refused_login_exits_4(tmp_path: Path) -> None:
    """A broker that refuses the login is a connectivity problem (4), not tampering (1) or usage (2)."""
    from fledger import keytool
    from fledger.broker import EmbeddedBroker

    keytool.init_fleet(tmp_path / "keys", FLEET)
    wrong = tmp_path / "wrong.password"
    wrong.write_text("not-the-monitors-password\n")
    wrong.chmod(0o600)
    with EmbeddedBroker(password_file=keytool.broker_password_db(tmp_path / "keys")) as broker:
        base = ("ledger", "follow", "--fleet", FLEET, "--broker-host", broker.host, "--broker-port", str(broker.port),
                "--coordinator-key", str(tmp_path / "keys" / "coordinator.json"), "--username", "monitor",
                "--timeout", "20")
        refused = cli(*base, "--password-file", str(wrong))
    assert refused.returncode == 4, refused.stderr[-2000:]
    assert "refused the connection: Not authorized" in refused.stderr and "ALERT" not in refused.stderr


def test_follow_pinned_by_genesis_hash_ignores_a_forged_genesis(finished_round: Harness, embedded_broker: BrokerInfo,
                                                               tmp_path: Path) -> None:
    """`--genesis HASH` and no key: a self-signed genesis of another key, published first, is
    ignored and never stored; the chain whose genesis has that hash is followed and stored."""
    h = finished_round
    chain = [b.to_bytes() for b in h.ledger]
    with FleetLedger.open(tmp_path / "forged.log", signer=Ed25519Signer(bytes(range(32))), fleet=FLEET) as other:
        forged_genesis = other.block(0).to_bytes()
    replica = tmp_path / "replica"
    follower = subprocess.Popen(
        [sys.executable, "-m", "fledger.cli", "ledger", "follow", "--fleet", FLEET, "--broker-host",
         embedded_broker.host, "--broker-port", str(embedded_broker.port), "--timeout", "60",
         "--genesis", h.ledger.block(0).hash.hex(), "--until-height", str(len(chain)), "--replica", str(replica)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = _publish_to(follower, embedded_broker, tuple(chain), before=(forged_genesis,),
                           until_said=("not_pinned_genesis",))
    assert follower.returncode == 0, err[-2000:]
    assert f"replica verified to height {len(chain)}" in out and "ALERT" not in err
    assert "not_pinned_genesis" in err
    from fledger.ledger_cli import ReplicaFile

    assert ReplicaFile(replica).load() == chain
