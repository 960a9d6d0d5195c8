"""A document as one box hands it to another of its fleet: what the box made of it (each chunk's page, place, text
and vector, and the model that embedded them), never the file, which is not kept.

Format (version 1), msgpack: {"format": 1, "document": {filename, kind, size, sha256, pages, model},
"chunks": [[page, seq, text, dims, vector], ...]} with `vector` the float32 little-endian bytes as stored. What
arrives is hostile until `read_shared` has checked every field: counts and sizes bounded, pages within the
document, one dimension for all vectors, each vector finite and of unit length.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import msgpack
import numpy as np

from .extract import MAX_PAGE_CHARS, MAX_PAGES
from .records import KINDS, Chunk, Document, InvalidDocument, clean_filename

FORMAT = 1
MAX_CHUNKS = 200_000
MAX_DIMS = 8192
MAX_SHARED_BYTES = 512 << 20  # a document of 100,000 chunks of 1,024 dimensions is about 480 MB
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_MODEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")


@dataclass(frozen=True, slots=True, kw_only=True)
class Shared:
    filename: str
    kind: str
    size: int
    sha256: str  # of the file the sending box read
    pages: int
    model: str  # the model that embedded the chunks there
    chunks: list[Chunk]
    vectors: np.ndarray  # one unit-length float32 row per chunk


def pack_shared(document: Document, rows: list[tuple]) -> bytes:
    """A document and its chunks' rows (page, seq, text, dims, vector) as another box reads them."""
    return msgpack.packb({"format": FORMAT, "document": {
        "filename": document.filename, "kind": document.kind, "size": document.size, "sha256": document.sha256,
        "pages": document.pages, "model": document.model}, "chunks": [list(r) for r in rows]}, use_bin_type=True)


def _refuse(why: str) -> InvalidDocument:
    return InvalidDocument(f"a shared document was refused: {why}")


def _int(value: object, low: int, high: int, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise _refuse(f"{what} must be a whole number from {low} to {high}")
    return value


def read_shared(data: bytes) -> Shared:
    """The document in `data`, every field checked; raises InvalidDocument saying what is wrong."""
    if len(data) > MAX_SHARED_BYTES:
        raise _refuse(f"{len(data):,} bytes is over {MAX_SHARED_BYTES:,}")
    try:
        outer = msgpack.unpackb(data, raw=False, strict_map_key=True, max_map_len=16, max_array_len=MAX_CHUNKS,
                                max_str_len=MAX_PAGE_CHARS * 4, max_bin_len=4 * MAX_DIMS)
    except Exception as e:  # msgpack raises several kinds on damaged or oversized input; each means the same
        raise _refuse(f"not a readable document ({type(e).__name__})") from None
    if not isinstance(outer, dict) or outer.get("format") != FORMAT:
        raise _refuse(f"this box reads format {FORMAT}")
    doc, rows = outer.get("document"), outer.get("chunks")
    if not isinstance(doc, dict) or not isinstance(rows, list) or not rows:
        raise _refuse("it needs a document and at least one chunk")
    filename = doc.get("filename")
    if not isinstance(filename, str) or clean_filename(filename) != filename:
        raise _refuse("its file name is not a plain name")
    if doc.get("kind") not in KINDS:
        raise _refuse(f"its kind is one of {', '.join(KINDS)}")
    if not isinstance(doc.get("sha256"), str) or not _SHA256.fullmatch(doc["sha256"]):
        raise _refuse("its sha256 is not 64 hex digits")
    if not isinstance(doc.get("model"), str) or not _MODEL.fullmatch(doc["model"]):
        raise _refuse("its model is not a model's name")
    size = _int(doc.get("size"), 1, 1 << 40, "its size")
    pages = _int(doc.get("pages"), 1, MAX_PAGES, "its page count")
    chunks, vectors, dims = [], [], None
    for i, row in enumerate(rows):
        if not isinstance(row, list) or len(row) != 5:
            raise _refuse(f"chunk {i} is not [page, seq, text, dims, vector]")
        page, seq, text, n, vector = row
        _int(page, 1, pages, f"chunk {i}'s page")
        _int(seq, 0, MAX_CHUNKS, f"chunk {i}'s place")
        if not isinstance(text, str) or not text.strip() or len(text) > MAX_PAGE_CHARS:
            raise _refuse(f"chunk {i}'s text is empty or too long")
        dims = _int(n, 1, MAX_DIMS, f"chunk {i}'s dimensions") if dims is None else dims
        if n != dims or not isinstance(vector, bytes) or len(vector) != 4 * dims:
            raise _refuse(f"chunk {i}'s vector is not {dims} float32 values like the others")
        chunks.append(Chunk(page=page, seq=seq, text=text))
        vectors.append(vector)
    matrix = np.frombuffer(b"".join(vectors), dtype="<f4").reshape(len(vectors), dims)
    norms = np.linalg.norm(matrix, axis=1) if np.all(np.isfinite(matrix)) else np.zeros(len(vectors))
    if not np.all(np.abs(norms - 1) < 1e-3):
        raise _refuse("its vectors are not all finite and of unit length, as a box stores them")
    return Shared(filename=filename, kind=doc["kind"], size=size, sha256=doc["sha256"], pages=pages,
                  model=doc["model"], chunks=chunks, vectors=matrix)
