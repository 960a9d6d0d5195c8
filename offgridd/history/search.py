"""Full-text search over titles and messages (SQLite FTS5, bm25), scoped per owner, with highlighted snippets.

A person's query is free text, never FTS5 syntax: every word becomes a quoted phrase, so `"`, `*`, `NEAR`, `AND`,
`title:` and parentheses are just text, and all words must appear (in any order). Words with no letter or digit are
dropped, and a query left with none finds nothing. A query matching more than RANK_WINDOW messages ranks the newest
RANK_WINDOW of them: relevance among that many matches means little, and ranking them all costs too much on a card.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import sqlite_utils

from .records import EVERYONE, Owner, owner_clause, scope_token

MAX_TERMS = 16
MAX_QUERY_CHARS = 500
MAX_HITS = 100
SNIPPET_TOKENS = 16
RANK_WINDOW = 5_000  # the newest matching messages ranked by relevance; see search()
WORDLIKE = re.compile(r"[^\W_]")
# Private-use characters mark matches inside snippets; they are split out below, so no text is ever parsed as markup.
OPEN, CLOSE = "\ue000", "\ue001"
MARKED = re.compile(f"{OPEN}(.*?){CLOSE}", re.S)


@dataclass(frozen=True, slots=True, kw_only=True)
class SearchHit:
    conversation_id: str
    title: str
    message_id: int | None  # None when the title matched
    role: str | None
    created: float
    rank: float  # bm25: lower is better
    snippet: tuple[tuple[str, bool], ...]  # (text, is a match), in order

    def snippet_text(self, open_: str = "[", close: str = "]") -> str:
        return "".join(f"{open_}{text}{close}" if hit else text for text, hit in self.snippet)

    def to_dict(self) -> dict:
        return {"conversation_id": self.conversation_id, "title": self.title, "message_id": self.message_id,
                "role": self.role, "created": self.created, "rank": self.rank,
                "snippet": [{"text": text, "match": hit} for text, hit in self.snippet]}


def fts_query(text: str) -> str | None:
    """An FTS5 MATCH expression that means "all these words", or None when the text has no word to look for."""
    if not isinstance(text, str):
        return None
    text = text[:MAX_QUERY_CHARS].replace("\x00", " ")  # sqlite reads a query string only up to a NUL
    words = [w for w in text.split() if WORDLIKE.search(w)][:MAX_TERMS]
    return " ".join('"' + w.replace('"', '""') + '"' for w in words) or None


def _parts(marked: str) -> tuple[tuple[str, bool], ...]:
    out: list[tuple[str, bool]] = []
    at = 0
    for m in MARKED.finditer(marked):
        if m.start() > at:
            out.append((marked[at:m.start()], False))
        out.append((m[1], True))
        at = m.end()
    if at < len(marked):
        out.append((marked[at:], False))
    return tuple(out)


def _floor(db: sqlite_utils.Database, fts: str, match: str) -> tuple | None:
    """The rowid below the newest RANK_WINDOW matches, or None when there are no more than that."""
    return db.execute(f"SELECT rowid FROM {fts} WHERE {fts} MATCH ? ORDER BY rowid DESC LIMIT 1 OFFSET ?",
                      [match, RANK_WINDOW]).fetchone()


def search(db: sqlite_utils.Database, text: str, *, owner: Owner, limit: int = 20) -> tuple[SearchHit, ...]:
    """At most `limit` hits: matching titles first, then messages, each best first (bm25)."""
    query = fts_query(text)
    if query is None:
        return ()
    limit = max(1, min(int(limit), MAX_HITS))
    where, params = owner_clause(owner, "c.owner")
    # the person's words are looked for in the content only: "k" or an owner's token must not match the scope column
    words = f"content : ({query})"
    match = words if owner is EVERYONE else f'scope : "{scope_token(owner)}" AND {words}'
    # bm25 costs about 1.3 µs per matching row here: a word in most of 100,000 messages took 80 ms to rank. Past
    # RANK_WINDOW matches only the newest RANK_WINDOW are ranked (finding where they start takes under 1 ms).
    floor = _floor(db, "messages_fts", match)
    window = "AND messages_fts.rowid > ?" if floor else ""
    # ORDER BY rank on the FTS table itself lets FTS5 hand rows over best first, so the LIMIT stops there and
    # snippet() runs for the rows returned only.
    messages = db.execute(f"""
        SELECT m.conversation_id, c.title, m.id, m.role, m.created, messages_fts.rank,
               snippet(messages_fts, 0, '{OPEN}', '{CLOSE}', '…', {SNIPPET_TOKENS})
        FROM messages_fts
        JOIN messages m ON m.id = messages_fts.rowid
        JOIN conversations c ON c.id = m.conversation_id
        WHERE messages_fts MATCH ? {window} AND {where}
        ORDER BY messages_fts.rank LIMIT ?""", [match, *([floor[0]] if floor else []), *params, limit]).fetchall()
    # titles carry no scope token (a few thousand conversations, not a hundred thousand messages): the owner is
    # checked by the join, within the same window
    title_floor = _floor(db, "conversations_fts", query)
    title_window = "AND conversations_fts.rowid > ?" if title_floor else ""
    titles = db.execute(f"""
        SELECT c.id, c.title, NULL, NULL, c.updated, conversations_fts.rank,
               highlight(conversations_fts, 0, '{OPEN}', '{CLOSE}')
        FROM conversations_fts
        JOIN conversations c ON c.n = conversations_fts.rowid
        WHERE conversations_fts MATCH ? {title_window} AND {where}
        ORDER BY conversations_fts.rank LIMIT ?""",
                        [query, *([title_floor[0]] if title_floor else []), *params, limit]).fetchall()

    def hit(row) -> SearchHit:
        cid, title, mid, role, created, rank, marked = row
        return SearchHit(conversation_id=cid, title=title, message_id=mid, role=role, created=created, rank=rank,
                         snippet=_parts(marked or ""))
    # Titles first: a title names the conversation a person is looking for, and the bm25 scores of two indexes are
    # not comparable (in a small history they are both near zero). Titles take at most half the hits unless
    # messages leave room, so a search never shows only titles.
    take = min(len(titles), max(limit - len(messages), (limit + 1) // 2))
    return tuple(map(hit, titles[:take] + messages[:limit - take]))
