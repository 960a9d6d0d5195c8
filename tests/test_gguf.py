"""The GGUF header reader refuses hostile and broken files with a GgufError, never anything worse."""

from __future__ import annotations

import struct

import pytest
from gguf_factory import gguf_bytes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from offgridd.store import GgufError, ModelStore, read_gguf_info


def test_the_builtin_model_header_reads_as_gemma3_q4_k_m(model_state):
    store = ModelStore(model_state / "models")
    info = read_gguf_info(store.path_of(store.get("gemma3-270m")))
    assert (info.architecture, info.quantization, info.context_length) == ("gemma3", "Q4_K_M", 32768)
    assert info.hyperparameters["block_count"] == 18 and info.hyperparameters["attention.head_count_kv"] == 1
    assert not info.has_chat_template


def _header(version=3, tensors=0, kvs=0) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", version, tensors, kvs)


@pytest.mark.parametrize("data, reason", [
    (b"", "bad magic"),
    (b"GGML" + bytes(20), "bad magic"),
    (_header(version=1), "unsupported GGUF version"),
    (_header(tensors=1 << 40), "implausible counts"),
    (_header(kvs=1 << 40), "implausible counts"),
    (_header(kvs=1) + struct.pack("<Q", 1 << 60), "out of bounds"),
    (_header(kvs=1) + struct.pack("<Q", 1) + b"k" + struct.pack("<I", 99), "unknown metadata value type"),
    (_header(kvs=1) + struct.pack("<Q", 1) + b"k" + struct.pack("<IIQ", 9, 4, 1 << 40), "out of bounds"),
    (_header(kvs=0), "lacks general.architecture"),
    (gguf_bytes()[:40], "truncated"),
    (gguf_bytes()[:-1], "truncated file"),
])
def test_hostile_headers_are_refused_with_a_reason(tmp_path, data, reason):
    path = tmp_path / "x.gguf"
    path.write_bytes(data)
    with pytest.raises(GgufError, match=reason):
        read_gguf_info(path)


def test_every_truncation_of_a_valid_file_is_caught(tmp_path):
    data = gguf_bytes(tensors=3, elements=64)
    path = tmp_path / "x.gguf"
    for cut in range(0, len(data), 7):
        path.write_bytes(data[:cut])
        with pytest.raises(GgufError):
            read_gguf_info(path)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_random_corruption_never_raises_anything_but_gguf_error(tmp_path, data):
    original = bytearray(gguf_bytes(tensors=2, elements=32, template="{{ x }}"))
    for _ in range(data.draw(st.integers(1, 8))):
        i = data.draw(st.integers(0, len(original) - 1))
        original[i] = data.draw(st.integers(0, 255))
    path = tmp_path / "fuzz.gguf"
    path.write_bytes(bytes(original))
    try:
        read_gguf_info(path)
    except GgufError:
        pass
