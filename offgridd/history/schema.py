"""History's tables, indexes and FTS5 indexes in offgridd.db, created idempotently on the writer thread."""

from __future__ import annotations

import sqlite_utils

# porter: "install" finds "installing"; remove_diacritics 2: "cafe" finds "café".
TOKENIZE = "porter unicode61 remove_diacritics 2"


def ensure_schema(db: sqlite_utils.Database) -> None:
    """Create what is missing; safe to call on every open, and on a database written by an older version."""
    # An explicit INTEGER PRIMARY KEY on both tables: the FTS indexes point at rows by rowid, and VACUUM may renumber
    # the implicit rowids of a table that has none, which would silently detach the index from its rows.
    db["conversations"].create(
        {"n": int, "id": str, "title": str, "created": float, "updated": float, "owner": str, "model": str,
         "source": str, "client_id": str},
        pk="n", not_null={"id", "title", "created", "updated", "model", "source"}, if_not_exists=True)
    db["messages"].create(
        {"id": int, "conversation_id": str, "role": str, "content": str, "created": float, "model": str,
         "prompt_tokens": int, "completion_tokens": int, "finish_reason": str, "scope": str, "sources": str},
        pk="id", not_null={"conversation_id", "role", "content", "created", "model", "scope"}, if_not_exists=True)
    if "sources" not in db["messages"].columns_dict:  # a database from before grounded answers kept their sources
        db["messages"].add_column("sources", str)
    db.executescript("""
        CREATE UNIQUE INDEX IF NOT EXISTS conversations_id ON conversations(id);
        CREATE INDEX IF NOT EXISTS conversations_owner_updated ON conversations(owner, updated DESC);
        CREATE UNIQUE INDEX IF NOT EXISTS conversations_owner_client_id
            ON conversations(ifnull(owner, ''), client_id) WHERE client_id IS NOT NULL;
        CREATE INDEX IF NOT EXISTS messages_conversation ON messages(conversation_id, id);
    """)
    # Triggers keep each index in step with its table inside the writing transaction: a crash loses both or neither.
    # replace=True: an index already as wanted is left alone; one made differently (another tokenizer) is rebuilt.
    db["conversations"].enable_fts(["title"], create_triggers=True, tokenize=TOKENIZE, replace=True)
    # The owner's scope token is indexed beside the content so that a search within one key's history is an
    # intersection inside FTS5 rather than a join per matching row (3.6 µs each: 300 ms for a common word); it weighs
    # nothing in the ranking.
    db["messages"].enable_fts(["content", "scope"], create_triggers=True, tokenize=TOKENIZE, replace=True)
    db.execute("INSERT INTO messages_fts(messages_fts, rank) VALUES('rank', 'bm25(1.0, 0.0)')")
