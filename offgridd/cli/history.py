"""`offgridd history list|show|search|export|rm`: the conversations kept on this box, every key's, read from its
database directly (the daemon may be running or not)."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

from ..db import Database
from ..history import EVERYONE, ConversationStore, HistoryError, render_export
from .common import settings


def _run(args: argparse.Namespace, work) -> int:
    async def go() -> int:
        db = Database(settings(args).state / "offgridd.db")
        try:
            return await work(ConversationStore(db))
        except HistoryError as e:
            print(e, file=sys.stderr)
            return 1
        finally:
            db.close()

    return asyncio.run(go())


def _when(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(seconds))


def cmd_list(args: argparse.Namespace) -> int:
    async def work(store: ConversationStore) -> int:
        page = await store.list(owner=EVERYONE, limit=args.limit)
        for c in page.conversations:
            print(f"{c.id}  {_when(c.updated)}  {c.owner or '-':12} {c.message_count:4} msgs  {c.title}")
        print(f"{len(page.conversations)} of {page.total} conversations", file=sys.stderr)
        return 0

    return _run(args, work)


def cmd_show(args: argparse.Namespace) -> int:
    async def work(store: ConversationStore) -> int:
        body, _, _ = render_export(await store.get(args.id, owner=EVERYONE), "md")
        sys.stdout.write(body.decode())
        return 0

    return _run(args, work)


def cmd_search(args: argparse.Namespace) -> int:
    async def work(store: ConversationStore) -> int:
        hits = await store.search(" ".join(args.text), owner=EVERYONE, limit=args.limit)
        for h in hits:
            print(f"{h.conversation_id}  {_when(h.created)}  {h.title}\n    {h.snippet_text('[', ']')}")
        if not hits:
            print("nothing found", file=sys.stderr)
        return 0 if hits else 1

    return _run(args, work)


def cmd_export(args: argparse.Namespace) -> int:
    async def work(store: ConversationStore) -> int:
        body, _, name = render_export(await store.get(args.id, owner=EVERYONE), args.format)
        target = Path(args.out) if args.out else Path(name)
        target.write_bytes(body)
        print(f"wrote {target}", file=sys.stderr)
        return 0

    return _run(args, work)


def cmd_rm(args: argparse.Namespace) -> int:
    async def work(store: ConversationStore) -> int:
        removed = await store.delete(args.id, owner=EVERYONE)
        print(f"deleted {args.id} ({removed} messages)")
        return 0

    return _run(args, work)


def add_commands(sub, common: argparse.ArgumentParser) -> None:
    group = sub.add_parser("history", help="conversations kept on this box").add_subparsers(
        dest="history_command", required=True)
    ls = group.add_parser("list", parents=[common], help="the newest conversations, every key's")
    ls.add_argument("--limit", type=int, default=50)
    ls.set_defaults(func=cmd_list)
    show = group.add_parser("show", parents=[common], help="a conversation as Markdown")
    show.add_argument("id")
    show.set_defaults(func=cmd_show)
    search = group.add_parser("search", parents=[common], help="full-text search over titles and messages")
    search.add_argument("text", nargs="+")
    search.add_argument("--limit", type=int, default=20)
    search.set_defaults(func=cmd_search)
    export = group.add_parser("export", parents=[common], help="write a conversation to a file (JSON or Markdown)")
    export.add_argument("id")
    export.add_argument("--format", choices=("json", "md"), default="md")
    export.add_argument("--out", help="file to write (default: a name from its title)")
    export.set_defaults(func=cmd_export)
    rm = group.add_parser("rm", parents=[common], help="delete a conversation")
    rm.add_argument("id")
    rm.set_defaults(func=cmd_rm)
