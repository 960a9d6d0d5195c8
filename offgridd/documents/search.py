"""Hybrid retrieval over one collection's chunks: cosine similarity of embeddings (numpy) and BM25 (FTS5), fused by
reciprocal rank fusion. Every function here runs on the database thread, never on the event loop.

A query is free text, never FTS5 syntax: each word becomes a quoted term and any of them may match (a question
rarely shares all its words with the passage that answers it); a few common English words are left out, as BM25
would weigh them at almost nothing anyway while every chunk matches them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import sqlite_utils

from .records import Passage

RRF_K = 60  # the constant of Cormack et al.'s reciprocal rank fusion: a document's score is sum(1 / (k + rank))
MAX_TERMS = 32
MAX_QUERY_CHARS = 1_000
WORDLIKE = re.compile(r"[^\W_]")
STOPWORDS = frozenset("""a an and are as at be by can do does for from how i if in into is it its of on or so that the
their then there these this to was were what when where which who why will with you your""".split())
METHODS = ("hybrid", "vector", "bm25")


def bm25_query(text: str) -> str | None:
    """An FTS5 MATCH expression meaning "any of these words", or None when the text has no word to look for."""
    if not isinstance(text, str):
        return None
    text = text[:MAX_QUERY_CHARS].replace("\x00", " ")
    words = [w.strip("?!.,;:()[]{}'\"") for w in text.split()]
    words = [w for w in words if WORDLIKE.search(w) and w.lower() not in STOPWORDS]
    words = list(dict.fromkeys(words))[:MAX_TERMS]
    return " OR ".join('"' + w.replace('"', '""') + '"' for w in words) or None


def pack(vector: list[float]) -> tuple[int, bytes]:
    """A vector as stored: (dims, unit-length float32 bytes)."""
    v = np.asarray(vector, dtype=np.float32)
    if v.ndim != 1 or not v.size or not np.all(np.isfinite(v)):
        raise ValueError("an embedding is a non-empty list of finite numbers")
    norm = float(np.linalg.norm(v))
    return v.size, (v / norm if norm else v).astype("<f4").tobytes()


@dataclass(slots=True)
class VectorCache:
    """Each collection's matrix of chunk vectors, read once and kept until a write to that collection; only ever
    touched on the database thread. 1,000 chunks of 640 dims are 2.5 MB."""

    matrices: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    def forget(self, collection: str) -> None:
        for key in [k for k in self.matrices if k[0] == collection]:
            del self.matrices[key]

    def matrix(self, db: sqlite_utils.Database, collection: str, dims: int) -> tuple[np.ndarray, np.ndarray]:
        key = (collection, dims)
        if key not in self.matrices:
            rows = db.execute("SELECT id, vector FROM chunks WHERE collection = ? AND dims = ? ORDER BY id",
                              [collection, dims]).fetchall()
            ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
            matrix = np.frombuffer(b"".join(r[1] for r in rows), dtype="<f4").reshape(len(rows), dims)
            self.matrices[key] = (ids, matrix)
        return self.matrices[key]


def vector_ranking(db: sqlite_utils.Database, cache: VectorCache, collection: str, query_vector: list[float],
                   limit: int) -> list[int]:
    """Chunk ids of the collection, closest to the query first (cosine: the vectors are unit length)."""
    dims, raw = pack(query_vector)
    ids, matrix = cache.matrix(db, collection, dims)
    if not len(ids):
        return []
    scores = matrix @ np.frombuffer(raw, dtype="<f4")
    top = np.argpartition(-scores, min(limit, len(ids)) - 1)[:limit] if len(ids) > limit else np.arange(len(ids))
    return [int(ids[i]) for i in top[np.argsort(-scores[top], kind="stable")]]


def bm25_ranking(db: sqlite_utils.Database, collection: str, text: str, limit: int) -> list[int]:
    """Chunk ids of the collection matching any of the query's words, best first (FTS5's bm25)."""
    match = bm25_query(text)
    if match is None:
        return []
    rows = db.execute("""
        SELECT chunks.id FROM chunks_fts JOIN chunks ON chunks.id = chunks_fts.rowid
        WHERE chunks_fts MATCH ? AND chunks.collection = ?
        ORDER BY chunks_fts.rank LIMIT ?""", [match, collection, limit]).fetchall()
    return [r[0] for r in rows]


def fuse(*rankings: list[int]) -> dict[int, float]:
    """Reciprocal rank fusion: each id's sum of 1 / (RRF_K + rank) over the rankings it appears in."""
    scores: dict[int, float] = {}
    for ranking in rankings:
        for rank, chunk_id in enumerate(ranking, start=1):
            scores[chunk_id] = scores.get(chunk_id, 0.0) + 1.0 / (RRF_K + rank)
    return scores


def retrieve(db: sqlite_utils.Database, cache: VectorCache, collection: str, text: str,
             query_vector: list[float] | None, *, top_k: int, method: str = "hybrid") -> tuple[Passage, ...]:
    """The top_k passages of a collection for a query, by `method` (hybrid, vector or bm25), best first."""
    if method not in METHODS:
        raise ValueError(f"method is one of {', '.join(METHODS)}, not {method!r}")
    candidates = max(50, 4 * top_k)
    by_vector = vector_ranking(db, cache, collection, query_vector, candidates) \
        if method != "bm25" and query_vector is not None else []
    by_bm25 = bm25_ranking(db, collection, text, candidates) if method != "vector" else []
    scores = fuse(by_vector, by_bm25)
    best = sorted(scores, key=lambda i: (-scores[i], i))[:top_k]
    if not best:
        return ()
    rows = {r[0]: r for r in db.execute(
        "SELECT c.id, c.document_id, d.filename, c.page, c.text FROM chunks c JOIN documents d ON d.id = c.document_id "
        f"WHERE c.id IN ({', '.join('?' * len(best))})", best)}
    vector_rank = {chunk_id: rank for rank, chunk_id in enumerate(by_vector, start=1)}
    bm25_rank = {chunk_id: rank for rank, chunk_id in enumerate(by_bm25, start=1)}
    return tuple(Passage(document_id=rows[i][1], filename=rows[i][2], page=rows[i][3], text=rows[i][4],
                         score=scores[i], vector_rank=vector_rank.get(i), bm25_rank=bm25_rank.get(i))
                 for i in best if i in rows)
