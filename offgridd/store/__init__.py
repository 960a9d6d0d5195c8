"""Model store: content-addressed GGUF blobs with manifests, one verified import path."""

from .builtin import BUILTIN_NAME, register_builtin
from .gguf import GgufError, GgufInfo, read_gguf_info
from .store import ModelManifest, ModelStore, StoreError, UnknownModel, name_from_filename

__all__ = [
    "BUILTIN_NAME", "GgufError", "GgufInfo", "ModelManifest", "ModelStore", "StoreError", "UnknownModel",
    "name_from_filename", "read_gguf_info", "register_builtin",
]
