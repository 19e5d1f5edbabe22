"""Operator errors end in one line on stderr and a documented exit code, never a traceback, and
are found before connecting to the broker (real `fledger` processes; the broker port given is
closed, so a command that tried to connect first would hang in its retries instead)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

from federation import exit_codes
from fledger import keytool

CLOSED_PORT_ARGS = ["--broker-host", "127.0.0.1"]


def closed_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])  # nothing listens once it is closed


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "fledger.cli", *args]


def test_each_operator_error_is_one_line_and_an_exit_code(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keytool.init_fleet(keys, "f", force=True)
    keytool.add_device(keys, "edge-1")
    bundle = str(keytool.bundle_path(keys, "edge-1"))
    port = closed_port()
    broker = [*CLOSED_PORT_ARGS, "--broker-port", port]
    csvs = {"empty": "", "header_only": "a,b,y\n", "ragged": "a,b,y\n1,2,3\n4,5\n",
            "non_numeric_target": "a,b,y\n1,2,x\n3,4,5\n", "no_target": "a,b\n1,2\n3,4\n"}
    for name, text in csvs.items():
        (tmp_path / f"{name}.csv").write_text(text)
    coordinator_keys = str(keys / keytool.COORDINATOR_FILE)
    (tmp_path / "half_key.json").write_text((keys / keytool.COORDINATOR_FILE).read_text().replace("enc_seed", "x"))
    half_bundle = json.loads(Path(bundle).read_text())
    del half_bundle["sign_seed"]
    (tmp_path / "half_bundle.json").write_text(json.dumps(half_bundle))
    (tmp_path / "model.safetensors").write_bytes(b"\x10" + bytes(7) + b'{"a":1}')

    def coordinator(*extra: str, state: str = "state") -> list[str]:
        return cli("coordinator", *broker, "--fleet", "f", "--task", "csv", "--csv-features", "2",
                   "--state-dir", str(tmp_path / state), "--keys", coordinator_keys,
                   "--devices", str(keys / keytool.REGISTRY_FILE), *extra)

    cases: dict[str, tuple[list[str], int, str]] = {
        **{f"csv {name}": (cli("agent", *broker, "--bundle", bundle, "--task", "csv", "--data",
                                str(tmp_path / f"{name}.csv"), "--target", "y", "--state-dir", str(tmp_path / name)),
                           exit_codes.USAGE, f"{name}.csv") for name in csvs},
        "csv missing": (cli("agent", *broker, "--bundle", bundle, "--task", "csv", "--data",
                            str(tmp_path / "nope.csv"), "--target", "y"), exit_codes.USAGE, "not found"),
        "key file missing a field": (coordinator("--keys", str(tmp_path / "half_key.json")), exit_codes.USAGE,
                                     "enc_seed"),
        "device bundle missing a field": (cli("agent", *broker, "--bundle", str(tmp_path / "half_bundle.json"),
                                              "--task", "csv", "--data", str(tmp_path / "ragged.csv"), "--target",
                                              "y"), exit_codes.USAGE, "sign_seed"),
        "task typo": (coordinator("--task", "califronia"), exit_codes.USAGE, "califronia"),
        "devices typo": (coordinator("--devices", str(keys / "devces.json")), exit_codes.USAGE, "devces.json"),
        "port out of range": (coordinator("--broker-port", "99999"), exit_codes.USAGE, "99999"),
        "negative model retention": (coordinator("--keep-models", "-1"), exit_codes.USAGE, "keep_models"),
        "max payload too small": (coordinator("--max-payload", "100"), exit_codes.USAGE, "max_payload 100"),
        "corrupt model for predict": (cli("predict", "--model", str(tmp_path / "model.safetensors"), "--data",
                                          str(tmp_path / "ragged.csv")), exit_codes.USAGE, "model.safetensors"),
    }
    # A coordinator holding the state directory (it keeps retrying the closed port meanwhile).
    holder = subprocess.Popen(coordinator(state="busy"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "busy" / "lock").exists() or not (tmp_path / "busy" / "lock").read_text():
            assert holder.poll() is None and time.monotonic() < deadline, "the first coordinator did not start"
            time.sleep(0.2)
        second = subprocess.run(coordinator(state="busy"), capture_output=True, text=True, timeout=120)
        assert holder.poll() is None, "the first coordinator gave up before the second one was refused"
        assert second.returncode == exit_codes.STATE and "another coordinator" in second.stderr, second.stderr
    finally:
        holder.terminate()
        holder.wait(20)
    procs = {name: subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for name, (cmd, _, _) in cases.items()}
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=240)
        _, code, words = cases[name]
        lines = [line for line in err.splitlines() if line.strip()]
        assert proc.returncode == code, (name, proc.returncode, err)
        assert "Traceback" not in err and len(lines) == 1 and words in lines[0], (name, err)
