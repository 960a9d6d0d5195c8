"""Documents' tables and FTS5 index in offgridd.db, created idempotently on the writer thread."""

from __future__ import annotations

import sqlite_utils

# as history's: porter ("install" finds "installing"), remove_diacritics 2 ("cafe" finds "café")
TOKENIZE = "porter unicode61 remove_diacritics 2"


def ensure_schema(db: sqlite_utils.Database) -> None:
    """Create what is missing; safe to call on every open."""
    # explicit INTEGER PRIMARY KEYs: the FTS index points at chunks by rowid, which VACUUM must not renumber
    db["documents"].create(
        {"id": int, "collection": str, "filename": str, "kind": str, "size": int, "sha256": str, "pages": int,
         "chunks": int, "model": str, "added": float},
        pk="id", not_null={"collection", "filename", "kind", "size", "sha256", "pages", "chunks", "model", "added"},
        if_not_exists=True)
    # a chunk's vector: `dims` float32 values, unit length, little-endian (numpy's native order on every board)
    db["chunks"].create(
        {"id": int, "document_id": int, "collection": str, "page": int, "seq": int, "text": str, "dims": int,
         "vector": bytes},
        pk="id", not_null={"document_id", "collection", "page", "seq", "text", "dims", "vector"}, if_not_exists=True)
    db.executescript("""
        CREATE UNIQUE INDEX IF NOT EXISTS documents_collection_sha256 ON documents(collection, sha256);
        CREATE INDEX IF NOT EXISTS chunks_document ON chunks(document_id);
        CREATE INDEX IF NOT EXISTS chunks_collection_dims ON chunks(collection, dims);
    """)
    # triggers keep the index in step inside the writing transaction: a crash loses a chunk and its entry, or neither
    db["chunks"].enable_fts(["text"], create_triggers=True, tokenize=TOKENIZE, replace=True)
