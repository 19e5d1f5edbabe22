"""Signed presence: heartbeats and Last Wills verify against the device's key, and only
fresh statements move a device's state (no network; the clock is passed in)."""

from __future__ import annotations

import msgpack
import pytest
from manual_clock import ManualClock

from coordinator.presence import PresenceBook
from edge_agent.presence import PresenceSession
from federation import crypto, envelope
from federation.envelope import EnvelopeError
from federation.keys import CoordinatorKeys, DeviceBundle, DeviceRegistry

FLEET = "unit"


@pytest.fixture
def fleet() -> tuple[DeviceRegistry, dict[str, DeviceBundle]]:
    keys = CoordinatorKeys.generate(FLEET)
    registry = DeviceRegistry()
    bundles = {}
    for name in ("pump-01", "pump-02"):
        seed, public = crypto.ed25519_generate()
        registry.add(name, public)
        bundles[name] = DeviceBundle(FLEET, name, seed, keys.public, keys.model_key_id, keys.model_key)
    return registry, bundles


def open_(registry: DeviceRegistry, payload: bytes, fleet: str = FLEET) -> envelope.PresenceStatement:
    return envelope.open_presence(payload, registry.public_key, fleet=fleet)


def test_a_heartbeat_verifies_and_forgeries_do_not(fleet: tuple[DeviceRegistry, dict[str, DeviceBundle]]) -> None:
    registry, bundles = fleet
    session = PresenceSession(bundles["pump-01"], now=5.0)
    statement = open_(registry, session.statement("online", 3))
    assert (statement.device, statement.state, statement.round, statement.seq, statement.started) == \
        ("pump-01", "online", 3, 1, 5.0)
    assert open_(registry, session.last_will()).state == "offline"

    # pump-02 cannot speak for pump-01: its key signs a statement naming pump-01 -> bad signature.
    imposter = DeviceBundle(FLEET, "pump-01", bundles["pump-02"].sign_seed, bundles["pump-02"].coordinator,
                            bundles["pump-02"].model_key_id, bundles["pump-02"].model_key)
    with pytest.raises(EnvelopeError) as err:
        open_(registry, PresenceSession(imposter).statement("online"))
    assert err.value.reason == "unknown_key"  # its key id is not one of pump-01's
    outer = msgpack.unpackb(session.statement("online"), raw=False)
    hdr = msgpack.unpackb(outer["hdr"], raw=False)
    hdr["state"] = "offline"  # flip the state, keep the signature
    outer["hdr"] = msgpack.packb(hdr, use_bin_type=True)
    with pytest.raises(EnvelopeError) as err:
        open_(registry, msgpack.packb(outer, use_bin_type=True))
    assert err.value.reason == "bad_signature"
    # The old unsigned JSON heartbeat, junk, oversize, another fleet: all refused with a reason.
    for payload, reason in ((b'{"state": "online"}', "malformed"), (b"\x00" * 10, "malformed"),
                            (b"\x81" + b"a" * 2000, "oversized")):
        with pytest.raises(EnvelopeError) as err:
            open_(registry, payload)
        assert err.value.reason == reason
    with pytest.raises(EnvelopeError) as err:
        open_(registry, session.statement("online"), fleet="other")
    assert err.value.reason == "wrong_fleet"
    # A device signature over an update header is not a presence signature (domain separation).
    sig = bundles["pump-01"].sign(outer["hdr"])
    with pytest.raises(EnvelopeError):
        open_(registry, msgpack.packb({**outer, "hdr": outer["hdr"], "sig": sig}, use_bin_type=True))


def test_only_fresh_statements_change_presence(fleet: tuple[DeviceRegistry, dict[str, DeviceBundle]]) -> None:
    registry, bundles = fleet
    clock = ManualClock()
    book = PresenceBook(clock)
    first = PresenceSession(bundles["pump-01"], now=1000.0)
    beat1, beat2 = first.statement("online"), first.statement("online")
    assert book.note(open_(registry, beat1)) == "changed"
    assert book.note(open_(registry, beat2)) == "unchanged"
    assert book.note(open_(registry, beat1)) == "replay"  # a captured heartbeat sent again
    assert book.states() == {"pump-01": "online"}

    # The Last Will (signed at connect, counter 0) still takes the device offline.
    assert book.note(open_(registry, first.last_will())) == "changed"
    assert book.states() == {"pump-01": "offline"}
    # A replayed heartbeat of the same session cannot bring it back.
    assert book.note(open_(registry, beat2)) == "replay"

    # The device restarts: a new session.
    second = PresenceSession(bundles["pump-01"], now=2000.0)
    assert book.note(open_(registry, second.statement("online"))) == "changed"
    # Old-session statements are stale while the new session is online.
    assert book.note(open_(registry, first.statement("online"))) == "stale_session"
    assert book.note(open_(registry, first.last_will())) == "stale_session"
    assert book.states() == {"pump-01": "online"}

    # Heartbeats stop (amqtt never fires the Will of a silent client): the timeout does it.
    clock.t += 10
    assert not book.expire(30)
    clock.t += 25
    assert book.expire(30) and book.states() == {"pump-01": "offline"}
    assert not book.expire(30)
    # A device whose clock went back (no RTC) comes back once it is offline.
    third = PresenceSession(bundles["pump-01"], now=10.0)
    assert book.note(open_(registry, third.statement("online"))) == "changed"
