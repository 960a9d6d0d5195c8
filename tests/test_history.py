"""Conversation history on the box: real sqlite files through the daemon's database thread, and a real writer killed."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import sqlite_utils
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from offgridd.db import Database
from offgridd.history import (
    EVERYONE,
    ConversationNotFound,
    ConversationStore,
    HistoryFull,
    InvalidHistory,
    filename,
    fts_query,
    parse_browser_storage,
    parse_page,
    render_export,
    to_json,
    to_markdown,
    vacuum_periodically,
)
from offgridd.history.records import scope_token
from offgridd.history.schema import ensure_schema
from offgridd.history.search import search
from offgridd.history.store import (
    append_message,
    create_conversation,
    delete_conversation,
    delete_everything_of,
    import_browser_conversations,
    record_exchange,
    rename_conversation,
)
from offgridd.history.upkeep import check_integrity

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def database(tmp_path):
    db = Database(tmp_path / "offgridd.db")
    yield db
    db.close()


@pytest.fixture
async def store(database):
    store = ConversationStore(database)
    await store.prepare()
    return store


def check_fts_agrees(path: Path) -> None:
    """The database is whole and both full-text indexes match their tables row for row."""
    db = sqlite_utils.Database(sqlite3.connect(path))
    try:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert check_integrity(db) == ()
    finally:
        db.close()


async def pump_conversation(store, owner="alice"):
    c = await store.create(owner=owner, title="Fixing the water pump", model="gemma3-270m")
    await store.append(c.id, owner=owner, role="user", content="How do I install the water pump by the well?")
    await store.append(c.id, owner=owner, role="assistant", content="Installing it: close the valve, then prime it.",
                       model="gemma3-270m", prompt_tokens=12, completion_tokens=9, finish_reason="stop")
    return c


async def test_a_conversation_is_kept_read_renamed_and_deleted_with_its_messages(store, database):
    c = await pump_conversation(store)
    assert c.source == "ui" and c.owner == "alice" and len(c.id) == 32

    transcript = await store.get(c.id, owner="alice")
    assert [m.role for m in transcript.messages] == ["user", "assistant"]
    answer = transcript.messages[1]
    assert (answer.model, answer.prompt_tokens, answer.completion_tokens, answer.finish_reason) == (
        "gemma3-270m", 12, 9, "stop")
    assert transcript.conversation.message_count == 2
    assert transcript.conversation.updated >= answer.created >= c.created

    renamed = await store.rename(c.id, "  Pump,\n primed\x1b[2J\u202e  ", owner="alice")
    assert renamed.title == "Pump, primed[2J"  # no escape, no bidi override reaches a terminal
    for blank in (" \n ", "\u200b\u200b", "\ue000"):
        with pytest.raises(InvalidHistory, match="visible character"):
            await store.rename(c.id, blank, owner="alice")
    await store.append(c.id, owner="alice", role="assistant", content="ok", model="qwen3-0.6b")
    assert (await store.get(c.id, owner="alice")).conversation.model == "qwen3-0.6b"  # the model that answered last
    await store.append(c.id, owner="alice", role="user", content="thanks", model="")
    assert (await store.get(c.id, owner="alice")).conversation.model == "qwen3-0.6b"
    with pytest.raises(InvalidHistory, match="role"):
        await store.append(c.id, owner="alice", role="wizard", content="hi")

    assert await store.delete(c.id, owner="alice") == 4
    with pytest.raises(ConversationNotFound):
        await store.get(c.id, owner="alice")
    assert await database.run(lambda db: db["messages"].count) == 0
    check_fts_agrees(database.path)


async def test_an_api_client_that_opts_in_keeps_each_exchange_once(store):
    first = [{"role": "developer", "content": "Answer briefly."},
             {"role": "user", "content": [{"type": "text", "text": "Where is the nearest well?"},
                                          {"type": "image_url", "image_url": {"url": "data:,"}}]}]
    c = await store.record_exchange(owner="field-kit", conversation_id=None, request_messages=first,
                                    answer="Two km north.", model="gemma3-270m", prompt_tokens=20,
                                    completion_tokens=4, finish_reason="stop")
    assert (c.source, c.owner, c.title, c.message_count) == ("api", "field-kit", "Where is the nearest well?", 3)

    second = first + [{"role": "assistant", "content": "Two km north."},
                      {"role": "user", "content": "And water quality?"}, {"role": "wizard", "content": "x"}, "junk"]
    c = await store.record_exchange(owner="field-kit", conversation_id=c.id, request_messages=second,
                                    answer="", model="gemma3-270m")  # a stopped answer: only the question is kept
    t = await store.get(c.id, owner="field-kit")
    assert [(m.role, m.content) for m in t.messages] == [
        ("system", "Answer briefly."), ("user", "Where is the nearest well?"), ("assistant", "Two km north."),
        ("user", "And water quality?")]
    assert (t.messages[2].model, t.messages[2].completion_tokens, t.messages[2].finish_reason) == (
        "gemma3-270m", 4, "stop")
    with pytest.raises(ConversationNotFound):
        await store.record_exchange(owner="other", conversation_id=c.id, request_messages=second, answer="x")
    assert [h.conversation_id for h in await store.search("quality", owner="field-kit")] == [c.id]


async def test_the_list_is_newest_activity_first_and_paged(store):
    made = [await store.create(owner=None, title=f"talk {i}") for i in range(7)]
    await store.append(made[2].id, owner=None, role="user", content="bumped to the top")
    first = await store.list(owner=None, limit=3)
    assert [c.title for c in first.conversations] == ["talk 2", "talk 6", "talk 5"]
    assert (first.total, first.next_offset) == (7, 3)
    second = await store.list(owner=None, limit=3, offset=first.next_offset)
    third = await store.list(owner=None, limit=3, offset=second.next_offset)
    assert [c.title for c in second.conversations + third.conversations] == ["talk 4", "talk 3", "talk 1", "talk 0"]
    assert third.next_offset is None
    assert first.conversations[0].message_count == 1
    assert json.loads(json.dumps(first.to_dict()))["total"] == 7


async def test_each_key_sees_only_its_own_conversations_and_the_admin_sees_all(store):
    alice = await pump_conversation(store, "alice")
    bob = await pump_conversation(store, "bob")
    nobody = await pump_conversation(store, None)

    assert [c.id for c in (await store.list(owner="alice")).conversations] == [alice.id]
    assert [c.id for c in (await store.list(owner=None)).conversations] == [nobody.id]
    assert {c.id for c in (await store.list(owner=EVERYONE)).conversations} == {alice.id, bob.id, nobody.id}
    for act in (lambda: store.get(alice.id, owner="bob"), lambda: store.rename(alice.id, "mine", owner="bob"),
                lambda: store.delete(alice.id, owner=None),
                lambda: store.append(alice.id, owner="bob", role="user", content="hi")):
        with pytest.raises(ConversationNotFound, match="under this key"):
            await act()
    assert {h.conversation_id for h in await store.search("pump", owner="bob")} == {bob.id}
    assert {h.conversation_id for h in await store.search("pump", owner=None)} == {nobody.id}
    assert {h.conversation_id for h in await store.search("pump", owner=EVERYONE)} == {alice.id, bob.id, nobody.id}
    assert await store.delete_everything(owner="bob") == 1
    assert await store.search("pump", owner="bob") == () and (await store.list(owner="bob")).total == 0
    assert {c.id for c in (await store.list(owner=EVERYONE)).conversations} == {alice.id, nobody.id}
    with pytest.raises(InvalidHistory):
        await store.delete_everything(owner=EVERYONE)
    for token in (scope_token(None), scope_token("bob"), f"scope:{scope_token('bob')}"):
        assert await store.search(token, owner="bob") == ()  # the owner's token in the index is not content
        assert await store.search(token, owner=None) == ()
        assert await store.search(token, owner=EVERYONE) == ()
    for not_an_owner in (EVERYONE, "", 42):
        with pytest.raises(InvalidHistory, match="one owner"):
            await store.create(owner=not_an_owner)
        with pytest.raises(InvalidHistory, match="one owner"):
            await store.import_browser([], owner=not_an_owner)


async def test_search_ranks_messages_and_titles_with_highlighted_snippets(store):
    c = await pump_conversation(store)
    other = await store.create(owner="alice", title="Radio net schedule")
    await store.append(other.id, owner="alice", role="user", content="The pump is mentioned once, " + "filler " * 60)

    hits = await store.search("install", owner="alice")
    assert {(h.conversation_id, h.role) for h in hits} == {(c.id, "user"), (c.id, "assistant")}  # stemmed: Installing
    question = next(h for h in hits if h.role == "user")
    assert question.snippet_text() == "How do I [install] the water pump by the well?"
    assert ("install", True) in question.snippet

    pump = await store.search("pump", owner="alice")
    assert pump[0].message_id is None and pump[0].title == "Fixing the water pump"  # a short title ranks first
    assert pump[0].snippet_text("<b>", "</b>") == "Fixing the water <b>pump</b>"
    assert pump[-1].conversation_id == other.id  # once in a long message ranks last
    assert "…" in pump[-1].snippet_text()
    assert [h.conversation_id for h in await store.search("water well", owner="alice")] == [c.id]  # all words
    assert await store.search("water radio", owner="alice") == ()
    assert [h.conversation_id for h in await store.search("CAFÉ", owner="alice")] == []
    await store.append(other.id, owner="alice", role="user", content="Meet at the café")
    assert len(await store.search("cafe", owner="alice")) == 1
    assert len(await store.search("pump", owner="alice", limit=2)) == 2
    hit = json.loads(json.dumps((await store.search("install", owner="alice"))[0].to_dict()))
    assert hit["snippet"][0] == {"text": "Installing", "match": True}


async def test_a_word_in_very_many_messages_ranks_only_the_newest_of_them(store, monkeypatch):
    import offgridd.history.search as search_module
    monkeypatch.setattr(search_module, "RANK_WINDOW", 3)
    mine = await store.create(owner="alice", title="log")
    theirs = await store.create(owner="bob", title="log")
    for i in range(6):
        # the oldest of alice's messages says "pump" most often: it would rank first without the window
        await store.append(mine.id, owner="alice", role="user", content=f"m{i} " + "pump " * (6 - i) + "x " * 20)
        await store.append(theirs.id, owner="bob", role="user", content="pump " * 9)  # not alice's window
    hits = await store.search("pump", owner="alice", limit=10)
    assert sorted(h.snippet_text().split()[0] for h in hits) == ["m3", "m4", "m5"]
    assert len(await store.search("m0 pump", owner="alice")) == 1  # a narrower query reaches older messages
    assert len(await store.search("pump", owner=EVERYONE, limit=50)) == 3
    for i in range(5):
        await store.create(owner="alice", title=f"log {i}")
    assert sorted(h.title for h in await store.search("log", owner="alice")) == ["log 2", "log 3", "log 4"]


async def test_the_index_stays_in_step_after_renames_and_deletes(store, database):
    c = await pump_conversation(store)
    keep = await store.create(owner="alice", title="Seeds to plant")
    await store.append(keep.id, owner="alice", role="user", content="Which seeds before the rain?")

    await store.rename(c.id, "Radio repair", owner="alice")
    assert [h.title for h in await store.search("radio", owner="alice")] == ["Radio repair"]
    assert all(h.message_id is not None for h in await store.search("pump", owner="alice"))  # the old title is gone

    await store.delete(c.id, owner="alice")
    assert await store.search("pump", owner="alice") == ()
    assert await store.search("radio", owner="alice") == ()
    assert len(await store.search("seeds", owner="alice")) == 2
    check_fts_agrees(database.path)


async def test_an_index_that_drifted_from_its_table_is_found_and_rebuilt(store, database):
    c = await pump_conversation(store)
    assert await store.check() == ()

    def drift(db):  # what a bug writing around the triggers would do
        with db.conn:
            db.execute("DROP TRIGGER messages_ad")
            db.execute("DELETE FROM messages WHERE role = 'user'")
    await database.run(drift)
    problems = await store.check()
    assert len(problems) == 1 and problems[0].startswith("messages_fts disagrees with its table")
    await store.rebuild_search_index()
    assert await store.check() == ()
    assert [h.role for h in await store.search("install", owner="alice")] == ["assistant"]
    assert c.id


async def test_a_write_that_fails_half_way_leaves_nothing_behind(store, database):
    await store.create(owner=None, title="warm up")  # the schema exists before the trap is set

    def trap(db):  # a write failing mid-transaction, as a full card or an I/O error would make it fail
        db.execute("CREATE TRIGGER trap BEFORE INSERT ON messages WHEN new.content = 'boom' "
                   "BEGIN SELECT RAISE(ABORT, 'the card is full'); END")
    await database.run(trap)
    saved = [{"id": "half", "title": "half", "messages": [{"role": "user", "content": "first"},
                                                           {"role": "user", "content": "boom"}]}]
    with pytest.raises(sqlite3.IntegrityError, match="the card is full"):
        await store.import_browser(saved, owner=None)
    with pytest.raises(sqlite3.IntegrityError):
        await store.record_exchange(owner=None, conversation_id=None, answer="boom",
                                    request_messages=[{"role": "user", "content": "a question"}])
    c = (await store.list(owner=None)).conversations[0]
    with pytest.raises(sqlite3.IntegrityError):
        await store.append(c.id, owner=None, role="user", content="boom")
    page = await store.list(owner=None)
    assert [(x.title, x.message_count, x.updated) for x in page.conversations] == [("warm up", 0, c.updated)]
    assert await store.search("first", owner=None) == () and await store.search("question", owner=None) == ()
    await database.run(lambda db: db.execute("DROP TRIGGER trap"))
    assert (await store.import_browser(saved, owner=None)).imported.keys() == {"half"}  # sent again, it goes in
    check_fts_agrees(database.path)


HOSTILE = ['"', '""', '"pump', 'pump"', "(pump", "pump)", "((", "NEAR(pump water)", "pump NEAR water", "*", "pump*",
           "^pump", "title:pump", "content:pump", "AND", "OR pump", "NOT pump", "-pump", "+pump", "", "   ", "!!!",
           "...", "'", "' OR 1=1 --", 'pump" OR "1"="1', "\x00", "pump\x00", "{pump water}", "pump:*", "_", "__init__",
           "a" * 10_000, "pump " * 100, "\u200b", "🔧", "pump🔧"]


@pytest.mark.parametrize("query", HOSTILE)
async def test_whatever_a_person_types_is_searched_as_text_and_never_fails(store, query):
    await pump_conversation(store)
    hits = await store.search(query, owner="alice")
    assert isinstance(hits, tuple)
    if not any(ch.isalnum() for ch in query):
        assert hits == ()
    words = query.split()
    if words and all(w.strip('"()*^+-:{}\x00🔧') == "pump" for w in words):
        assert hits, "a query naming only the word pump finds the pump"


def test_a_query_becomes_quoted_words_and_one_without_words_none():
    assert fts_query('pump "water" NEAR(x') == '"pump" """water""" "NEAR(x"'
    assert fts_query("*** ((( \" '") is None
    assert fts_query("") is None
    assert fts_query(None) is None  # type: ignore[arg-type]
    assert fts_query(" ".join(f"w{i}" for i in range(40))).count('"') == 32  # at most 16 words


def _memory_db() -> sqlite_utils.Database:
    db = sqlite_utils.Database(memory=True)
    ensure_schema(db)
    db["conversations"].insert({"id": "c", "title": "pump notes", "created": 0, "updated": 0, "owner": None,
                                "model": "", "source": "ui"})
    db["messages"].insert({"conversation_id": "c", "role": "user", "content": "the pump near the well", "created": 0,
                           "model": "", "scope": "k"})
    return db


_FUZZ_DB = _memory_db()


@settings(max_examples=400, deadline=None)
@given(st.text(max_size=200) | st.lists(st.sampled_from(
    ['"', "(", ")", "*", "NEAR", "AND", "OR", "NOT", "pump", ":", "^", "+", "-", "{", "}", " ", "\x00"]),
    max_size=12).map("".join))
def test_fuzzed_queries_never_raise(query):
    assert isinstance(search(_FUZZ_DB, query, owner=None), tuple)


async def test_export_writes_json_a_program_reads_back_and_markdown_a_person_reads(store):
    c = await pump_conversation(store)
    await store.rename(c.id, "Pump / well: notes?", owner="alice")
    transcript = await store.get(c.id, owner="alice")

    data = json.loads(json.dumps(to_json(transcript)))
    assert (data["format"], data["version"], data["title"], data["owner"]) == (
        "offgridd.conversation", 1, "Pump / well: notes?", "alice")
    assert [m["content"] for m in data["messages"]] == [m.content for m in transcript.messages]
    assert data["messages"][1]["completion_tokens"] == 9

    md = to_markdown(transcript)
    assert md.startswith("# Pump / well: notes?\n\n_started ")
    assert "model gemma3-270m · 2 messages_" in md
    assert "## You\n\nHow do I install the water pump by the well?\n\n## Model (gemma3-270m)\n\nInstalling it" in md
    assert filename(transcript, "md") == f"Pump-well-notes-{c.id[:8]}.md"
    body, content_type, name = render_export(transcript, "markdown")
    assert (body.decode(), content_type, name) == (md, "text/markdown; charset=utf-8", filename(transcript, "md"))
    body, content_type, _ = render_export(transcript, "json")
    assert json.loads(body) == data and content_type == "application/json"
    with pytest.raises(InvalidHistory, match="json and md"):
        render_export(transcript, "pdf")
    assert [t.conversation.id async for t in store.transcripts(owner="alice")] == [c.id]


def test_a_page_request_is_read_from_query_strings_or_refused_with_the_reason():
    assert parse_page(None, None) == (50, 0)
    assert parse_page("10", "30") == (10, 30)
    for limit, offset in (("0", "0"), ("201", "0"), ("ten", "0"), ("10", "-1"), ("1.5", "0")):
        with pytest.raises(InvalidHistory, match="limit"):
            parse_page(limit, offset)


def browser_storage() -> list:
    """What app.js keeps under localStorage "offgrid.conversations", newest first."""
    made = 1764400000000  # ms, as Date.now() gave it
    return [
        {"id": "lq2x3abc", "title": "New conversation", "model": "", "messages": []},
        {"id": f"{int(made / 1000 * 1000):x}", "title": "bad id base", "model": "", "messages": "nope"},
        {"id": _base36(made) + "k3f9", "title": "What is a base model", "model": "gemma3-270m", "messages": [
            {"role": "user", "content": "What is a base model?"},
            {"role": "assistant", "content": "A model that continues text.", "stats": "7 tokens · 21.4 tokens/s"},
            {"role": "user", "content": "And an instruct one?"},
            {"role": "assistant", "content": "", "stats": "0 tokens · stopped"},
            {"role": "error", "content": "the daemon went away"},
        ]},
        {"id": "../../etc", "title": "x", "messages": [{"role": "user", "content": "x"}]},
        "not an object",
        {"id": "dup1", "title": None, "model": 42, "messages": [{"role": "sorcerer", "content": "hi"},
                                                                 {"role": "user", "content": ["not", "text"]},
                                                                 {"role": "user", "content": "kept"}]},
        {"id": "dup1", "title": "again", "messages": [{"role": "user", "content": "twice"}]},
    ]


def _base36(n: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while n:
        n, r = divmod(n, 36)
        out = digits[r] + out
    return out


async def test_what_a_browser_kept_is_imported_once_per_key(store):
    saved = browser_storage()
    first = await store.import_browser(saved, owner="alice")
    base_id = _base36(1764400000000) + "k3f9"
    assert set(first.imported) == {base_id, "dup1"} and first.already == {}
    reasons = "\n".join(first.rejected)
    for expected in ("messages is not an array", "id is not 1-64 letters", "conversation 4: not an object",
                     "role 'sorcerer'", "content is not text", "'dup1': appears twice"):
        assert expected in reasons

    t = await store.get(first.imported[base_id], owner="alice")
    assert t.conversation.title == "What is a base model" and t.conversation.model == "gemma3-270m"
    assert t.conversation.created == pytest.approx(1764400000.0)  # from the id: Date.now() in base 36
    assert [m.role for m in t.messages] == ["user", "assistant", "user", "error"]  # the empty stopped answer is not
    assert t.messages[1].completion_tokens == 7 and t.messages[1].model == "gemma3-270m"
    odd = await store.get(first.imported["dup1"], owner="alice")
    assert (odd.conversation.title, odd.conversation.model, [m.content for m in odd.messages]) == (
        "New conversation", "", ["kept"])

    again = await store.import_browser(json.loads(json.dumps(saved)), owner="alice")
    assert again.imported == {} and again.already == first.imported
    assert (await store.list(owner="alice")).total == 2
    other = await store.import_browser(saved, owner="bob")  # the same browser id under another key is another's
    assert set(other.imported) == set(first.imported)
    assert set(other.imported.values()).isdisjoint(first.imported.values())
    assert [h.role for h in await store.search("instruct", owner="alice")] == ["user"]
    assert (await store.import_browser({"conversations": saved}, owner=None)).imported.keys() == first.imported.keys()
    assert (await store.import_browser("garbage", owner=None)).rejected[0].startswith("expected the browser's")


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=9),
                           lambda inner: st.lists(inner, max_size=5) | st.dictionaries(
                               st.sampled_from(["id", "title", "model", "messages", "role", "content", "stats",
                                                "conversations"]) | st.text(max_size=5), inner, max_size=5),
                           max_leaves=30)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_any_json_a_browser_sends_is_parsed_without_raising(saved):
    found, rejected = parse_browser_storage(saved, now=1.8e9)
    assert all(c.messages and len(c.client_id) <= 64 for c in found)
    assert all(isinstance(r, str) for r in rejected)


@settings(max_examples=200, deadline=None)
@given(st.lists(json_values, max_size=6), st.text(max_size=30))
def test_any_request_an_api_client_sends_is_kept_or_refused_with_a_reason(request_messages, answer):
    try:
        c = record_exchange(_FUZZ_DB, owner="fuzz", conversation_id=None, request_messages=request_messages,
                            answer=answer)
    except InvalidHistory:
        return
    assert c.owner == "fuzz" and c.title


async def test_the_database_is_wal_with_full_sync_so_a_committed_message_survives_a_power_cut(store, database):
    await store.create(owner=None)
    modes = await database.run(lambda db: (db.execute("PRAGMA journal_mode").fetchone()[0],
                                            db.execute("PRAGMA synchronous").fetchone()[0]))
    assert modes == ("wal", 2)


async def test_its_size_is_reported_bounded_and_given_back_by_vacuum(database):
    store = ConversationStore(database, max_bytes=0)
    c = await store.create(owner=None, title="big")
    for i in range(40):
        await store.append(c.id, owner=None, role="user", content=f"entry {i} " + "lorem ipsum dolor " * 500)
    size = await store.size()
    assert size.pages > 100 and size.page_size == 4096 and size.file_bytes + size.wal_bytes > 400_000
    assert size.to_dict()["used_bytes"] == (size.pages - size.freelist_pages) * 4096

    store.max_bytes = size.used_bytes + 10_000
    with pytest.raises(HistoryFull, match="delete or export old conversations, or raise history.max_db_bytes"):
        await store.append(c.id, owner=None, role="user", content="x" * 20_000)
    await store.append(c.id, owner=None, role="user", content="a short note still fits")
    with pytest.raises(HistoryFull):
        await store.append(c.id, owner=None, role="user", content="y" * 50_000)
    saved = [{"id": f"b{i}", "title": "t", "messages": [{"role": "user", "content": "z" * 3000}]} for i in range(5)]
    report = await store.import_browser(saved, owner=None)
    assert 0 < len(report.imported) < 5 and len(report.imported) + len(report.rejected) == 5
    assert all("raise history.max_db_bytes" in r for r in report.rejected)

    await store.delete(c.id, owner=None)
    first = await store.vacuum()
    assert first.mode == "full"  # switches the file to incremental auto-vacuum
    assert first.after.on_card < first.before.on_card / 4 and first.after.wal_bytes == 0
    assert await database.run(lambda db: db.execute("PRAGMA auto_vacuum").fetchone()[0]) == 2
    c = await store.create(owner=None, title="again")
    for _ in range(20):
        await store.append(c.id, owner=None, role="user", content="lorem ipsum " * 500)
    await store.delete(c.id, owner=None)
    second = await store.vacuum()
    assert second.mode == "incremental" and second.after.freelist_pages == 0
    assert second.after.on_card < second.before.on_card
    assert (await store.vacuum(full=True)).mode == "full"
    check_fts_agrees(database.path)


async def test_an_older_database_gains_the_history_tables_and_keeps_its_jobs(tmp_path):
    path = tmp_path / "offgridd.db"
    old = Database(path)
    old.run_sync(lambda db: db["jobs"].insert({"id": "j1", "kind": "usb-import", "state": "done"}))
    old.close()
    db = Database(path)
    store = ConversationStore(db)
    await pump_conversation(store)
    assert await db.run(lambda d: d["jobs"].count) == 1
    db.close()
    db = Database(path)  # a second start finds the schema there and changes nothing
    assert sorted(h.role for h in await ConversationStore(db).search("install", owner="alice")) == ["assistant", "user"]
    db.close()


@pytest.fixture
def small_card(tmp_path):
    """A 96 MiB filesystem of its own, as a small SD card would be."""
    card = tmp_path / "card"
    card.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96m", "tmpfs", str(card)]).returncode:
        pytest.skip("mounting a small filesystem for the card needs root")
    yield card
    subprocess.run(["umount", "-l", str(card)])


async def test_a_card_nearly_full_refuses_new_messages_with_a_reason_and_keeps_what_it_has(small_card):
    db = Database(small_card / "offgridd.db")
    store = ConversationStore(db, max_bytes=0)  # no bound of its own: the card's free space is the bound
    c = await store.create(owner=None, title="kept")
    await store.append(c.id, owner=None, role="user", content="the pump is primed")
    # something else fills the card to within 40 MiB of full
    await asyncio.to_thread((small_card / "photos.bin").write_bytes, b"\0" * ((96 - 40) << 20))
    with pytest.raises(HistoryFull, match="the card has [0-9]+ MiB free .* 64 MiB kept free"):
        await store.append(c.id, owner=None, role="user", content="one more")
    assert [m.content for m in (await store.get(c.id, owner=None)).messages] == ["the pump is primed"]
    db.close()


async def test_messages_kept_before_answers_had_sources_gain_the_column_and_stay_searchable(tmp_path):
    path = tmp_path / "offgridd.db"
    old = Database(path)
    store = ConversationStore(old)
    await pump_conversation(store)
    old.run_sync(lambda db: db.execute("ALTER TABLE messages DROP COLUMN sources"))  # as the last release wrote it
    old.close()
    db = Database(path)
    store = ConversationStore(db)
    c = await store.record_exchange(owner=None, conversation_id=None, answer="Boil it for a minute [1].",
                                    request_messages=[{"role": "user", "content": "How long to boil water?"}],
                                    sources=[{"file": "water.md", "page": 1}])
    assert [m.sources for m in (await store.get(c.id, owner=None)).messages] == [None, [{"file": "water.md",
                                                                                            "page": 1}]]
    assert len(await store.search("install", owner="alice")) == 2
    db.close()


async def test_history_work_never_blocks_the_event_loop(store, caplog):
    loop = asyncio.get_running_loop()
    loop.set_debug(True)
    loop.slow_callback_duration = 0.05
    caplog.set_level(logging.WARNING, logger="asyncio")
    saved = [{"id": f"c{i}", "title": f"talk {i}", "messages": [{"role": "user", "content": "pump " * 2000}] * 20}
             for i in range(30)]
    try:
        await asyncio.gather(store.import_browser(saved, owner=None), store.search("pump", owner=None),
                             store.size(), store.vacuum())
    finally:
        loop.set_debug(False)
    assert not [r for r in caplog.records if "Executing" in r.getMessage()]


WRITER = textwrap.dedent("""
    import asyncio, sys
    from pathlib import Path
    from offgridd.db import Database
    from offgridd.history import ConversationStore

    async def main(path, conversation_id):
        store = ConversationStore(Database(Path(path)))
        if conversation_id == "-":
            conversation_id = (await store.create(owner="field", title="power cut")).id
        print(conversation_id, flush=True)
        n = 0
        while True:
            await store.append(conversation_id, owner="field", role="user",
                               content=f"entry{n} marker " + "field notes about the pump " * 400)
            print(n, flush=True)
            n += 1

    asyncio.run(main(sys.argv[1], sys.argv[2]))
""")


def test_a_writer_killed_mid_write_loses_at_most_the_message_it_was_writing(tmp_path):
    path = tmp_path / "offgridd.db"
    rng = random.Random(18)
    conversation = "-"
    kept = 0
    for round_ in range(4):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path), conversation], cwd=REPO,
                                stdout=subprocess.PIPE, text=True, env=os.environ | {"PYTHONUNBUFFERED": "1"})
        try:
            conversation = proc.stdout.readline().strip()
            assert len(conversation) == 32, f"the writer did not start (round {round_})"
            wanted, acked = rng.randint(5, 40), -1
            while acked < wanted:
                acked = int(proc.stdout.readline())
            time.sleep(rng.random() * 0.004)  # land somewhere inside the next append
            proc.send_signal(signal.SIGKILL)
            rest = proc.stdout.read().split()
            acked = int(rest[-1]) if rest else acked
        finally:
            proc.kill()
            proc.wait()
        kept += acked + 1
        check_fts_agrees(path)
        conn = sqlite3.connect(path)
        try:
            rows = conn.execute("SELECT count(*) FROM messages").fetchone()[0]
            indexed = conn.execute("SELECT count(*) FROM messages_fts WHERE messages_fts MATCH 'marker'").fetchone()[0]
            contents = {r[0].split()[0] for r in conn.execute("SELECT content FROM messages")}
        finally:
            conn.close()
        assert kept <= rows <= kept + 1, f"round {round_}: {kept} acknowledged, {rows} in the table"
        assert indexed == rows
        assert {f"entry{n}" for n in range(acked + 1)} <= contents
        kept = rows  # a message committed just before the kill counts as kept for the next round


class HistoryMachine(RuleBasedStateMachine):
    """Any sequence of creates, appends, exchanges, renames, deletes and imports keeps both indexes in step."""

    def __init__(self):
        super().__init__()
        self.db = sqlite_utils.Database(memory=True)
        ensure_schema(self.db)
        self.live: dict[str, tuple[str | None, str, list[str]]] = {}  # id -> owner, title word, message words
        self.made = 0
        self.pumped: set[str] = set()  # conversations with a message saying "pump"

    def word(self) -> str:
        self.made += 1
        return f"w{self.made}x"

    @rule(owner=st.sampled_from(["alice", "bob", None]))
    def create(self, owner):
        title = self.word()
        c = create_conversation(self.db, owner=owner, title=f"about {title}")
        self.live[c.id] = (owner, title, [])

    @precondition(lambda self: self.live)
    @rule(data=st.data(), role=st.sampled_from(["user", "assistant"]))
    def append(self, data, role):
        cid = data.draw(st.sampled_from(list(self.live)))  # insertion order: ids are random
        owner, _, words = self.live[cid]
        words.append(self.word())
        append_message(self.db, cid, owner=owner, role=role, content=f"note {words[-1]} pump")
        self.pumped.add(cid)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def rename(self, data):
        cid = data.draw(st.sampled_from(list(self.live)))  # insertion order: ids are random
        owner, _, words = self.live[cid]
        title = self.word()
        rename_conversation(self.db, cid, f"about {title}", owner=owner)
        self.live[cid] = (owner, title, words)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def delete(self, data):
        cid = data.draw(st.sampled_from(list(self.live)))  # insertion order: ids are random
        owner, _, _ = self.live.pop(cid)
        delete_conversation(self.db, cid, owner=owner)
        self.pumped.discard(cid)

    @rule(owner=st.sampled_from(["alice", None]), n=st.integers(1, 3))
    def import_(self, owner, n):
        saved = [{"id": f"b{self.made}n{i}", "title": f"imported {self.word()}",
                  "messages": [{"role": "user", "content": f"note {self.word()} pump"}]} for i in range(n)]
        found, _ = parse_browser_storage(saved)
        report = import_browser_conversations(self.db, found, owner=owner)
        for raw in saved:
            self.live[report.imported[raw["id"]]] = (owner, raw["title"].split()[1],
                                                     [raw["messages"][0]["content"].split()[1]])
            self.pumped.add(report.imported[raw["id"]])

    @rule(owner=st.sampled_from(["alice", "bob", None]), reply=st.booleans())
    def record(self, owner, reply):
        question = self.word()
        c = record_exchange(self.db, owner=owner, conversation_id=None, answer="fine pump" if reply else "",
                            request_messages=[{"role": "user", "content": f"{question} ok?"}])
        self.live[c.id] = (owner, question, [question])  # the title is the question
        if reply:
            self.pumped.add(c.id)

    @rule(owner=st.sampled_from(["alice", "bob", None]))
    def clear(self, owner):
        gone = delete_everything_of(self.db, owner=owner)
        mine = [cid for cid, (o, _, _) in self.live.items() if o == owner]
        assert gone == len(mine)
        for cid in mine:
            del self.live[cid]
            self.pumped.discard(cid)

    @invariant()
    def indexes_agree_with_tables(self):
        assert check_integrity(self.db) == ()

    @invariant()
    def every_live_word_is_found_by_its_owner_only(self):
        for cid, (owner, title, words) in self.live.items():
            for word in [title, *words][-2:]:
                assert cid in {h.conversation_id for h in search(self.db, word, owner=owner)}
                other = "bob" if owner != "bob" else "alice"
                assert cid not in {h.conversation_id for h in search(self.db, word, owner=other)}
        pumps = {h.conversation_id for h in search(self.db, "pump", owner=EVERYONE, limit=100)}
        assert pumps == self.pumped


HistoryMachine.TestCase.settings = settings(max_examples=40, stateful_step_count=25, deadline=None)
test_any_sequence_of_edits_keeps_search_in_step = HistoryMachine.TestCase


IMPORTER = textwrap.dedent("""
    import asyncio, sys
    from pathlib import Path
    from offgridd.db import Database
    from offgridd.history import ConversationStore

    async def main(path, round_):
        store = ConversationStore(Database(Path(path)))
        print("ready", flush=True)
        n = 0
        while True:
            saved = [{"id": f"r{round_}n{n}", "title": f"kept {n}", "messages": [
                {"role": "user", "content": f"part{i} " + "notes from the field " * 100} for i in range(40)]}]
            report = await store.import_browser(saved, owner=None)
            assert len(report.imported) == 1, report
            print(n, flush=True)
            n += 1

    asyncio.run(main(sys.argv[1], sys.argv[2]))
""")


def test_an_import_killed_mid_write_keeps_each_conversation_whole_or_not_at_all(tmp_path):
    path = tmp_path / "offgridd.db"
    rng = random.Random(1818)
    for round_ in range(3):
        proc = subprocess.Popen([sys.executable, "-c", IMPORTER, str(path), str(round_)], cwd=REPO,
                                stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout.readline().strip() == "ready"
            wanted, acked = rng.randint(2, 8), -1
            while acked < wanted:
                acked = int(proc.stdout.readline())
            time.sleep(rng.random() * 0.02)
            proc.send_signal(signal.SIGKILL)
            rest = proc.stdout.read().split()
            acked = int(rest[-1]) if rest else acked
        finally:
            proc.kill()
            proc.wait()
        check_fts_agrees(path)
        conn = sqlite3.connect(path)
        try:
            counts = dict(conn.execute("SELECT c.client_id, count(m.id) FROM conversations c "
                                       "LEFT JOIN messages m ON m.conversation_id = c.id GROUP BY c.id"))
        finally:
            conn.close()
        assert set(counts.values()) == {40}, "a conversation was kept in part"
        mine = {cid for cid in counts if cid.startswith(f"r{round_}n")}
        assert {f"r{round_}n{n}" for n in range(acked + 1)} <= mine <= {f"r{round_}n{n}" for n in range(acked + 2)}


async def test_the_vacuum_schedule_runs_in_the_background_until_cancelled(store, database, caplog):
    caplog.set_level(logging.INFO, logger="offgridd.history")
    task = asyncio.create_task(vacuum_periodically(store, 0.05))
    try:
        for _ in range(100):
            await asyncio.sleep(0.05)
            if await database.run(lambda db: db.execute("PRAGMA auto_vacuum").fetchone()[0]) == 2:
                break
        assert await database.run(lambda db: db.execute("PRAGMA auto_vacuum").fetchone()[0]) == 2
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert any("vacuumed offgridd.db (full)" in r.getMessage() for r in caplog.records)


INSIDE = textwrap.dedent("""
    import asyncio, sys, time
    from pathlib import Path
    from offgridd.db import Database
    from offgridd.history import ConversationStore

    n, kill_at, conn = 0, int(sys.argv[2]), None

    def tracer(sql):
        # runs on the database thread as each statement starts: the message's row and index entries are written,
        # its transaction not yet committed
        if n == kill_at and sql.startswith("UPDATE conversations"):
            print("inside", conn.in_transaction, flush=True)
            time.sleep(60)

    async def main(path):
        global n, conn
        store = ConversationStore(Database(Path(path)))
        c = await store.create(owner=None, title="inside")
        conn = await store.db.run(lambda db: db.conn)
        conn.set_trace_callback(tracer)
        while True:
            await store.append(c.id, owner=None, role="user", content=f"entry{n} marker " + "pump notes " * 500)
            n += 1

    asyncio.run(main(sys.argv[1]))
""")


def test_a_writer_killed_inside_its_transaction_loses_exactly_that_message(tmp_path):
    path = tmp_path / "offgridd.db"
    proc = subprocess.Popen([sys.executable, "-c", INSIDE, str(path), "7"], cwd=REPO, stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "inside True"  # the message written, its commit not yet
        wal = path.with_name(path.name + "-wal").stat().st_size
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert wal > 0
    check_fts_agrees(path)
    conn = sqlite3.connect(path)
    try:
        contents = [r[0].split()[0] for r in conn.execute("SELECT content FROM messages ORDER BY id")]
        indexed = conn.execute("SELECT count(*) FROM messages_fts WHERE messages_fts MATCH 'marker'").fetchone()[0]
        found = conn.execute("SELECT count(*) FROM messages_fts WHERE messages_fts MATCH 'entry7'").fetchone()[0]
    finally:
        conn.close()
    assert contents == [f"entry{i}" for i in range(7)] and indexed == 7 and found == 0
