"""Conversations and their messages in offgridd.db, scoped per owner (an API key's name, or None without keys).

Every function taking a `sqlite_utils.Database` runs on the database's one writer thread; `ConversationStore` is the
asynchronous face the HTTP layer and the daemon use, and never blocks the event loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

import sqlite_utils

from ..db import Database, Tables
from .browser import BrowserConversation, parse_browser_storage
from .records import (
    DEFAULT_TITLE,
    EVERYONE,
    MAX_PAGE,
    SOURCES,
    Conversation,
    ConversationNotFound,
    ConversationPage,
    HistoryFull,
    ImportReport,
    InvalidHistory,
    Message,
    Owner,
    Transcript,
    check_message,
    check_owner,
    clean_title,
    owner_clause,
    scope_token,
)
from .schema import ensure_schema
from .search import SearchHit, search
from .upkeep import (
    DatabaseSize,
    VacuumResult,
    check_integrity,
    check_room,
    database_size,
    rebuild_search_index,
    vacuum,
)

T = TypeVar("T")

_CONVERSATION_COLUMNS = ("c.id, c.title, c.created, c.updated, c.owner, c.model, c.source, "
                         "(SELECT count(*) FROM messages m WHERE m.conversation_id = c.id) AS message_count")


def _conversation(row: tuple) -> Conversation:
    id_, title, created, updated, owner, model, source, count = row
    return Conversation(id=id_, title=title, created=created, updated=updated, owner=owner, model=model,
                        source=source, message_count=count)


def _find(db: sqlite_utils.Database, conversation_id: str, owner: Owner) -> Conversation:
    where, params = owner_clause(owner, "c.owner")
    row = db.execute(f"SELECT {_CONVERSATION_COLUMNS} FROM conversations c WHERE c.id = ? AND {where}",
                     [conversation_id, *params]).fetchone()
    if row is None:
        raise ConversationNotFound(f"no conversation {conversation_id!r}" + ("" if owner is EVERYONE else
                                   " under this key"))
    return _conversation(row)


def create_conversation(db: sqlite_utils.Database, *, owner: str | None, title: str = DEFAULT_TITLE,
                        model: str = "", source: str = "ui", max_bytes: int = 0, client_id: str | None = None,
                        created: float | None = None) -> Conversation:
    check_owner(owner)
    if source not in SOURCES:
        raise InvalidHistory(f"a conversation's source is one of {', '.join(SOURCES)}, not {source!r}")
    title = clean_title(title)
    check_room(db, max_bytes, len(title))
    now = time.time() if created is None else created
    row = {"id": uuid.uuid4().hex, "title": title, "created": now, "updated": now, "owner": owner,
           "model": model or "", "source": source, "client_id": client_id}
    with db.atomic():
        db["conversations"].insert(row)
    return Conversation(**{k: v for k, v in row.items() if k != "client_id"})


def append_message(db: sqlite_utils.Database, conversation_id: str, *, owner: Owner, role: str, content: str,
                   model: str = "", prompt_tokens: int | None = None, completion_tokens: int | None = None,
                   finish_reason: str | None = None, max_bytes: int = 0) -> Message:
    check_message(role, content)
    conversation = _find(db, conversation_id, owner)
    check_room(db, max_bytes, len(content.encode("utf-8", "surrogatepass")))
    now = time.time()
    row = {"conversation_id": conversation_id, "role": role, "content": content, "created": now,
           "model": model or "", "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
           "finish_reason": finish_reason, "scope": scope_token(conversation.owner)}
    with db.atomic():  # the message and the conversation's activity time in one transaction
        message_id = db["messages"].insert(row).last_pk
        # a conversation's model is the one that answered last, so the UI offers it again
        db.execute("UPDATE conversations SET updated = ?, model = ? WHERE id = ?",
                   [now, model if role == "assistant" and model else conversation.model, conversation_id])
    return Message(id=message_id, **{k: v for k, v in row.items() if k != "scope"})


def list_conversations(db: sqlite_utils.Database, *, owner: Owner, limit: int = 50,
                       offset: int = 0) -> ConversationPage:
    limit = max(1, min(int(limit), MAX_PAGE))
    offset = max(0, int(offset))
    where, params = owner_clause(owner, "c.owner")
    total = db.execute(f"SELECT count(*) FROM conversations c WHERE {where}", params).fetchone()[0]
    rows = db.execute(f"SELECT {_CONVERSATION_COLUMNS} FROM conversations c WHERE {where} "
                      "ORDER BY c.updated DESC, c.n DESC LIMIT ? OFFSET ?", [*params, limit, offset]).fetchall()
    more = offset + len(rows) < total
    return ConversationPage(conversations=tuple(map(_conversation, rows)), total=total,
                            next_offset=offset + len(rows) if more else None)


def get_transcript(db: sqlite_utils.Database, conversation_id: str, *, owner: Owner) -> Transcript:
    conversation = _find(db, conversation_id, owner)
    rows = db.execute("SELECT id, conversation_id, role, content, created, model, prompt_tokens, completion_tokens, "
                      "finish_reason, sources FROM messages WHERE conversation_id = ? ORDER BY id", [conversation_id])
    names = ("id", "conversation_id", "role", "content", "created", "model", "prompt_tokens", "completion_tokens",
             "finish_reason")
    messages = tuple(Message(**dict(zip(names, r[:-1], strict=True)), sources=_sources(r[-1])) for r in rows)
    return Transcript(conversation=conversation, messages=messages)


def rename_conversation(db: sqlite_utils.Database, conversation_id: str, title: str, *,
                        owner: Owner) -> Conversation:
    title = clean_title(title)
    _find(db, conversation_id, owner)
    with db.atomic():
        db.execute("UPDATE conversations SET title = ? WHERE id = ?", [title, conversation_id])
    return _find(db, conversation_id, owner)


def delete_conversation(db: sqlite_utils.Database, conversation_id: str, *, owner: Owner) -> int:
    """Delete a conversation and its messages; returns how many messages went with it."""
    _find(db, conversation_id, owner)
    with db.atomic():
        gone = db.execute("DELETE FROM messages WHERE conversation_id = ?", [conversation_id]).rowcount
        db.execute("DELETE FROM conversations WHERE id = ?", [conversation_id])
    return gone


def delete_everything_of(db: sqlite_utils.Database, *, owner: str | None) -> int:
    """Delete every conversation of one owner (a key revoked, "clear my history"); returns how many went."""
    check_owner(owner)
    with db.atomic():
        db.execute("DELETE FROM messages WHERE conversation_id IN (SELECT id FROM conversations WHERE owner IS ?)",
                   [owner])
        return db.execute("DELETE FROM conversations WHERE owner IS ?", [owner]).rowcount


def _text(content: object) -> str:
    """An OpenAI message's content as text: a string, or the text parts of a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(p["text"] for p in content
                         if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str))
    return ""


def _sources(raw: str | None) -> list[dict] | None:
    try:
        return json.loads(raw) if raw else None
    except ValueError:  # written by this module only; a damaged value costs the sources, never the message
        return None


def record_exchange(db: sqlite_utils.Database, *, owner: str | None, conversation_id: str | None,
                    request_messages: list, answer: str, model: str = "", prompt_tokens: int | None = None,
                    completion_tokens: int | None = None, finish_reason: str | None = None, source: str = "api",
                    max_bytes: int = 0, whole: bool = False, sources: list[dict] | None = None) -> Conversation:
    """Keep one chat completion: into a new conversation (all its messages), or an existing one (the new turn only,
    unless `whole`: a conversation made empty for this very request takes all of it). `sources`, of an answer grounded
    in documents, are kept with it.

    The new turn of a request is its trailing messages after the last assistant one, since a client resends the
    whole history each time; system messages are kept only in a new conversation. An empty answer is not kept.
    """
    turns = [(("system" if m.get("role") == "developer" else m.get("role")), _text(m.get("content")))
             for m in request_messages if isinstance(m, dict)]
    turns = [(role, text) for role, text in turns if role in ("system", "user", "assistant", "tool") and text]
    if conversation_id is not None:
        conversation = _find(db, conversation_id, owner)
    if conversation_id is not None and not whole:
        last = max((i for i, (role, _) in enumerate(turns) if role == "assistant"), default=-1)
        turns = [(role, text) for role, text in turns[last + 1:] if role != "system"]
    for role, text in turns:
        check_message(role, text)
    check_message("assistant", answer)
    kept_sources = json.dumps(sources, ensure_ascii=False) if sources else None
    check_room(db, max_bytes, sum(len(text.encode("utf-8", "surrogatepass")) for _, text in turns) + len(answer)
               + len(kept_sources or ""))
    now = time.time()
    with db.atomic():  # a new conversation and its messages, or nothing
        if conversation_id is None:
            first = next((text for role, text in turns if role == "user"), "")
            try:
                title = clean_title(first[:60])
            except InvalidHistory:
                title = DEFAULT_TITLE
            conversation = create_conversation(db, owner=owner, title=title, model=model, source=source)
        scope = scope_token(conversation.owner)
        rows = [{"conversation_id": conversation.id, "role": role, "content": text, "created": now, "model": "",
                 "prompt_tokens": None, "completion_tokens": None, "finish_reason": None, "scope": scope}
                for role, text in turns]
        if answer:
            rows.append({"conversation_id": conversation.id, "role": "assistant", "content": answer,
                         "created": now, "model": model or "", "prompt_tokens": prompt_tokens,
                         "completion_tokens": completion_tokens, "finish_reason": finish_reason, "scope": scope,
                         "sources": kept_sources})
        if rows:
            db["messages"].insert_all(rows, batch_size=200)
        db.execute("UPDATE conversations SET updated = ?, model = ? WHERE id = ?",
                   [now, model if answer and model else conversation.model, conversation.id])
    return _find(db, conversation.id, owner)


def import_browser_conversations(db: sqlite_utils.Database, found: list[BrowserConversation], *,
                                 rejected: tuple[str, ...] = (), owner: str | None, max_bytes: int = 0) -> ImportReport:
    """Write parsed browser conversations, each once per owner (by its browser id) and each in one transaction."""
    check_owner(owner)
    imported: dict[str, str] = {}
    already: dict[str, str] = {}
    for conversation in found:
        row = db.execute("SELECT id FROM conversations WHERE ifnull(owner, '') = ifnull(?, '') AND client_id = ?",
                         [owner, conversation.client_id]).fetchone()
        if row is not None:
            already[conversation.client_id] = row[0]
            continue
        check_room(db, max_bytes, conversation.size())
        conversation_id = uuid.uuid4().hex
        with db.atomic():  # all of a conversation or none of it, so a failed import can simply be sent again
            db["conversations"].insert({
                "id": conversation_id, "title": conversation.title, "created": conversation.created,
                "updated": conversation.created, "owner": owner, "model": conversation.model, "source": "ui",
                "client_id": conversation.client_id})
            db["messages"].insert_all(({
                "conversation_id": conversation_id, "role": m.role, "content": m.content,
                "created": conversation.created, "model": conversation.model if m.role == "assistant" else "",
                "prompt_tokens": None, "completion_tokens": m.completion_tokens, "finish_reason": None,
                "scope": scope_token(owner)} for m in conversation.messages), batch_size=200)
        imported[conversation.client_id] = conversation_id
    return ImportReport(imported=imported, already=already, rejected=tuple(rejected))


class ConversationStore:
    """History on the box, through the daemon's one database thread."""

    def __init__(self, db: Database, *, max_bytes: int = 0):
        self.db = db
        self.max_bytes = max_bytes  # 0: no bound
        self._tables = Tables(db, ensure_schema)

    async def _run(self, fn: Callable[..., T], *args, **kwargs) -> T:
        return await self._tables.run(fn, *args, **kwargs)

    async def prepare(self) -> None:
        """Create the tables and indexes now (at start-up), rather than on the first call."""
        await self._run(lambda db: None)

    async def create(self, *, owner: str | None, title: str = DEFAULT_TITLE, model: str = "",
                     source: str = "ui") -> Conversation:
        return await self._run(create_conversation, owner=owner, title=title, model=model, source=source,
                               max_bytes=self.max_bytes)

    async def append(self, conversation_id: str, *, owner: Owner, role: str, content: str, model: str = "",
                     prompt_tokens: int | None = None, completion_tokens: int | None = None,
                     finish_reason: str | None = None) -> Message:
        return await self._run(append_message, conversation_id, owner=owner, role=role, content=content,
                               model=model, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                               finish_reason=finish_reason, max_bytes=self.max_bytes)

    async def record_exchange(self, *, owner: str | None, conversation_id: str | None, request_messages: list,
                              answer: str, model: str = "", prompt_tokens: int | None = None,
                              completion_tokens: int | None = None, finish_reason: str | None = None,
                              source: str = "api", whole: bool = False,
                              sources: list[dict] | None = None) -> Conversation:
        """Keep a chat completion a client asked to keep (see record_exchange); returns the conversation."""
        return await self._run(record_exchange, owner=owner, conversation_id=conversation_id,
                               request_messages=request_messages, answer=answer, model=model,
                               prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                               finish_reason=finish_reason, source=source, max_bytes=self.max_bytes, whole=whole,
                               sources=sources)

    async def list(self, *, owner: Owner, limit: int = 50, offset: int = 0) -> ConversationPage:
        return await self._run(list_conversations, owner=owner, limit=limit, offset=offset)

    async def transcripts(self, *, owner: Owner) -> AsyncIterator[Transcript]:
        """Every conversation of `owner` with its messages, newest first, one read at a time (a backup, an export)."""
        offset: int | None = 0
        while offset is not None:
            page = await self.list(owner=owner, limit=MAX_PAGE, offset=offset)
            for conversation in page.conversations:
                try:
                    yield await self.get(conversation.id, owner=owner)
                except ConversationNotFound:
                    continue  # deleted meanwhile
            offset = page.next_offset

    async def get(self, conversation_id: str, *, owner: Owner) -> Transcript:
        return await self._run(get_transcript, conversation_id, owner=owner)

    async def rename(self, conversation_id: str, title: str, *, owner: Owner) -> Conversation:
        return await self._run(rename_conversation, conversation_id, title, owner=owner)

    async def delete(self, conversation_id: str, *, owner: Owner) -> int:
        return await self._run(delete_conversation, conversation_id, owner=owner)

    async def delete_everything(self, *, owner: str | None) -> int:
        """Every conversation of `owner`, gone; returns how many (for a revoked key, or "clear my history")."""
        return await self._run(delete_everything_of, owner=owner)

    async def search(self, text: str, *, owner: Owner, limit: int = 20) -> tuple[SearchHit, ...]:
        return await self._run(search, text, owner=owner, limit=limit)

    async def import_browser(self, saved: object, *, owner: str | None) -> ImportReport:
        """Import what the UI kept in localStorage ("offgrid.conversations"); each conversation once, by its id."""
        found, rejected = parse_browser_storage(saved)
        check_owner(owner)
        imported: dict[str, str] = {}
        already: dict[str, str] = {}
        # one conversation per turn on the database thread, so searches and other writes are not held up behind a
        # large import
        for i, conversation in enumerate(found):
            try:
                report = await self._run(import_browser_conversations, [conversation], owner=owner,
                                         max_bytes=self.max_bytes)
            except HistoryFull as e:  # what went in stays; the rest is reported, to be sent again once there is room
                rejected += tuple(f"conversation {c.client_id!r}: {e}" for c in found[i:])
                break
            imported |= report.imported
            already |= report.already
        return ImportReport(imported=imported, already=already, rejected=rejected)

    async def size(self) -> DatabaseSize:
        return await self._run(database_size)

    async def vacuum(self, *, full: bool = False) -> VacuumResult:
        return await self._run(vacuum, full=full)

    async def check(self) -> tuple[str, ...]:
        """Problems in the file or the search indexes, for `offgridd doctor`; empty when sound."""
        return await self._run(check_integrity)

    async def rebuild_search_index(self) -> None:
        await self._run(rebuild_search_index)


async def vacuum_periodically(store: ConversationStore, every_s: float) -> None:
    """Run as a background task (cleanup_ctx): an incremental vacuum every `every_s` seconds, the first one full."""
    log = logging.getLogger("offgridd.history")
    while True:
        await asyncio.sleep(every_s)
        try:
            result = await store.vacuum()
        except Exception as e:  # a failed vacuum leaves the database as it was; the next one may succeed
            log.warning("vacuum of offgridd.db failed: %s", e)
            continue
        log.info("vacuumed offgridd.db (%s): %d bytes freed in %.2f s", result.mode,
                 result.before.on_card - result.after.on_card, result.seconds)
