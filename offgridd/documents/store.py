"""Documents on the box: uploads read, chunked, embedded by a model the box runs, and kept in offgridd.db beside an
FTS5 index, so a collection can be searched by meaning and by words at once.

Functions taking a `sqlite_utils.Database` run on the database's one writer thread. `DocumentStore` is the
asynchronous face: extraction and chunking run in an executor, embedding through the injected function (the
inference worker), writes and searches on the database thread; the event loop only waits.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import sqlite_utils

from ..db import Database, Tables
from ..db import check_room as db_check_room
from .chunks import chunk_pages
from .extract import extract
from .records import (
    Chunk,
    Document,
    DocumentExists,
    DocumentNotFound,
    DocumentsFull,
    DocumentTooLarge,
    Extracted,
    InvalidDocument,
    Passage,
    check_collection,
    clean_filename,
)
from .schema import ensure_schema
from .search import VectorCache, pack, retrieve
from .share import pack_shared, read_shared

T = TypeVar("T")
log = logging.getLogger("offgridd.documents")

# texts in, one unit-length vector per text out: the daemon passes `lambda texts: inference.embed(model, texts)`
Embed = Callable[[list[str]], Awaitable[list[list[float]]]]
Progress = Callable[[float], None]  # the share of a document's chunks embedded so far, 0 to 1
EMBED_BATCH = 8  # chunks per call to the worker: a chat request waiting behind ingestion waits for one batch only
_COLUMNS = "id, collection, filename, kind, size, sha256, pages, chunks, model, added"
ROW_BYTES = 64  # a chunk's row and index entries beyond its text and vector
DIMS_GUESS = 1024  # before the first embedding: more than most small embedding models give (Gemma 3 270M: 640)
# a shared document's vectors are kept when this box's model gives its first chunk a vector this close to the one
# that came with it (the same model on another CPU differs in the last digits); otherwise its chunks are embedded here
SAME_MODEL_COSINE = 0.98


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    max_upload_bytes: int = 32 << 20
    max_total_bytes: int = 512 << 20  # all documents' uploads together; 0: no bound
    chunk_words: int = 120
    overlap_words: int = 30
    top_k: int = 5
    max_db_bytes: int = 0  # offgridd.db's bound (history.max_db_bytes), which documents share with conversations


def _document(row: tuple) -> Document:
    return Document(**dict(zip(_COLUMNS.split(", "), row, strict=True)))


def _find(db: sqlite_utils.Database, document_id: int) -> Document:
    row = db.execute(f"SELECT {_COLUMNS} FROM documents WHERE id = ?", [document_id]).fetchone()
    if row is None:
        raise DocumentNotFound(f"no document {document_id}; GET /api/v1/documents lists them")
    return _document(row)


def check_room(db: sqlite_utils.Database, collection: str, sha256: str, filename: str, size: int,
               max_total_bytes: int) -> None:
    """Refuse an upload already in the collection, or one that would take all documents past the total bound."""
    row = db.execute("SELECT id, filename FROM documents WHERE collection = ? AND sha256 = ?",
                     [collection, sha256]).fetchone()
    if row is not None:
        raise DocumentExists(f"{filename!r} is already in collection {collection!r} as document {row[0]} "
                             f"({row[1]!r}, same sha256)")
    if max_total_bytes > 0:
        used = db.execute("SELECT ifnull(sum(size), 0) FROM documents").fetchone()[0]
        if used + size > max_total_bytes:
            raise DocumentTooLarge(
                f"documents hold {used:,} of their {max_total_bytes:,} bytes and {filename!r} is {size:,}: delete "
                "documents or raise documents.max_total_bytes (OFFGRID_DOCUMENTS_MAX_TOTAL_BYTES) if the card has room")


def db_cost(chunks: list[Chunk], dims: int) -> int:
    """About what a document's chunks take in offgridd.db: each text twice (the table and its FTS5 index), its
    vector, and a row. A vector is often larger than its text (640 float32s are 2,560 bytes)."""
    return sum(2 * len(c.text.encode("utf-8", "surrogatepass")) + 4 * dims + ROW_BYTES for c in chunks)


def check_db_room(db: sqlite_utils.Database, filename: str, chunks: list[Chunk], dims: int, max_db_bytes: int) -> None:
    db_check_room(db, max_db_bytes, db_cost(chunks, dims),
                  f"{filename!r} does not fit: delete documents or old conversations", DocumentsFull)


def write_document(db: sqlite_utils.Database, cache: VectorCache, *, collection: str, filename: str, kind: str,
                   size: int, sha256: str, pages: int, model: str, chunks: list[Chunk],
                   vectors: list[list[float]], max_total_bytes: int, max_db_bytes: int = 0) -> Document:
    """The document, its chunks, their vectors and index entries, in one transaction."""
    check_room(db, collection, sha256, filename, size, max_total_bytes)
    packed = [pack(v) for v in vectors]
    check_db_room(db, filename, chunks, packed[0][0] if packed else 0, max_db_bytes)
    row = {"collection": collection, "filename": filename, "kind": kind, "size": size, "sha256": sha256,
           "pages": pages, "chunks": len(chunks), "model": model, "added": time.time()}
    with db.atomic():
        document_id = db["documents"].insert(row).last_pk
        db["chunks"].insert_all(({"document_id": document_id, "collection": collection, "page": c.page, "seq": c.seq,
                                  "text": c.text, "dims": dims, "vector": blob}
                                 for c, (dims, blob) in zip(chunks, packed, strict=True)), batch_size=200)
    cache.forget(collection)
    return _find(db, document_id)


def delete_document(db: sqlite_utils.Database, cache: VectorCache, document_id: int) -> Document:
    """A document, its chunks and vectors, and their index entries (by trigger), gone together."""
    document = _find(db, document_id)
    with db.atomic():
        db.execute("DELETE FROM chunks WHERE document_id = ?", [document_id])
        db.execute("DELETE FROM documents WHERE id = ?", [document_id])
    cache.forget(document.collection)
    return document


def export_document(db: sqlite_utils.Database, document_id: int) -> bytes:
    rows = db.execute("SELECT page, seq, text, dims, vector FROM chunks WHERE document_id = ? ORDER BY seq",
                      [document_id]).fetchall()
    return pack_shared(_find(db, document_id), rows)


def list_documents(db: sqlite_utils.Database, collection: str | None) -> tuple[Document, ...]:
    where, params = ("WHERE collection = ?", [collection]) if collection is not None else ("", [])
    return tuple(map(_document, db.execute(f"SELECT {_COLUMNS} FROM documents {where} ORDER BY collection, id",
                                           params)))


def list_collections(db: sqlite_utils.Database) -> list[dict]:
    return [{"name": r[0], "documents": r[1], "bytes": r[2], "chunks": r[3]} for r in db.execute(
        "SELECT collection, count(*), sum(size), sum(chunks) FROM documents GROUP BY collection ORDER BY collection")]


def read_upload(filename: str, data: bytes, limits: Limits) -> tuple[Extracted, list[Chunk]]:
    """Off the event loop: the upload's pages and its chunks."""
    extracted = extract(filename, data)
    return extracted, chunk_pages(extracted.pages, words=limits.chunk_words, overlap=limits.overlap_words)


class DocumentStore:
    """Collections of documents, searched by meaning and by words, through the daemon's one database thread."""

    def __init__(self, db: Database, embed: Embed, *, model: str, limits: Limits | None = None,
                 changed: Callable[[str, Document], None] | None = None):
        self.db = db
        self.embed = embed
        self.changed = changed or (lambda what, document: None)  # ("added" | "deleted", the document): tell others
        self.model = model  # the embedding model's name, kept with each document
        self.limits = limits or Limits()
        self._cache = VectorCache()  # only touched on the database thread
        self._tables = Tables(db, ensure_schema)
        self._one_at_a_time = asyncio.Lock()  # ingestion is heavy: documents go in one after another
        self._dims = 0  # the embedding model's, once known

    async def _run(self, fn: Callable[..., T], *args, **kwargs) -> T:
        return await self._tables.run(fn, *args, **kwargs)

    async def prepare(self) -> None:
        """Create the tables now (at start-up) rather than on the first call."""
        await self._run(lambda db: None)

    async def _vectors(self, texts: list[str], progress: Progress | None = None) -> list[list[float]]:
        vectors: list[list[float]] = []
        for at in range(0, len(texts), EMBED_BATCH):
            batch = texts[at:at + EMBED_BATCH]
            got = await self.embed(batch)
            if len(got) != len(batch):
                raise RuntimeError(f"the embedding model returned {len(got)} vectors for {len(batch)} texts")
            vectors.extend(got)
            if progress is not None:
                progress(len(vectors) / len(texts))
        return vectors

    async def add(self, collection: str | None, filename: str, data: bytes,
                  progress: Progress | None = None) -> Document:
        """Read, chunk, embed and keep one upload; raises a DocumentError saying why one cannot be kept. `progress`
        hears the share of its chunks embedded (0 to 1) after each batch: embedding is nearly all the time it takes."""
        collection = check_collection(collection)
        filename = clean_filename(filename)
        if len(data) > self.limits.max_upload_bytes:
            raise DocumentTooLarge(f"{filename!r} is {len(data):,} bytes; uploads are at most "
                                   f"{self.limits.max_upload_bytes:,} (documents.max_upload_bytes)")
        loop = asyncio.get_running_loop()
        async with self._one_at_a_time:
            started = time.monotonic()
            sha256 = await loop.run_in_executor(None, lambda: hashlib.sha256(data).hexdigest())
            # before the costly part: a second upload of the same file, or one with no room, is refused at once
            await self._run(check_room, collection, sha256, filename, len(data), self.limits.max_total_bytes)
            extracted, chunks = await loop.run_in_executor(None, read_upload, filename, data, self.limits)
            if not chunks:
                raise InvalidDocument(f"{filename!r} holds no text to search")
            # before embedding (about a second a page): a document the card has no room for is refused at once
            await self._run(check_db_room, filename, chunks, self._dims or DIMS_GUESS, self.limits.max_db_bytes)
            vectors = await self._vectors([c.text for c in chunks], progress)
            self._dims = len(vectors[0]) if vectors else self._dims
            document = await self._run(
                write_document, self._cache, collection=collection, filename=filename, kind=extracted.kind,
                size=len(data), sha256=sha256, pages=len(extracted.pages), model=self.model, chunks=chunks,
                vectors=vectors, max_total_bytes=self.limits.max_total_bytes, max_db_bytes=self.limits.max_db_bytes)
        log.info("document %d %r into %r: %d pages, %d chunks in %.2f s", document.id, filename, collection,
                 document.pages, document.chunks, time.monotonic() - started)
        self.changed("added", document)
        return document

    async def export(self, document_id: int) -> bytes:
        """A document as another box of the fleet takes it (share.py): its chunks and vectors, not the file."""
        return await self._run(export_document, document_id)

    async def add_shared(self, collection: str | None, data: bytes, source: str) -> Document:
        """Keep a document another box shared (`export`), checked field by field. Its vectors are kept only when this
        box's embedding model gives the same vector for its first chunk; otherwise every chunk is embedded here."""
        collection = check_collection(collection)
        loop = asyncio.get_running_loop()
        shared = await loop.run_in_executor(None, read_shared, data)
        texts = [c.text for c in shared.chunks]
        async with self._one_at_a_time:
            started = time.monotonic()
            await self._run(check_room, collection, shared.sha256, shared.filename, shared.size,
                            self.limits.max_total_bytes)
            mine = await self._vectors(texts[:1])
            self._dims = len(mine[0])
            _, unit = pack(mine[0])
            same = len(mine[0]) == shared.vectors.shape[1] and \
                float(shared.vectors[0] @ np.frombuffer(unit, dtype="<f4")) >= SAME_MODEL_COSINE
            await self._run(check_db_room, shared.filename, shared.chunks, self._dims, self.limits.max_db_bytes)
            vectors = list(shared.vectors) if same else mine + await self._vectors(texts[1:])
            document = await self._run(
                write_document, self._cache, collection=collection, filename=shared.filename, kind=shared.kind,
                size=shared.size, sha256=shared.sha256, pages=shared.pages, model=self.model, chunks=shared.chunks,
                vectors=vectors, max_total_bytes=self.limits.max_total_bytes, max_db_bytes=self.limits.max_db_bytes)
        log.info("document %d %r into %r from %s: %d chunks, %s, in %.2f s", document.id, shared.filename,
                 collection, source, document.chunks,
                 "its vectors kept (the same model)" if same else f"embedded here ({shared.model} sent it)",
                 time.monotonic() - started)
        self.changed("added", document)
        return document

    async def get(self, document_id: int) -> Document:
        return await self._run(_find, document_id)

    async def list(self, collection: str | None = None) -> tuple[Document, ...]:
        """The documents of one collection, or of all (None)."""
        return await self._run(list_documents, None if collection is None else check_collection(collection))

    async def collections(self) -> list[dict]:
        return await self._run(list_collections)

    async def delete(self, document_id: int) -> Document:
        document = await self._run(delete_document, self._cache, document_id)
        self.changed("deleted", document)
        return document

    async def search(self, text: str, collection: str | None = None, *, top_k: int | None = None,
                     method: str = "hybrid") -> tuple[Passage, ...]:
        """The passages of a collection that best answer `text`, best first: hybrid (vector and BM25 fused), or
        one of them alone ("vector", "bm25") for comparison."""
        collection = check_collection(collection)
        top_k = max(1, min(int(top_k or self.limits.top_k), 50))
        if not isinstance(text, str) or not text.strip():
            return ()
        query_vector = None
        if method != "bm25":
            query_vector = (await self.embed([text[:4_000]]))[0]
        return await self._run(retrieve, self._cache, collection, text, query_vector, top_k=top_k, method=method)
