"""The peer datagram, the calls between members and the fleet key: hostile bytes are refused with a reason."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import time

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from offgridd.peers.exchange import (
    REFUSALS,
    ExchangeRefused,
    SeqWindow,
    digest,
    endpoint,
    new_challenge,
    sign_answer,
    sign_request,
    verify_answer,
    verify_request,
)
from offgridd.peers.fleet import FleetKeyError, join_fleet, load_identity, rotate_fleet_key
from offgridd.peers.protocol import (
    DROP_REASONS,
    MAX_DATAGRAM,
    DatagramRejected,
    PeerAnnouncement,
    _mac,
    announcement_from,
    inventory_digest,
    read_announcement,
)

KEY = bytes(range(32))
A, B = "aa" * 16, "bb" * 16
AT_B = "10.0.0.2:11611"


def announcement(**changes) -> PeerAnnouncement:
    fields = dict(node="ab" * 16, name="classroom-1", http_port=11611, version="0.1.0",
                  inventory=inventory_digest([("gemma3-270m", "cd" * 32)]), models=1, load=0, queue=0, every=5.0,
                  boot=3, seq=17, clock=time.time())
    return PeerAnnouncement(**{**fields, **changes})


def reason(data: bytes, key: bytes = KEY) -> str:
    with pytest.raises(DatagramRejected) as e:
        read_announcement(data, key)
    return e.value.reason


def signed(body: dict, key: bytes = KEY, version: int = 2) -> bytes:
    raw = msgpack.packb(body)
    return msgpack.packb([version, raw, _mac(key, raw)])


def test_an_announcement_round_trips_within_the_size_bound():
    ann = announcement(name="x" * 64, boot=(1 << 63) - 1, seq=(1 << 63) - 1)
    data = ann.encode(KEY)
    assert len(data) <= MAX_DATAGRAM
    assert read_announcement(data, KEY) == ann


def test_an_announcement_from_a_box_whose_clock_is_at_1970_or_far_ahead_is_still_read():
    for clock in (0.0, 3600.0, time.time() + 10 * 365 * 86400):
        assert read_announcement(announcement(clock=clock).encode(KEY), KEY).clock == clock


def test_datagrams_are_dropped_with_the_reason_they_fail():
    good = announcement()
    assert reason(good.encode(bytes(32))) == "hmac"
    assert reason(b"\x00" * (MAX_DATAGRAM + 1)) == "oversized"
    assert reason(b"\xc1") == "malformed"
    assert reason(b"") == "malformed"
    assert reason(msgpack.packb({"node": "x"})) == "malformed"
    outer = msgpack.unpackb(good.encode(KEY))
    assert reason(msgpack.packb([1, outer[1], outer[2]])) == "version"  # a v1 box: its datagrams are not read
    tampered = bytearray(outer[1])
    tampered[-1] ^= 1
    assert reason(msgpack.packb([2, bytes(tampered), outer[2]])) == "hmac"
    body = msgpack.unpackb(outer[1])
    # authentic (right key) but wrong inside: still refused, never trusted
    for bad in ({"port": 0}, {"node": "../etc"}, {"clock": float("nan")}, {"clock": float("inf")}, {"boot": 0},
                {"seq": -1}, {"boot": 1 << 63}, {"seq": True}):
        assert reason(signed({**body, **bad})) == "malformed", bad
    assert reason(signed([1, 2, 3])) == "malformed"  # type: ignore[arg-type]
    assert reason(signed(body, version=7)) == "version"


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
                                        "boot", "seq", "clock", "extra"]), msgpack_values, max_size=13))
def test_authentic_but_hostile_bodies_are_dropped_never_raised(body):
    """Even a fleet member (or a stolen key) cannot crash a listener with odd field types."""
    try:
        read_announcement(signed(body), KEY)
    except DatagramRejected as e:
        assert e.reason in ("malformed", "oversized")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5),
    max_leaves=20,
)


@settings(max_examples=400, deadline=None)
@given(json_values | st.dictionaries(st.sampled_from(["node", "name", "port", "ver", "inv", "models", "load", "queue",
                                                      "every", "boot", "seq", "clock"]), json_values, max_size=12))
def test_a_signed_hello_answer_of_any_shape_is_refused_never_raised(body):
    """A hello answer's body is JSON read by the same checks as a datagram's body, after its signature."""
    try:
        announcement_from(json.loads(json.dumps(body)))
    except DatagramRejected as e:
        assert e.reason == "malformed"


def call(window: SeqWindow, header: str, *, my_boot: int = 5, path: str = "/fleet/v2/inventory", local: str = AT_B,
         key: bytes = KEY, body: bytes = b""):
    return verify_request(key, header, me=B, my_boot=my_boot, method="GET", path=path, local=local,
                          body_digest=digest(body), window=window)


def refusal(*args, **kwargs) -> str:
    with pytest.raises(ExchangeRefused) as e:
        call(*args, **kwargs)
    return e.value.reason


def request_from_a(seq: int, *, boot: int = 2, to_boot: int = 5, target: str = AT_B, body: bytes = b"") -> str:
    headers, _ = sign_request(KEY, node=A, boot=boot, seq=seq, to_node=B, to_boot=to_boot, method="GET",
                              path="/fleet/v2/inventory", target=target, body=body)
    return headers["X-Offgrid-Fleet"]


def test_a_signed_call_is_taken_once_and_never_after_the_receiver_restarts():
    window = SeqWindow()
    first = request_from_a(1)
    assert call(window, first).node == A
    assert refusal(window, first) == "replay"
    assert refusal(SeqWindow(), first, my_boot=6) == "stale", "B restarted: what was signed for its last start is old"
    # calls arrive out of order when several are in flight; each counter is still taken once
    assert call(window, request_from_a(3)).seq == 3
    assert call(window, request_from_a(2)).seq == 2
    assert refusal(window, request_from_a(2)) == "replay"
    # A restarted: its new start begins its counter again, and its old start's calls are refused from then on
    assert call(window, request_from_a(1, boot=3)).boot == 3
    assert refusal(window, request_from_a(4, boot=2)) == "replay"
    # a call signed for another address was relayed; one signed for another body was altered; another key: a stranger
    assert refusal(window, request_from_a(7, target="10.0.0.66:11611")) == "signature"
    assert refusal(window, request_from_a(8, body=b"{}"), body=b"{\"model\": \"x\"}") == "signature"
    assert refusal(window, request_from_a(9), key=bytes(32)) == "signature"
    assert refusal(window, request_from_a(10), path="/fleet/v2/blobs/" + "0" * 64) == "signature"
    for bad in ("", "x", "v1 a b c", request_from_a(11) + " extra", request_from_a(12).replace("v2", "v1", 1)):
        assert refusal(window, bad) == "signature"


def test_old_counters_outside_the_window_are_refused_and_members_are_bounded():
    window = SeqWindow(senders=2, width=8)
    assert window.fresh(A, 1, 100)
    assert not window.fresh(A, 1, 92) and window.fresh(A, 1, 93)
    for n in range(5):
        window.fresh(f"{n:032x}", 1, 1)
    assert len(window._seen) == 2


def test_an_answer_proves_its_node_at_the_address_dialed_for_this_request_only():
    nonce, body = new_challenge(), b'{"node": "' + B.encode() + b'"}'
    signed_body = digest(body)

    def answer(node=B, local=AT_B, bound_to=nonce, key=KEY, status=200, body_digest=signed_body) -> str:
        return sign_answer(key, node=node, bound_to=bound_to, local=local, status=status,
                           content_type="application/json", content_range="", body_digest=body_digest)

    def check(header, got=body, status=200, content_type="application/json", node=B):
        verify_answer(KEY, header, node=node, bound_to=nonce, dialed=AT_B, status=status, content_type=content_type,
                      body=got)

    def refused(*args, **kwargs) -> str:
        with pytest.raises(ExchangeRefused) as e:
            check(*args, **kwargs)
        assert e.value.reason in REFUSALS
        return e.value.reason

    check(answer())
    assert refused(None) == "unsigned"
    assert refused(answer(node=A), node=B) == "impostor"
    assert refused(answer(local="10.0.0.66:11611")) == "relayed", "a member's answer, relayed from another address"
    assert refused(answer(bound_to=new_challenge())) == "forged", "an answer to an earlier request, replayed"
    assert refused(answer(key=bytes(32))) == "forged"
    assert refused(answer(), got=body.replace(b"bb", b"cc")) == "altered"
    assert refused(answer(), status=206) == "forged"
    assert refused(answer(), content_type="text/html") == "forged"
    assert refused(answer(body_digest=None)) == "altered", "a body that must be signed was not"


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=400), st.text(max_size=400))
def test_hostile_fleet_headers_are_refused_never_raised(request_header, answer_header):
    with pytest.raises(ExchangeRefused):
        call(SeqWindow(), request_header)
    with pytest.raises(ExchangeRefused):
        verify_answer(KEY, answer_header, node=B, bound_to="0" * 32, dialed=AT_B, status=200,
                      content_type="application/json", body=b"")


def test_addresses_are_written_the_same_way_by_both_ends():
    assert endpoint("::ffff:10.0.0.2", 11611) == endpoint("10.0.0.2", 11611) == "10.0.0.2:11611"
    assert endpoint("fe80::1", 80) == "[fe80::1]:80"


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
    rotated = rotate_fleet_key(tmp_path)
    assert rotated.fleet_key != KEY and rotated.node_id == first.node_id
    assert load_identity(tmp_path) == rotated
    assert sorted(p.name for p in tmp_path.iterdir()) == ["node.json"], "no temporary file is left behind"


def test_fleet_join_run_as_root_never_writes_or_reads_through_a_planted_symlink(tmp_path):
    """The daemon's user owns the state directory; it must not be able to make root's `fleet join` write elsewhere."""
    state, precious = tmp_path / "state", tmp_path / "shadow"
    state.mkdir()
    precious.write_text("root:secret\n")
    (state / "node.json").symlink_to(precious)
    offgridd = [sys.executable, "-m", "offgridd", "fleet"]
    out = subprocess.run([*offgridd, "join", KEY.hex(), "--state", str(state)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 1 and "symbolic link" in out.stderr and "remove it" in out.stderr
    out = subprocess.run([*offgridd, "key", "--state", str(state)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "secret" not in out.stdout + out.stderr
    assert precious.read_text() == "root:secret\n" and (state / "node.json").is_symlink()
    # a FIFO where node.json should be does not hang it either
    (state / "node.json").unlink()
    os.mkfifo(state / "node.json")
    out = subprocess.run([*offgridd, "key", "--state", str(state)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "not a regular file" in out.stderr
    # once the owner removes it, join writes a regular file of its own, private, and nothing else
    (state / "node.json").unlink()
    out = subprocess.run([*offgridd, "join", KEY.hex(), "--state", str(state)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    node = state / "node.json"
    assert not node.is_symlink() and stat.S_IMODE(node.stat().st_mode) == 0o600
    assert load_identity(state).fleet_key == KEY and precious.read_text() == "root:secret\n"


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


@pytest.fixture
def small_disk(tmp_path):
    """A 6 MiB filesystem of its own (tmpfs), to fill up."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a small filesystem needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(disk)], check=True, timeout=10)
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=False, timeout=10)


def test_a_resumed_pull_on_a_nearly_full_disk_needs_room_only_for_what_is_missing(small_disk):
    from gguf_factory import gguf_bytes

    from offgridd.store import ModelStore, StoreError

    store = ModelStore(small_disk / "models")
    store.open()
    data = gguf_bytes(tensors=16, elements=1 << 16)  # about 4 MiB
    sha = hashlib.sha256(data).hexdigest()
    partial = store.root / ".partial" / f"sha256-{sha}.part"
    partial.parent.mkdir()
    partial.write_bytes(data[: len(data) * 3 // 4])
    (small_disk / "ballast").write_bytes(bytes(shutil.disk_usage(small_disk).free - len(data) // 2))
    free = shutil.disk_usage(small_disk).free
    assert len(data) // 4 < free < len(data), "the whole model would not fit, what is missing does"
    # with nothing received, the model is refused before a byte is written, with the numbers
    with pytest.raises(StoreError, match=r"not enough space: the model needs \d+ more bytes, \d+ are free"):
        store.import_chunks(iter([data]), name="atlas", source="test", expected_sha256=sha, expected_size=len(data),
                            partial=partial.with_name("sha256-other.part"))
    m = store.import_chunks(iter([data[len(data) * 3 // 4:]]), name="atlas", source="test", expected_sha256=sha,
                            expected_size=len(data), partial=partial)
    assert store.verify(m.name)[0] and not partial.exists()
