"""Model store: content-addressed GGUF blobs and speech-model bundles with manifests, one verified import path."""

from .builtin import BUILTIN_NAME, register_builtin
from .bundle import (
    BundleError,
    BundleInfo,
    bundle_chunks,
    bundle_size,
    looks_like_bundle,
    read_bundle_info,
    read_member,
)
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
    "BUILTIN_NAME", "CHUNK", "KINDS", "SHA256_RE", "BundleError", "BundleInfo", "GgufError", "GgufInfo",
    "ModelManifest", "ModelStore", "StoreError", "UnknownModel", "bundle_chunks", "bundle_size", "file_chunks",
    "looks_like_bundle", "name_from_filename", "read_bundle_info", "read_gguf_info", "read_member",
    "register_builtin", "valid_name", "write_hashing",
]
