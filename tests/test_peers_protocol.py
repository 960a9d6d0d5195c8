"""The peer announcement datagram and the fleet key: hostile bytes are dropped with a reason, never a crash."""

from __future__ import annotations

import hashlib
import os
import stat
import time

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from offgridd.peers.fleet import (
    FLEET_HEADER,
    FleetKeyError,
    NodeIdentity,
    join_fleet,
    load_identity,
    sign_request,
    verify_request,
)
from offgridd.peers.protocol import (
    DROP_REASONS,
    MAX_DATAGRAM,
    MAX_SKEW_S,
    DatagramRejected,
    PeerAnnouncement,
    ReplayGuard,
    _mac,
    inventory_digest,
    new_nonce,
    read_announcement,
)

KEY = bytes(range(32))


def announcement(**changes) -> PeerAnnouncement:
    fields = dict(node="ab" * 16, name="classroom-1", http_port=11611, version="0.1.0",
                  inventory=inventory_digest([("gemma3-270m", "cd" * 32)]), models=1, load=0, queue=0, every=5.0,
                  ts=time.time(), nonce=new_nonce())
    return PeerAnnouncement(**{**fields, **changes})


def reason(data: bytes, key: bytes = KEY) -> str:
    with pytest.raises(DatagramRejected) as e:
        read_announcement(data, key)
    return e.value.reason


def signed(body: dict, key: bytes = KEY, version: int = 1) -> bytes:
    raw = msgpack.packb(body)
    return msgpack.packb([version, raw, _mac(key, raw)])


def test_an_announcement_round_trips_within_the_size_bound():
    ann = announcement(name="x" * 64)
    data = ann.encode(KEY)
    assert len(data) <= MAX_DATAGRAM
    assert read_announcement(data, KEY) == ann


def test_datagrams_are_dropped_with_the_reason_they_fail():
    good = announcement()
    assert reason(good.encode(bytes(32))) == "hmac"
    assert reason(announcement(ts=time.time() - MAX_SKEW_S - 5).encode(KEY)) == "stale"
    assert reason(announcement(ts=time.time() + MAX_SKEW_S + 5).encode(KEY)) == "stale"
    assert reason(b"\x00" * (MAX_DATAGRAM + 1)) == "oversized"
    assert reason(b"\xc1") == "malformed"
    assert reason(b"") == "malformed"
    assert reason(msgpack.packb({"node": "x"})) == "malformed"
    outer = msgpack.unpackb(good.encode(KEY))
    assert reason(msgpack.packb([2, outer[1], outer[2]])) == "version"
    tampered = bytearray(outer[1])
    tampered[-1] ^= 1
    assert reason(msgpack.packb([1, bytes(tampered), outer[2]])) == "hmac"
    body = msgpack.unpackb(outer[1])
    # authentic (right key) but wrong inside: still refused, never trusted
    assert reason(signed({**body, "port": 0})) == "malformed"
    assert reason(signed({**body, "node": "../etc"})) == "malformed"
    assert reason(signed({**body, "ts": float("nan")})) == "malformed"
    assert reason(signed({**body, "nonce": b"short"})) == "malformed"
    assert reason(signed([1, 2, 3])) == "malformed"  # type: ignore[arg-type]
    assert reason(signed(body, version=7)) == "version"


def test_a_replayed_nonce_is_refused_and_old_nonces_are_forgotten():
    guard = ReplayGuard()
    nonce = new_nonce()
    assert guard.fresh(nonce, now=100.0)
    assert not guard.fresh(nonce, now=101.0)
    assert guard.fresh(nonce, now=100.0 + 2 * MAX_SKEW_S + 1)  # by then its timestamp is refused anyway
    small = ReplayGuard(limit=3)
    for _ in range(10):
        small.fresh(new_nonce(), now=0.0)
    assert len(small._seen) <= 3


@settings(max_examples=800, deadline=None)
@given(st.binary(max_size=2 * MAX_DATAGRAM))
def test_random_bytes_are_dropped_never_raised(data):
    try:
        read_announcement(data, KEY)
    except DatagramRejected as e:
        assert e.reason in DROP_REASONS


msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**64 - 1) | st.floats() | st.text()
    | st.binary(),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5),
    max_leaves=20,
)


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(st.sampled_from(["node", "name", "port", "ver", "inv", "models", "load", "queue", "every",
                                        "ts", "nonce", "extra"]), msgpack_values, max_size=12))
def test_authentic_but_hostile_bodies_are_dropped_never_raised(body):
    """Even a fleet member (or a stolen key) cannot crash a listener with odd field types."""
    try:
        read_announcement(signed(body), KEY)
    except DatagramRejected as e:
        assert e.reason in ("malformed", "stale", "oversized")


def test_node_json_is_created_private_and_join_changes_only_the_key(tmp_path):
    first = load_identity(tmp_path)
    path = tmp_path / "node.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_identity(tmp_path) == first
    joined = join_fleet(tmp_path, "  " + KEY.hex().upper() + "\n")
    assert joined.fleet_key == KEY and joined.node_id == first.node_id
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with pytest.raises(FleetKeyError, match="64 hex digits"):
        join_fleet(tmp_path, "not-a-key")
    assert load_identity(tmp_path).fleet_key == KEY  # a refused join changes nothing
    os.chmod(path, 0o644)
    load_identity(tmp_path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_http_calls_between_peers_are_signed_and_checked():
    me = NodeIdentity(node_id="ef" * 16, name="a", fleet_key=KEY)
    guard = ReplayGuard()
    header = sign_request(me, "GET", "/fleet/v1/inventory")[FLEET_HEADER]
    assert verify_request(KEY, header, "GET", "/fleet/v1/inventory", guard) == me.node_id
    with pytest.raises(FleetKeyError, match="already used"):
        verify_request(KEY, header, "GET", "/fleet/v1/inventory", guard)
    header = sign_request(me, "GET", "/fleet/v1/inventory")[FLEET_HEADER]
    with pytest.raises(FleetKeyError, match="does not match"):
        verify_request(KEY, header, "GET", "/fleet/v1/blobs/" + "0" * 64, guard)  # signed for another path
    with pytest.raises(FleetKeyError, match="does not match"):
        verify_request(bytes(32), header, "GET", "/fleet/v1/inventory", guard)
    for bad in ("", "x", "a b c d", header + " extra"):
        with pytest.raises(FleetKeyError):
            verify_request(KEY, bad, "GET", "/fleet/v1/inventory", guard)


def test_a_resumable_import_keeps_what_arrived_and_finishes_from_there(tmp_path):
    """The store's `partial` option, which peer pulls use: an interrupted stream leaves its bytes for the next try."""
    from gguf_factory import gguf_bytes

    from offgridd.store import ModelStore, StoreError

    store = ModelStore(tmp_path / "models")
    store.open()
    data = gguf_bytes(tensors=4, elements=4096)
    sha = hashlib.sha256(data).hexdigest()
    partial = store.root / ".partial" / f"sha256-{sha}.part"
    partial.parent.mkdir()

    def broken(until: int):
        yield data[:until]
        raise ConnectionError("cable pulled")

    with pytest.raises(ConnectionError):
        store.import_chunks(broken(1000), name="m", source="test", expected_sha256=sha, partial=partial)
    assert partial.read_bytes() == data[:1000] and store.find("m") is None
    m = store.import_chunks(iter([data[1000:]]), name="m", source="test", expected_sha256=sha,
                            expected_size=len(data), partial=partial)
    assert m.sha256 == sha and store.verify("m")[0] and not partial.exists()

    partial.write_bytes(data[:1000])
    with pytest.raises(StoreError, match="sha256 mismatch"):
        store.import_chunks(iter([b"\0" * (len(data) - 1000)]), name="m2", source="test", expected_sha256=sha,
                            partial=partial)
    assert not partial.exists() and store.find("m2") is None
