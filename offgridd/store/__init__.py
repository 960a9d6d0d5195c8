"""Model store: content-addressed GGUF blobs and speech-model bundles with manifests, one verified import path."""

from .builtin import BUILTIN_NAME, register_builtin
from .bundle import BundleError, BundleInfo, bundle_chunks, bundle_size, read_bundle_info, read_member
from .gguf import GgufError, GgufInfo, read_gguf_info
from .store import (
    CHUNK,
    KINDS,
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
    "BUILTIN_NAME", "BundleError", "BundleInfo", "KINDS", "bundle_chunks", "bundle_size", "read_bundle_info",
    "read_member", "CHUNK", "SHA256_RE", "GgufError", "GgufInfo", "ModelManifest", "ModelStore", "StoreError",
    "UnknownModel", "file_chunks", "name_from_filename", "read_gguf_info", "register_builtin", "valid_name",
    "write_hashing",
]
