"""Conversation history at scale: fill 100,000 messages, then time searches of 1-3 words (issue #18: under 50 ms).

    .venv/bin/python bench/history_bench.py [--messages 100000] [--queries 400] [--keep DIR]

Text is generated deterministically (seeded) from a built-in vocabulary with a Zipf-like frequency, so common words
("the", "water") match most messages and rare ones a handful; lengths follow chat: short questions, longer answers.
Nothing is downloaded. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
import uuid
from pathlib import Path

import sqlite_utils

from offgridd.db import Database
from offgridd.history.records import EVERYONE, scope_token
from offgridd.history.schema import ensure_schema
from offgridd.history.search import search
from offgridd.history.store import append_message, create_conversation, delete_conversation
from offgridd.history.upkeep import database_size, vacuum

COMMON = """the a to of and in is it you that for on with this be are as can or if your not have at by from will
use do an what how water power battery solar pump filter radio map battery signal route camp fire first aid wound
bandage fever child medicine dose hours day night north river bridge road fuel engine oil tire repair tool rope knife
seed soil plant harvest goat chicken milk bread rice beans salt sugar boil clean wash cold warm rain wind storm flood
check open close turn start stop keep make need more less small large long short left right up down before after
step then when which because should would could also only just very about into over under between""".split()
SYLLABLES = "ka ri to mu sa ne lo vi ha pe zu do fi gra sto ple wen dar mik sol tun bre ova qui xen".split()


def vocabulary(rng: random.Random, rare: int = 20_000) -> list[str]:
    words = set()
    while len(words) < rare:
        words.add("".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 4))))
    return COMMON + sorted(words)


class TextMaker:
    def __init__(self, seed: int = 18):
        self.rng = random.Random(seed)
        self.words = vocabulary(self.rng)
        # Zipf-like: the word at rank r is drawn with weight 1/(r+1)
        self.weights = [1 / (r + 1) for r in range(len(self.words))]
        self.cumulative = list(_accumulate(self.weights))

    def words_(self, n: int) -> list[str]:
        return self.rng.choices(self.words, cum_weights=self.cumulative, k=n)

    def message(self, role: str) -> str:
        mean = 14 if role == "user" else 110
        n = max(2, min(800, int(self.rng.lognormvariate(0, 0.6) * mean)))
        words = self.words_(n)
        sentences, at = [], 0
        while at < n:
            k = self.rng.randint(6, 18)
            part = words[at:at + k]
            sentences.append(" ".join(part).capitalize() + self.rng.choice(".?." if role == "user" else "..!:"))
            at += k
        return " ".join(sentences)


def _accumulate(xs):
    total = 0.0
    for x in xs:
        total += x
        yield total


def fill(db: sqlite_utils.Database, maker: TextMaker, messages: int, per_conversation: int, owners: list) -> dict:
    """Bulk-fill in large transactions (the benchmark's setup, not the daemon's way of writing)."""
    started = time.perf_counter()
    now = time.time() - messages
    conversations = messages // per_conversation
    for c in range(conversations):
        cid = uuid.uuid4().hex
        owner = owners[c % len(owners)]
        with db.conn:
            db["conversations"].insert({"id": cid, "title": " ".join(maker.words_(4)).capitalize(), "created": now,
                                        "updated": now, "owner": owner, "model": "gemma3-270m", "source": "ui"})
            roles = (["user", "assistant"] * per_conversation)[:per_conversation]
            db["messages"].insert_all(({
                "conversation_id": cid, "role": role, "content": maker.message(role), "created": now, "model": "",
                "completion_tokens": None, "scope": scope_token(owner)} for role in roles), batch_size=500)
        now += per_conversation
    return {"messages": conversations * per_conversation, "conversations": conversations,
            "bulk_fill_s": round(time.perf_counter() - started, 1),
            "bulk_messages_per_s": round(conversations * per_conversation / (time.perf_counter() - started))}


def appends(database: Database, maker: TextMaker, n: int) -> dict:
    """The daemon's way: one message per transaction on the writer thread, WAL with synchronous=FULL (fsync each)."""
    conversation = database.run_sync(lambda db: create_conversation(db, owner="alice", title="append bench"))
    roles = ["user", "assistant"] * n
    texts = [maker.message(r) for r in roles[:n]]
    started = time.perf_counter()
    for role, text in zip(roles, texts, strict=False):
        database.run_sync(lambda db, r=role, t=text: append_message(db, conversation.id, owner="alice", role=r,
                                                                    content=t, max_bytes=1 << 40))
    spent = time.perf_counter() - started
    return {"appended": n, "append_messages_per_s": round(n / spent), "append_ms_mean": round(spent / n * 1000, 2)}


def queries(maker: TextMaker, n: int) -> list[tuple[str, str]]:
    rng = random.Random(7)
    common, rare = maker.words[:40], maker.words[len(COMMON):]
    middle = maker.words[40:len(COMMON) + 400]
    out = []
    for i in range(n):
        kind = ("common", "middle", "rare", "mixed")[i % 4]
        k = rng.randint(1, 3)
        if kind == "common":
            words = rng.sample(common, k)
        elif kind == "middle":
            words = rng.sample(middle, k)
        elif kind == "rare":
            words = rng.sample(rare, k)
        else:
            words = [rng.choice(common), rng.choice(middle), rng.choice(rare)][:k]
        out.append((kind, " ".join(words)))
    return out


def percentile(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def time_searches(database: Database, qs: list[tuple[str, str]], owner) -> dict:
    spent: dict[str, list[float]] = {}
    hits = []
    for kind, q in qs:
        started = time.perf_counter()
        found = database.run_sync(lambda db, q=q: search(db, q, owner=owner, limit=20))
        ms = (time.perf_counter() - started) * 1000
        spent.setdefault(kind, []).append(ms)
        spent.setdefault("all", []).append(ms)
        hits.append(len(found))
    return {kind: {"n": len(xs), "p50_ms": round(percentile(xs, 50), 2), "p95_ms": round(percentile(xs, 95), 2),
                   "max_ms": round(max(xs), 2)} for kind, xs in spent.items()} | {
        "queries_with_hits": sum(1 for h in hits if h)}


def upkeep(db: sqlite_utils.Database, owners: list) -> dict:
    """Delete a fifth of the history and vacuum (the first one full), then another fifth and vacuum (incremental)."""
    out = {}
    for step, owner in enumerate(owners[:2]):
        started = time.perf_counter()
        ids = [r[0] for r in db.execute("SELECT id FROM conversations WHERE owner IS ?", [owner])]
        for cid in ids:
            delete_conversation(db, cid, owner=owner)
        deleted = time.perf_counter() - started
        result = vacuum(db)
        out[f"round{step + 1}"] = {"deleted_conversations": len(ids), "delete_s": round(deleted, 2),
                                   "mode": result.mode, "vacuum_s": round(result.seconds, 2),
                                   "before_bytes": result.before.on_card, "after_bytes": result.after.on_card}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--per-conversation", type=int, default=20)
    parser.add_argument("--queries", type=int, default=400)
    parser.add_argument("--appends", type=int, default=500)
    parser.add_argument("--keep", type=Path, help="write the database here instead of a temporary directory")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = (args.keep or Path(tmp)) / "offgridd.db"
        maker = TextMaker()
        database = Database(path)
        database.run_sync(ensure_schema)
        owners = ["alice", "bob", "carol", "dave", None]
        result = {"db": str(path)} | database.run_sync(
            lambda db: fill(db, maker, args.messages, args.per_conversation, owners))
        result |= appends(database, maker, args.appends)
        qs = queries(maker, args.queries)
        time_searches(database, qs[:50], "alice")  # warm the page cache, as a running daemon's would be
        result["search_one_owner"] = time_searches(database, qs, "alice")
        result["search_everyone"] = time_searches(database, qs, EVERYONE)
        database.run_sync(lambda db: db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall())
        size = database.run_sync(database_size)
        result["size"] = size.to_dict() | {"bytes_per_message": round(size.on_card / result["messages"])}
        result["vacuum"] = database.run_sync(lambda db: upkeep(db, owners))
        database.close()
        print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
