"""Fuzzing the hostile-input formats: GGUF headers, stick manifests, peer datagrams (docs/hostile-input.md).

Each test lets only the format's own error escape, and counts every class of input it saw, by the reason it was
refused: `--hypothesis-show-statistics` lists them per test, and a table of all of them is printed at the end of the
module. Runs stay bounded (max_examples, deadline), about 30 s on 2 shared cores.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import struct
import tracemalloc
from collections import Counter
from pathlib import PurePosixPath

import msgpack
import pytest
from gguf_factory import _string, gguf_bytes
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from offgridd.peers.protocol import (
    DOMAIN,
    DROP_REASONS,
    MAX_DATAGRAM,
    PROTOCOL_VERSION,
    DatagramRejected,
    PeerAnnouncement,
    read_announcement,
)
from offgridd.store import GgufError, read_gguf_info
from offgridd.usb.stick import MAX_MANIFEST_BYTES, StickError, parse_manifest

SEEN: dict[str, Counter] = {"gguf": Counter(), "manifest": Counter(), "datagram": Counter()}
# a deadline per example, generous for 2 loaded cores: an input that takes longer than this is a finding in itself
FUZZ = settings(deadline=5000, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def count(fmt: str, kind: str) -> None:
    """Count a class of input; a refusal no class names, or one only the GGUF safety net caught, is a finding."""
    SEEN[fmt][kind] += 1
    event(kind)
    assert not kind.startswith(("other:", "UNEXPECTED")), f"{fmt}: {kind}"


@pytest.fixture(scope="module", autouse=True)
def summary(request):
    yield
    reporter = request.config.pluginmanager.getplugin("terminalreporter")
    capture = request.config.pluginmanager.getplugin("capturemanager")
    if reporter is None or capture is None:
        return
    with capture.global_and_fixture_disabled():  # written past the output capture, as capsys.disabled() does
        reporter.write_line("")
        reporter.write_line("hostile-input classes seen by tests/test_fuzz.py (docs/hostile-input.md):")
        for fmt, counts in SEEN.items():
            for kind, n in sorted(counts.items(), key=lambda kv: -kv[1]):
                reporter.write_line(f"  {fmt:<9} {n:>6}  {kind}")


# --- GGUF headers ---------------------------------------------------------------------------------------------------

GGUF_CLASSES = [  # the GgufError message -> the class of input it refuses
    ("bad magic", "not GGUF (magic)"), ("unsupported GGUF version", "unsupported version"),
    ("implausible counts", "implausible counts"), ("metadata key of", "key too long"),
    ("empty metadata key", "empty key"), ("duplicate metadata key", "duplicate key"),
    ("array of .* items is out of bounds", "array count out of bounds"),
    ("string of .* out of bounds", "string length out of bounds"), ("arrays of arrays", "nested arrays"),
    ("unknown metadata value type", "unknown value type"), ("not UTF-8", "string not UTF-8"),
    ("it must be", "mistyped known key"), ("not a power of two", "bad alignment"),
    ("tensor name of", "tensor name too long"), ("dimensions", "too many tensor dimensions"),
    ("truncated", "truncated"), ("lacks general.architecture", "no architecture"),
    ("general.architecture is", "architecture too long"), ("holds no tensors", "no tensors"),
    ("lacks .*context_length", "no context length"), ("unreadable header", "UNEXPECTED (safety net)"),
]


def gguf_class(message: str) -> str:
    for pattern, kind in GGUF_CLASSES:
        if re.search(pattern, message):
            return kind
    return f"other: {message[:40]}"


def validate(tmp_path, data: bytes) -> str:
    path = tmp_path / "fuzz.gguf"
    path.write_bytes(data)
    try:
        read_gguf_info(path)
    except GgufError as e:
        return gguf_class(str(e))
    return "accepted"


UINT32, STRING, ARRAY = 4, 8, 9
KNOWN_KEYS = ["general.architecture", "general.alignment", "general.file_type", "general.name", "llama.context_length",
              "tokenizer.chat_template", "llama.block_count"]


@st.composite
def gguf_values(draw, depth: int = 0) -> tuple[int, bytes]:
    """(type, payload) of a metadata value, of any type, with lengths and counts sometimes lying."""
    vtype = draw(st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 99]))
    if vtype in (0, 1, 7):
        return vtype, draw(st.binary(min_size=1, max_size=1))
    if vtype in (2, 3):
        return vtype, draw(st.binary(min_size=2, max_size=2))
    if vtype in (4, 5, 6):
        return vtype, draw(st.binary(min_size=4, max_size=4))
    if vtype in (10, 11, 12):
        return vtype, draw(st.binary(min_size=8, max_size=8))
    if vtype == STRING:
        text = draw(st.binary(max_size=64) | st.text(max_size=64).map(str.encode))
        claimed = draw(st.sampled_from([len(text)] * 4 + [0, len(text) + 1, 1 << 24, 1 << 40, (1 << 64) - 1]))
        return vtype, struct.pack("<Q", claimed) + text
    if vtype == ARRAY and depth < 3:
        items = draw(st.lists(gguf_values(depth + 1), max_size=4))
        itype = items[0][0] if items and draw(st.booleans()) else draw(st.integers(0, 14))
        claimed = draw(st.sampled_from([len(items)] * 4 + [len(items) + 1, 1 << 25, (1 << 64) - 1]))
        return vtype, struct.pack("<IQ", itype, claimed) + b"".join(p for _, p in items)
    return vtype, draw(st.binary(max_size=16))


TYPED = {"general.architecture": (STRING, _string("llama")), "general.alignment": (UINT32, struct.pack("<I", 32)),
         "general.file_type": (UINT32, struct.pack("<I", 15)), "llama.context_length": (UINT32, struct.pack("<I", 64)),
         "general.name": (STRING, _string("fuzz")), "tokenizer.chat_template": (STRING, _string("{{ x }}"))}


def rarely(usual, *odd):
    """Mostly `usual`, sometimes one of the others: inputs stay plausible enough to reach the checks deep inside."""
    return st.integers(0, 15).map(lambda i: usual if i < 12 else odd[(i - 12) % len(odd)])


@st.composite
def gguf_headers(draw) -> bytes:
    """A header near a valid one: the keys the validator needs, each value sometimes of another type, plus
    arbitrary keys and values (nested arrays, lying lengths), counts and tensors that sometimes lie."""
    keys = ["general.architecture", "llama.context_length"] + draw(st.lists(
        st.sampled_from(KNOWN_KEYS[1:4] + KNOWN_KEYS[5:]) | st.text(max_size=12), max_size=5, unique=True))
    if draw(st.integers(0, 9)) == 0:
        keys.append(draw(st.sampled_from(keys)))  # a duplicate
    body = b""
    for key in keys:
        mistyped = key not in TYPED or draw(st.integers(0, 9)) == 0
        vtype, payload = draw(gguf_values()) if mistyped else TYPED[key]
        if key == "general.alignment" and not mistyped:
            payload = struct.pack("<I", draw(rarely(32, 0, 3, 64, 1 << 31)))
        body += _string(key) + struct.pack("<I", vtype) + payload
    if draw(st.integers(0, 5)) == 0:  # an array of arrays, some levels deep
        depth = draw(st.integers(2, 6))
        body += _string("nested") + struct.pack("<I", ARRAY) + struct.pack("<IQ", ARRAY, 1) * (depth - 1)
        body += struct.pack("<IQ", UINT32, 1) + struct.pack("<I", 7)
        keys.append("nested")
    n_kv = draw(rarely(len(keys), len(keys) + 1, max(0, len(keys) - 1), 1 << 16, 1 << 40))
    n_tensors = draw(rarely(2, 0, 1, 3, 1 << 20, 1 << 21))
    version = draw(rarely(3, 2, 1, 4))
    tensors = b""
    for i in range(min(n_tensors, 3)):
        dims = draw(rarely([16], [], [4, 4], [1] * 5, [(1 << 64) - 1], [1 << 40, 1 << 40]))
        name = draw(rarely(f"t{i}", "t" * 63, "t" * 64, "\xff"))
        tensors += _string(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
        tensors += struct.pack("<IQ", draw(rarely(0, 1, 12, 40)), draw(rarely(i * 64, 1 << 40, (1 << 64) - 1)))
    magic = draw(rarely(b"GGUF", b"GGML", b"\0\0\0\0"))
    data = magic + struct.pack("<IQQ", version, n_tensors, n_kv) + body + tensors
    return data + bytes(-len(data) % 32 + draw(rarely(256, 0, 64, 4096)))


def one_tensor_file(*kvs: tuple[str, int, bytes]) -> bytes:
    """A file with these (key, type, payload) metadata and one small F32 tensor: every class is reached each run."""
    out = b"GGUF" + struct.pack("<IQQ", 3, 1, len(kvs))
    out += b"".join(_string(k) + struct.pack("<I", t) + p for k, t, p in kvs)
    out += _string("t0") + struct.pack("<IQIQ", 1, 16, 0, 0)
    return out + bytes(-len(out) % 32 + 64)


ARCH, CTX = ("general.architecture", STRING, _string("llama")), ("llama.context_length", UINT32, struct.pack("<I", 64))


@settings(FUZZ, max_examples=600)
@given(gguf_headers())
@example(one_tensor_file(ARCH, CTX, ("general.alignment", UINT32, struct.pack("<I", 3))))
@example(one_tensor_file(ARCH, CTX, ("general.alignment", STRING, _string("32"))))
@example(one_tensor_file(("general.architecture", STRING, _string("a" * 5000)), CTX))
@example(one_tensor_file(ARCH, CTX, ("x", ARRAY, struct.pack("<IQ", ARRAY, 1) * 100_000)))
@example(one_tensor_file(ARCH, CTX))
def test_gguf_structured_headers_raise_only_gguf_error(tmp_path, data):
    count("gguf", validate(tmp_path, data))


VALID = gguf_bytes(tensors=2, elements=32, template="{{ x }}")


@settings(FUZZ, max_examples=400)
@given(st.data())
def test_gguf_mutated_valid_files_raise_only_gguf_error(tmp_path, data):
    mutated = bytearray(VALID)
    how = data.draw(st.sampled_from(["bytes", "cut", "splice"]))
    if how == "bytes":
        for _ in range(data.draw(st.integers(1, 8))):
            mutated[data.draw(st.integers(0, len(mutated) - 1))] = data.draw(st.integers(0, 255))
    elif how == "cut":
        mutated = mutated[:data.draw(st.integers(0, len(mutated)))]
    else:  # a u64 length or count somewhere in the header replaced by a huge one
        at = data.draw(st.integers(4, 400))
        mutated[at:at + 8] = struct.pack("<Q", data.draw(st.sampled_from([1 << 24, 1 << 32, (1 << 64) - 1])))
    count("gguf", validate(tmp_path, bytes(mutated)))


@settings(FUZZ, max_examples=60)
@given(claimed=st.sampled_from([1 << 20, 15 << 20, 16 << 20, 1 << 30, (1 << 64) - 1]),
       where=st.sampled_from(["value", "key", "tensor name", "array item"]))
def test_gguf_claimed_lengths_never_become_allocations(tmp_path, claimed, where):
    """A header may claim any length; what validating holds stays under a megabyte however much it claims."""
    arch = _string("general.architecture") + struct.pack("<I", STRING) + _string("llama")
    lie = struct.pack("<Q", claimed)
    if where == "value":
        body, n_kv = arch + _string("x") + struct.pack("<I", STRING) + lie, 2
    elif where == "key":
        body, n_kv = arch + lie, 2
    elif where == "array item":
        body, n_kv = arch + _string("x") + struct.pack("<IIQ", ARRAY, STRING, 2) + lie, 2
    else:
        body, n_kv = arch, 1
    data = b"GGUF" + struct.pack("<IQQ", 3, 1, n_kv) + body + (lie if where == "tensor name" else b"")
    data += bytes(4096)
    tracemalloc.start()
    try:
        kind = validate(tmp_path, data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f"validating a claimed {claimed}-byte {where} held {peak} bytes"
    count("gguf", kind)


# --- stick manifests ------------------------------------------------------------------------------------------------

SHA = "ab" * 32
PATHS = st.sampled_from([
    "OFFGRID/m.gguf", "m.gguf", "../m.gguf", "OFFGRID/../../etc/passwd", "/etc/passwd", "./m.gguf", "a//b.gguf",
    "a\\..\\b.gguf", "a/\0b.gguf", "", "a/" * 600 + "m.gguf", "OFFGRID/./m.gguf", "..", ".", "a/..", "~/m.gguf",
    "OFFGRID/caf\udce9.gguf",  # from a JSON "\\udce9" escape: the surrogateescape of a non-UTF-8 byte
]) | st.text(max_size=40)
FIELDS = {
    "name": st.sampled_from(["tiny", "qwen2.5:0.5b", "", "a" * 200, "../x", "bad name", "x/y"]) | st.text(max_size=20),
    "file": PATHS,
    "sha256": st.sampled_from([SHA, SHA.upper(), SHA[:-1], "z" * 64, ""]) | st.text(max_size=70),
    "size": st.sampled_from([1, 1024, 0, -1, 1 << 50, 1 << 49, True]) | st.floats() | st.text(max_size=4),
    "quantization": st.sampled_from(["Q4_K_M", "", " ", "q" * 5000]) | st.integers(),
    "license": st.sampled_from(["MIT", "", "l" * 5000, "\ud800"]) | st.none(),
    "description": st.none() | st.text(max_size=20) | st.integers(),
    "extra": st.integers(),
}
json_leaf = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10)


@st.composite
def manifest_entries(draw) -> dict:
    good = {"name": "tiny", "file": "OFFGRID/m.gguf", "sha256": SHA, "size": 1024, "quantization": "Q4_K_M",
            "license": "MIT"}
    for key in draw(st.sampled_from([["file"], [], ["name"], ["sha256"], ["size"], ["quantization"], ["license"],
                                     ["description"], ["extra"], ["file", "size"]])):
        good[key] = draw(FIELDS[key])
    if draw(st.integers(0, 9)) == 0:
        del good[draw(st.sampled_from(sorted(good)))]
    return good


@st.composite
def manifests(draw) -> bytes:
    kind = draw(rarely("structured", "json", "nested", "bytes", "oversized"))
    if kind == "structured":
        doc = {"format": draw(rarely(1, 2, 0, True, "1", None)),
               "models": draw(st.lists(manifest_entries(), min_size=1, max_size=3)) if draw(rarely(True, False))
               else draw(st.sampled_from([[], None, {}, "x", [1] * 300]))}
        if draw(rarely(False, True)):
            doc[draw(st.sampled_from(["created_by", "created", "unknown"]))] = draw(json_leaf)
        return json.dumps(doc).encode()
    if kind == "json":
        return json.dumps(draw(st.recursive(json_leaf, lambda c: st.lists(c, max_size=4)
                                            | st.dictionaries(st.text(max_size=6), c, max_size=4)))).encode()
    if kind == "nested":  # deeper than Python's recursion limit, within the size bound
        depth = draw(st.integers(10, 200_000))
        return draw(st.sampled_from([b"[", b'{"a":'])) * depth
    if kind == "oversized":
        return b" " * (MAX_MANIFEST_BYTES + 1)
    return draw(st.binary(max_size=256))


def one_model(**change) -> bytes:
    entry = {"name": "tiny", "file": "OFFGRID/m.gguf", "sha256": SHA, "size": 1024, "quantization": "Q4_K_M",
             "license": "MIT", **change}
    return json.dumps({"format": 1, "models": [entry]}).encode()


@settings(FUZZ, max_examples=600)
@given(manifests())
@example(one_model(file="/etc/passwd"))
@example(one_model(file="OFFGRID/../../etc/passwd"))
@example(one_model(file="OFFGRID\\..\\m.gguf"))
@example(one_model(file="OFFGRID/caf\udce9.gguf"))
@example(b"[" * 100_000)
@example(b" " * (MAX_MANIFEST_BYTES + 1))
@example(one_model())
def test_stick_manifests_raise_only_stick_error_and_paths_never_leave_the_stick(data):
    try:
        models = parse_manifest(data)
    except StickError as e:
        count("manifest", manifest_class(str(e)))
        return
    count("manifest", "accepted")
    for m in models:
        path = PurePosixPath(m.file)
        assert not path.is_absolute() and ".." not in path.parts and "\\" not in m.file and "\0" not in m.file
        assert str(path) == m.file and m.file not in ("", ".")
        m.file.encode("utf-8")  # a job record and an event can carry it


MANIFEST_CLASSES = [
    ("over the", "oversized"), ("not valid JSON", "not JSON"), ("nested too deeply", "nested too deeply"),
    ("top level must be an object", "not an object"), ("format", "unsupported format"),
    ("unknown top-level keys", "unknown top-level key"), ("'models' must be", "models not a list of 1-256"),
    ("must be an object", "entry not an object"), ("unknown keys", "unknown entry key"),
    (r"\.name", "bad name"), ("duplicate model name", "duplicate name"), ("sha256", "bad sha256"),
    (r"\.size", "bad size"), ("absolute path", "absolute path"), ("'..' component", "path leaves the stick"),
    ("not a plain relative path", "odd path (NUL, backslash, long)"), ("not valid UTF-8", "path or text not UTF-8"),
    (r"\.file", "bad path"),
    (r"\.(quantization|license|description)", "bad text field"),
]


def manifest_class(message: str) -> str:
    for pattern, kind in MANIFEST_CLASSES:
        if re.search(pattern, message):
            return kind
    return f"other: {message[:40]}"


# --- peer datagrams -------------------------------------------------------------------------------------------------

KEY = bytes(range(32))
GOOD_BODY = PeerAnnouncement(node="0f" * 16, name="box", http_port=11611, version="1.0", inventory="0" * 16,
                             models=1, load=0, queue=0, every=5.0, boot=3, seq=9, clock=1.7e9).body()
msgpack_leaf = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=70)
                | st.binary(max_size=70))


def mac(key: bytes, body: bytes) -> bytes:
    return hmac.new(key, DOMAIN + body, hashlib.sha256).digest()


@st.composite
def datagrams(draw) -> bytes:
    kind = draw(rarely("signed body", "outer", "bytes", "huge", "wrong key", "bit flip"))
    if kind == "bytes":
        return draw(st.binary(max_size=MAX_DATAGRAM))
    if kind == "huge":
        return draw(st.binary(min_size=MAX_DATAGRAM + 1, max_size=MAX_DATAGRAM + 64))
    body = dict(GOOD_BODY)
    for key in draw(st.lists(st.sampled_from(sorted(body) + ["extra"]), max_size=2, unique=True)):
        if draw(st.booleans()):
            body[key] = draw(msgpack_leaf | st.lists(msgpack_leaf, max_size=3))
        else:
            body.pop(key, None)
    try:
        packed = msgpack.packb(body)
    except (OverflowError, ValueError, TypeError):
        packed = msgpack.packb(GOOD_BODY)
    if kind == "outer":
        outer = draw(st.lists(msgpack_leaf, max_size=4) | msgpack_leaf)
        return msgpack.packb(outer)
    key = draw(st.binary(min_size=32, max_size=32)) if kind == "wrong key" else KEY
    version = draw(rarely(PROTOCOL_VERSION, 1, 3, True, -1))
    datagram = msgpack.packb([version, packed, mac(key, packed)])
    if kind == "bit flip":
        flipped = bytearray(datagram)
        flipped[draw(st.integers(0, len(flipped) - 1))] ^= 1 << draw(st.integers(0, 7))
        datagram = bytes(flipped)
    return datagram


@settings(FUZZ, max_examples=800)
@given(datagrams())
def test_peer_datagrams_raise_only_datagram_rejected_with_a_counted_reason(data):
    try:
        read_announcement(data, KEY)
    except DatagramRejected as e:
        assert e.reason in DROP_REASONS
        count("datagram", f"dropped: {e.reason}")
        return
    count("datagram", "accepted")
