"""A bounded reader for GGUF headers: enough to refuse a bad file before llama.cpp ever sees it.

Every count and length read from the file is checked against a bound before anything is allocated, so a hostile
header costs a clear error, never memory. Tensor extents are checked against the file size, which catches truncation.
What llama.cpp's own reader (ggml/src/gguf.cpp) refuses is refused here too: nested arrays, empty or duplicate keys,
a general.alignment that is not a uint32 power of two, tensor names of 64 bytes or more. Only string values short
enough to matter are kept; longer ones (a chat template, a licence text) are skipped by seeking, so validating a file
holds well under a megabyte whatever it claims. Any malformed header raises GgufError with the reason, nothing else.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
MAX_TENSORS = 1 << 20
MAX_KV = 1 << 16
MAX_STRING = 16 << 20  # a chat template or a merges entry, never more
MAX_ARRAY = 1 << 24  # a vocabulary is a few hundred thousand entries
MAX_DIMS = 4
MAX_KEY = 256  # real keys are under 64 bytes; bounds what the duplicate check holds (65,536 keys at most)
MAX_KEPT_STRING = 4096  # longer values are skipped, not read: only short ones (architecture, name) are used
MAX_TENSOR_NAME = 64  # GGML_MAX_NAME: llama.cpp refuses a name this long
MAX_ARRAY_DEPTH = 1  # llama.cpp refuses arrays of arrays; Python would hit its recursion limit on deep ones

# value types: id -> struct format (None for string/array)
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9

# ggml tensor type id -> (elements per block, bytes per block), from ggml.h
GGML_BLOCKS = {
    0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34), 9: (32, 36),
    10: (256, 84), 11: (256, 110), 12: (256, 144), 13: (256, 176), 14: (256, 210), 15: (256, 292),
    16: (256, 66), 17: (256, 74), 18: (256, 98), 19: (256, 50), 20: (32, 18), 21: (256, 110), 22: (256, 82),
    23: (256, 136), 24: (1, 1), 25: (1, 2), 26: (1, 4), 27: (1, 8), 28: (1, 8), 29: (256, 56), 30: (1, 2),
    34: (256, 54), 35: (256, 66), 39: (32, 17),
}

# llama_ftype -> the quantization name people use
FILE_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K", 11: "Q3_K_S",
    12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K",
    19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS", 23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL",
    26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S", 29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16", 36: "TQ1_0",
    37: "TQ2_0", 38: "MXFP4_MOE",
}

# metadata keys copied into the manifest; "{arch}" is replaced by general.architecture
_KEPT = ("context_length", "block_count", "embedding_length", "attention.head_count", "attention.head_count_kv",
         "attention.key_length", "attention.value_length")


class GgufError(ValueError):
    """The file is not a GGUF model llama.cpp could load; the message says why."""


@dataclass(frozen=True, slots=True)
class _LongString:
    """A string value skipped without reading it: its type is known, its text is not kept."""

    length: int


_UINT32 = 4
_U64 = struct.Struct("<Q")
_TYPE_NAMES = {0: "uint8", 1: "int8", 2: "uint16", 3: "int16", 4: "uint32", 5: "int32", 6: "float32", 7: "bool",
               8: "string", 9: "array", 10: "uint64", 11: "int64", 12: "float64"}
_INTEGERS = {0, 1, 2, 3, 4, 5, 10, 11}


@dataclass(frozen=True, slots=True, kw_only=True)
class GgufInfo:
    version: int
    tensor_count: int
    architecture: str
    name: str | None
    quantization: str
    context_length: int
    has_chat_template: bool
    hyperparameters: dict[str, int]
    data_bytes: int


class _Reader:
    def __init__(self, f: BinaryIO, size: int):
        self.f, self.size = f, size

    def take(self, n: int) -> bytes:
        data = self.f.read(n)
        if len(data) != n:
            raise GgufError(f"truncated header: wanted {n} bytes at offset {self.f.tell() - len(data)}")
        return data

    def unpack(self, fmt: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def length(self, limit: int, what: str) -> int:
        n = self.unpack("<Q")
        if n > limit:
            raise GgufError(f"{what} of {n} bytes is out of bounds (at most {limit})")
        if self.f.tell() + n > self.size:
            raise GgufError(f"truncated header: a {what} of {n} bytes runs past the end of the file")
        return n

    def text(self, n: int) -> str:
        try:
            return self.take(n).decode("utf-8")
        except UnicodeDecodeError:
            raise GgufError(f"string is not UTF-8 at offset {self.f.tell() - n}") from None

    def string(self, limit: int = MAX_STRING, what: str = "string") -> str:
        return self.text(self.length(limit, what))

    def value(self, vtype: int, depth: int = 0):
        """A metadata value: scalars and short strings as read, long strings as _LongString, arrays skipped (None)."""
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        if vtype == _STRING:
            n = self.length(MAX_STRING, "string")
            if n <= MAX_KEPT_STRING:
                return self.text(n)
            self.skip(n)
            return _LongString(n)
        if vtype == _ARRAY:
            if depth >= MAX_ARRAY_DEPTH:
                raise GgufError("arrays of arrays are not allowed (llama.cpp refuses them)")
            itype, count = self.unpack("<I"), self.unpack("<Q")
            if count > MAX_ARRAY:
                raise GgufError(f"array of {count} items is out of bounds")
            if itype in _SCALARS:  # skip fixed-size arrays without decoding them
                self.skip(struct.calcsize(_SCALARS[itype]) * count)
            elif itype == _STRING:
                self.skip_strings(count)
            else:
                self.value(itype, depth + 1)  # raises: an unknown type, or an array of arrays
            return None
        raise GgufError(f"unknown metadata value type {vtype}")

    def skip_strings(self, count: int) -> None:
        """Seek past an array of strings (a vocabulary: 262,144 of them in gemma3), checking each length."""
        if count * 8 > self.size - self.f.tell():
            raise GgufError(f"truncated header: an array of {count} strings runs past the end of the file")
        read, seek, u64 = self.f.read, self.f.seek, _U64.unpack
        for _ in range(count):
            head = read(8)
            if len(head) != 8:
                raise GgufError("truncated header: an array of strings runs past the end of the file")
            (n,) = u64(head)
            if n > MAX_STRING:
                raise GgufError(f"string of {n} bytes is out of bounds (at most {MAX_STRING})")
            seek(n, 1)
        if self.f.tell() > self.size:  # a seek may pass the end; the next read would then come up short
            raise GgufError("truncated header: an array of strings runs past the end of the file")

    def skip(self, n: int) -> None:
        if self.f.tell() + n > self.size:
            raise GgufError("truncated header: metadata runs past the end of the file")
        self.f.seek(n, 1)


def read_gguf_info(path: Path) -> GgufInfo:
    """Parse and bound-check a GGUF file's header, metadata and tensor table; GgufError says what is wrong."""
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        f.seek(0)
        try:
            return _read(_Reader(f, size))
        except GgufError:
            raise
        except (ValueError, struct.error, OverflowError, RecursionError) as e:  # a case the checks above missed
            raise GgufError(f"unreadable header: {type(e).__name__}: {e}") from None


def _read(r: _Reader) -> GgufInfo:
    if r.f.read(4) != MAGIC:
        raise GgufError("not a GGUF file: bad magic (expected 'GGUF')")
    version = r.unpack("<I")
    if version not in SUPPORTED_VERSIONS:
        raise GgufError(f"unsupported GGUF version {version}")
    n_tensors, n_kv = r.unpack("<Q"), r.unpack("<Q")
    if n_tensors > MAX_TENSORS or n_kv > MAX_KV:
        raise GgufError(f"implausible counts: {n_tensors} tensors, {n_kv} metadata keys")
    meta: dict[str, object] = {}
    types: dict[str, int] = {}
    for _ in range(n_kv):
        key = r.string(MAX_KEY, "metadata key")
        if not key:
            raise GgufError("empty metadata key")
        if key in types:
            raise GgufError(f"duplicate metadata key {key!r}")
        types[key] = vtype = r.unpack("<I")
        meta[key] = r.value(vtype)
    alignment = _typed(meta, types, "general.alignment", {_UINT32}, "uint32")
    tensors_end = _check_tensors(r, n_tensors, 32 if alignment is None else alignment)
    return _info(meta, types, version, n_tensors, tensors_end)


def _typed(meta: dict, types: dict, key: str, allowed: set[int], what: str):
    """A known key's value, None when absent; GgufError when the file gives it another type."""
    if key not in types:
        return None
    if types[key] not in allowed:
        raise GgufError(f"{key} is a {_TYPE_NAMES.get(types[key], types[key])}; it must be {what}")
    return meta[key]


def _check_tensors(r: _Reader, n_tensors: int, alignment: int) -> int:
    if alignment <= 0 or alignment & (alignment - 1):
        raise GgufError(f"general.alignment {alignment} is not a power of two")
    end = 0
    for _ in range(n_tensors):
        n = r.unpack("<Q")
        if n >= MAX_TENSOR_NAME:
            raise GgufError(f"tensor name of {n} bytes is too long (llama.cpp takes at most {MAX_TENSOR_NAME - 1})")
        name = r.text(n)
        n_dims = r.unpack("<I")
        if n_dims > MAX_DIMS:
            raise GgufError(f"tensor {name!r} has {n_dims} dimensions")
        dims = [r.unpack("<Q") for _ in range(n_dims)]
        ttype, offset = r.unpack("<I"), r.unpack("<Q")
        elements = 1
        for d in dims:
            elements *= d
        block = GGML_BLOCKS.get(ttype)
        nbytes = (elements // block[0]) * block[1] if block else 0
        end = max(end, offset + nbytes)
    data_start = -(-r.f.tell() // alignment) * alignment
    if end and data_start + end > r.size:
        raise GgufError(f"truncated file: tensor data needs {data_start + end} bytes, file has {r.size}")
    return end


def _info(meta: dict[str, object], types: dict[str, int], version: int, n_tensors: int,
          data_bytes: int) -> GgufInfo:
    arch = _typed(meta, types, "general.architecture", {_STRING}, "a string")
    if arch is None or arch == "":
        raise GgufError("metadata lacks general.architecture")
    if isinstance(arch, _LongString):
        raise GgufError(f"general.architecture is {arch.length} bytes long")
    if not n_tensors:
        raise GgufError("the file holds no tensors")
    ctx = _typed(meta, types, f"{arch}.context_length", _INTEGERS, "an integer")
    if ctx is None or ctx <= 0:
        raise GgufError(f"metadata lacks {arch}.context_length")
    ftype = _typed(meta, types, "general.file_type", _INTEGERS, "an integer")
    quant = "unknown" if ftype is None else FILE_TYPES.get(ftype, f"unknown-{ftype}")
    hparams = {k: meta[f"{arch}.{k}"] for k in _KEPT if types.get(f"{arch}.{k}") in _INTEGERS}
    name = _typed(meta, types, "general.name", {_STRING}, "a string")
    template = _typed(meta, types, "tokenizer.chat_template", {_STRING}, "a string")
    return GgufInfo(
        version=version,
        tensor_count=n_tensors,
        architecture=arch,
        name=name if isinstance(name, str) else None,
        quantization=quant,
        context_length=ctx,
        has_chat_template=template is not None,
        hyperparameters=hparams,
        data_bytes=data_bytes,
    )
