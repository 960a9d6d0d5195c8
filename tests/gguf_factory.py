"""Writes small GGUF files for store tests: valid headers, with tensor data, that llama.cpp need never load."""

from __future__ import annotations

import struct
from pathlib import Path


def _string(s: str) -> bytes:
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def _kv(key: str, value) -> bytes:
    if isinstance(value, str):
        return _string(key) + struct.pack("<I", 8) + _string(value)
    if isinstance(value, list):  # array of strings
        body = b"".join(_string(v) for v in value)
        return _string(key) + struct.pack("<I", 9) + struct.pack("<IQ", 8, len(value)) + body
    return _string(key) + struct.pack("<I", 4) + struct.pack("<I", value)


def gguf_bytes(*, arch: str = "llama", ctx: int = 4096, file_type: int = 15, tensors: int = 2,
               elements: int = 1024, template: str | None = None, version: int = 3) -> bytes:
    """A GGUF v3 file with `tensors` F32 tensors of `elements` each."""
    meta = {"general.architecture": arch, f"{arch}.context_length": ctx, "general.file_type": file_type,
            f"{arch}.block_count": 2, "general.name": "synthetic", "tokenizer.ggml.tokens": ["a", "b", "c"]}
    if template is not None:
        meta["tokenizer.chat_template"] = template
    out = b"GGUF" + struct.pack("<IQQ", version, tensors, len(meta))
    out += b"".join(_kv(k, v) for k, v in meta.items())
    for i in range(tensors):
        out += _string(f"t{i}") + struct.pack("<I", 1) + struct.pack("<Q", elements)
        out += struct.pack("<IQ", 0, i * elements * 4)  # type F32, offset
    out += b"\0" * (-len(out) % 32)
    data = b"".join(struct.pack("<f", float(i % 7)) for i in range(elements))
    return out + data * tensors


def write_gguf(path: Path, **kwargs) -> Path:
    path.write_bytes(gguf_bytes(**kwargs))
    return path
