"""Model store: content-addressed GGUF blobs with manifests, one verified import path."""

from .builtin import BUILTIN_NAME, register_builtin
from .gguf import GgufError, GgufInfo, read_gguf_info
from .store import (
    CHUNK,
    SHA256_RE,
    ModelManifest,
    ModelStore,
    StoreError,
    UnknownModel,
    file_chunks,
    name_from_filename,
    valid_name,
    write_hashing,
)

__all__ = [
    "BUILTIN_NAME", "CHUNK", "SHA256_RE", "GgufError", "GgufInfo", "ModelManifest", "ModelStore", "StoreError",
    "UnknownModel", "file_chunks", "name_from_filename", "read_gguf_info", "register_builtin", "valid_name",
    "write_hashing",
]
