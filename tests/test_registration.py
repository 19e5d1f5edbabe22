"""An agent commits to its data set and refuses to train on changed data unless re-registering."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edge_agent.registration import (
    DatasetChanged,
    check_registration,
    fingerprint,
    mark_acknowledged,
    opening_matches,
    published_fingerprint,
)
from federation.tasks import csv_task


def write_csv(path: Path, rows: int, offset: float = 0.0) -> None:
    lines = ["address,a,b,y"]
    lines += [f"street {i},{i + offset},{2 * i},{3 * i + 1}" for i in range(rows)]
    path.write_text("\n".join(lines) + "\n")


def test_fingerprint_depends_on_content_and_shard(tmp_path: Path) -> None:
    data_file = tmp_path / "local.csv"
    write_csv(data_file, 50)
    task = csv_task(data_file, "y")
    data = task.load(0, 1)
    first = fingerprint(task, data, "0/1", None)
    assert first == fingerprint(task, data, "0/1", None)
    assert first.sha256 != fingerprint(task, data, "0/2", None).sha256
    assert first.schema["features"] == ["a", "b"] and first.size == data_file.stat().st_size
    write_csv(data_file, 50, offset=0.5)
    assert fingerprint(task, task.load(0, 1), "0/1", None).sha256 != first.sha256


def test_changed_data_is_refused_unless_reregistered(tmp_path: Path) -> None:
    data_file, state = tmp_path / "local.csv", tmp_path / "state"
    write_csv(data_file, 40)
    task = csv_task(data_file, "y")
    original = fingerprint(task, task.load(0, 1), "0/1", None)
    assert check_registration(state, original, reregister=False)  # first start: register
    mark_acknowledged(state)
    assert not check_registration(state, original, reregister=False)  # same data, already in the ledger
    write_csv(data_file, 41)
    changed_task = csv_task(data_file, "y")
    changed = fingerprint(changed_task, changed_task.load(0, 1), "0/1", None)
    with pytest.raises(DatasetChanged, match="--reregister"):
        check_registration(state, changed, reregister=False)
    assert check_registration(state, changed, reregister=True)
    # The new data is now the registered one: no refusal, and it is sent until acknowledged.
    assert check_registration(state, changed, reregister=False)


@pytest.mark.parametrize("content", ["", "{trunc", "[]"])
def test_an_unreadable_registration_file_needs_reregister_not_a_traceback(tmp_path: Path, content: str) -> None:
    """dataset.json left empty or garbled (a power cut on an older version): the agent cannot
    check its data against the registration, says so, and --reregister recovers."""
    data_file, state = tmp_path / "local.csv", tmp_path / "state"
    write_csv(data_file, 30)
    task = csv_task(data_file, "y")
    current = fingerprint(task, task.load(0, 1), "0/1", None)
    state.mkdir()
    (state / "dataset.json").write_text(content)
    with pytest.raises(DatasetChanged, match=r"unreadable.*--reregister"):
        check_registration(state, current, reregister=False)
    assert check_registration(state, current, reregister=True)
    mark_acknowledged(state)
    assert not check_registration(state, current, reregister=False)


def test_only_a_salted_commitment_leaves_the_device_and_it_opens_on_request(tmp_path: Path) -> None:
    """A public data set's SHA-256 is guessable: the device publishes SHA-256(salt || SHA-256)
    instead, with a salt it keeps (0600), the same across restarts, new with new data; its
    dataset.json opens the commitment, another salt or other data does not."""
    data_file, state = tmp_path / "local.csv", tmp_path / "state"
    write_csv(data_file, 40)
    task = csv_task(data_file, "y")
    raw = fingerprint(task, task.load(0, 1), "0/1", None)
    check_registration(state, raw, reregister=False)
    published = published_fingerprint(state, raw)
    assert published.sha256 != raw.sha256 and raw.sha256.hex() not in json.dumps(published.schema)
    assert published.schema["digest"] == "sha256(salt||sha256)" and published.size == raw.size
    assert (state / "dataset.json").stat().st_mode & 0o777 == 0o600
    opening = json.loads((state / "dataset.json").read_text())
    assert opening_matches(opening, published.sha256)
    assert not opening_matches({**opening, "salt": "00" * 32}, published.sha256)
    assert not opening_matches({**opening, "sha256": "11" * 32}, published.sha256)
    mark_acknowledged(state)
    assert not check_registration(state, raw, reregister=False)
    assert published_fingerprint(state, raw) == published  # a restart publishes the same commitment
    write_csv(data_file, 41)
    changed_task = csv_task(data_file, "y")
    changed = fingerprint(changed_task, changed_task.load(0, 1), "0/1", None)
    check_registration(state, changed, reregister=True)
    assert published_fingerprint(state, changed).sha256 != published.sha256


def test_a_registration_without_salt_is_committed_afresh(tmp_path: Path) -> None:
    """dataset.json of an older version (bare SHA-256 published, acknowledged): the agent adds a
    salt and registers the commitment, once."""
    data_file, state = tmp_path / "local.csv", tmp_path / "state"
    write_csv(data_file, 30)
    task = csv_task(data_file, "y")
    raw = fingerprint(task, task.load(0, 1), "0/1", None)
    state.mkdir()
    (state / "dataset.json").write_text(json.dumps({**raw.to_json(), "acknowledged": True}))
    with pytest.raises(DatasetChanged, match="salt"):
        published_fingerprint(state, raw)
    assert check_registration(state, raw, reregister=False)  # to be sent again, now as a commitment
    assert opening_matches(json.loads((state / "dataset.json").read_text()), published_fingerprint(state, raw).sha256)
