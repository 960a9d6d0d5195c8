"""The daemon's sqlite database (sqlite-utils), written by one dedicated thread so the event loop never waits on it."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import sqlite_utils

T = TypeVar("T")

log = logging.getLogger(__name__)

SCHEMA = {
    "jobs": ({"id": str, "kind": str, "source": str, "model": str, "state": str, "bytes_done": int,
              "bytes_total": int, "started": float, "finished": float, "reason": str}, "id"),
    "keys": ({"name": str, "hash": str, "scope": str, "rpm": int, "tpm": int, "created": float, "last_used": float},
             "name"),
    "audit": ({"id": int, "time": float, "action": str, "key": str, "client": str, "outcome": str, "detail": str},
              "id"),
}


class Database:
    def __init__(self, path: Path):
        self.path = path
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite")
        self._db: sqlite_utils.Database | None = None

    def _open(self) -> sqlite_utils.Database:
        if self._db is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite_utils.Database(sqlite3.connect(self.path, check_same_thread=False))
            self._db.execute("PRAGMA journal_mode=WAL")
            for name, (columns, pk) in SCHEMA.items():
                self._db[name].create(columns, pk=pk, if_not_exists=True)
            self._db["keys"].create_index(["hash"], unique=True, if_not_exists=True)
            self._db["audit"].create_index(["time"], if_not_exists=True)
        return self._db

    def submit(self, fn: Callable[[sqlite_utils.Database], T], what: str = "a database write"):
        """Queue a write and return at once (from the loop or any thread). A write that fails is logged, naming
        `what`; callers that must know wait on the returned future."""
        future = self._thread.submit(lambda: fn(self._open()))
        future.add_done_callback(lambda f: _log_failure(f, what))
        return future

    def run_sync(self, fn: Callable[[sqlite_utils.Database], T]) -> T:
        """Run on the database thread and wait (for callers already off the event loop)."""
        return self._thread.submit(lambda: fn(self._open())).result()

    async def run(self, fn: Callable[[sqlite_utils.Database], T]) -> T:
        """Run on the database thread without blocking the loop."""
        return await asyncio.wrap_future(self._thread.submit(lambda: fn(self._open())))

    def close(self) -> None:
        def _close(_db):
            if self._db is not None:
                self._db.close()
        self._thread.submit(lambda: _close(None)).result()
        self._thread.shutdown()


class Tables:
    """A subsystem's tables in the shared database: its work runs on the database thread, after `ensure` has made
    them (once, on that thread)."""

    def __init__(self, db: Database, ensure: Callable[[sqlite_utils.Database], None]):
        self.db, self._ensure = db, ensure
        self._ready = False  # only read and written on the database thread

    async def run(self, fn: Callable[..., T], *args, **kwargs) -> T:
        def work(db: sqlite_utils.Database) -> T:
            if not self._ready:
                self._ensure(db)
                self._ready = True
            return fn(db, *args, **kwargs)

        return await self.db.run(work)


def _log_failure(future, what: str) -> None:
    if not future.cancelled() and (e := future.exception()) is not None:
        log.error("%s failed: %s", what, e, exc_info=e)


CARD_RESERVE_BYTES = 64 << 20  # left free on the card by writes to the database: the journal and logs need room too


def used_bytes(db: sqlite_utils.Database) -> int:
    """The bytes the database's pages hold, not counting free pages a vacuum would give back."""
    pages, free, size = (db.execute(f"PRAGMA {name}").fetchone()[0]
                         for name in ("page_count", "freelist_count", "page_size"))
    return (pages - free) * size


def check_room(db: sqlite_utils.Database, max_bytes: int, adding: int, remedy: str,
               error: type[Exception]) -> None:
    """Raise `error` (the caller's own "full" error) when about `adding` more bytes (the caller counts its
    indexes) would take the database past `max_bytes` (0: no bound), or leave less than CARD_RESERVE_BYTES free on
    its filesystem. `remedy` says how to make room."""
    path = next((row[2] for row in db.execute("PRAGMA database_list") if row[1] == "main"), "")
    if path:
        free = shutil.disk_usage(os.path.dirname(path)).free
        if free - adding < CARD_RESERVE_BYTES:
            raise error(f"the card has {free >> 20} MiB free and this needs about {max(1, adding >> 20)} MiB, with "
                        f"{CARD_RESERVE_BYTES >> 20} MiB kept free for the system: {remedy}, or free space on it")
    if max_bytes <= 0:
        return
    used = used_bytes(db)
    if used + adding > max_bytes:
        raise error(f"offgridd.db holds {used >> 20} MiB of its {max_bytes >> 20} MiB bound and this needs about "
                    f"{max(1, adding >> 20)} MiB more: {remedy}, or raise history.max_db_bytes "
                    "(OFFGRID_HISTORY_MAX_DB_BYTES) if the card has room")
