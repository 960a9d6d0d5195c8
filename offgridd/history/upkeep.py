"""Keeping offgridd.db bounded on an SD card: its size for /health, a limit checked before each write, and vacuum."""

from __future__ import annotations

import os
import sqlite3
import time
from dataclasses import asdict, dataclass

import sqlite_utils

from ..db import check_room as db_check_room
from .records import HistoryFull

INCREMENTAL = 2  # PRAGMA auto_vacuum value


@dataclass(frozen=True, slots=True, kw_only=True)
class DatabaseSize:
    file_bytes: int  # offgridd.db on disk
    wal_bytes: int  # offgridd.db-wal, until the next checkpoint folds it in
    page_size: int
    pages: int
    freelist_pages: int  # free pages inside the file, reused by later writes or returned by vacuum

    @property
    def used_bytes(self) -> int:
        return (self.pages - self.freelist_pages) * self.page_size

    @property
    def on_card(self) -> int:
        return self.file_bytes + self.wal_bytes

    def to_dict(self) -> dict:
        return asdict(self) | {"used_bytes": self.used_bytes, "on_card": self.on_card}


@dataclass(frozen=True, slots=True, kw_only=True)
class VacuumResult:
    mode: str  # "incremental" | "full"
    before: DatabaseSize
    after: DatabaseSize
    seconds: float

    def to_dict(self) -> dict:
        return {"mode": self.mode, "before": self.before.to_dict(), "after": self.after.to_dict(),
                "seconds": round(self.seconds, 3), "freed_bytes": self.before.on_card - self.after.on_card}


def _pragma(db: sqlite_utils.Database, name: str) -> int:
    return db.execute(f"PRAGMA {name}").fetchone()[0]


def _path(db: sqlite_utils.Database) -> str:
    return next((row[2] for row in db.execute("PRAGMA database_list") if row[1] == "main"), "")


def _fts_tables(db: sqlite_utils.Database) -> list[str]:
    return [row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table' "
                                         "AND sql LIKE 'CREATE VIRTUAL TABLE%USING FTS5%'")]


def database_size(db: sqlite_utils.Database) -> DatabaseSize:
    path = _path(db)

    def size(p: str) -> int:
        try:
            return os.stat(p).st_size
        except OSError:  # in memory, or no WAL right after a truncating checkpoint
            return 0
    return DatabaseSize(file_bytes=size(path) if path else 0, wal_bytes=size(path + "-wal") if path else 0,
                        page_size=_pragma(db, "page_size"), pages=_pragma(db, "page_count"),
                        freelist_pages=_pragma(db, "freelist_count"))


def check_room(db: sqlite_utils.Database, max_bytes: int, adding: int) -> None:
    """Raise HistoryFull when writing `adding` more bytes of text would take the database past `max_bytes` (0: none)."""
    # the FTS index roughly doubles what a message costs: count it so the bound holds on the card, not just in the table
    db_check_room(db, max_bytes, 2 * adding, "delete or export old conversations", HistoryFull)


def vacuum(db: sqlite_utils.Database, *, full: bool = False) -> VacuumResult:
    """Return free pages to the card. Incremental is quick; full rewrites the file (and blocks writers meanwhile).

    The first vacuum of a database created without incremental auto-vacuum is full: that is the only way to switch it.
    """
    started = time.monotonic()
    before = database_size(db)
    if db.conn.in_transaction:
        db.conn.commit()  # VACUUM cannot run inside one; any open here was left by a finished caller on this thread
    if full or _pragma(db, "auto_vacuum") != INCREMENTAL:
        mode = "full"
        for fts in _fts_tables(db):  # conversations', messages' and documents' chunks' indexes alike
            db.execute(f"INSERT INTO \"{fts}\"(\"{fts}\") VALUES('optimize')")
        db.conn.commit()
        db.execute("PRAGMA auto_vacuum = INCREMENTAL")
        db.execute("VACUUM")
    else:
        mode = "incremental"
        # executescript steps a statement to its end; execute() steps once, and this pragma frees a page per step
        db.conn.executescript("PRAGMA incremental_vacuum")
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
    return VacuumResult(mode=mode, before=before, after=database_size(db), seconds=time.monotonic() - started)


def check_integrity(db: sqlite_utils.Database) -> tuple[str, ...]:
    """Problems found in the file and in both search indexes (each compared with its table); empty when sound."""
    problems = [row[0] for row in db.execute("PRAGMA quick_check") if row[0] != "ok"]
    for fts in ("conversations_fts", "messages_fts"):
        try:
            # rank 1: also compare the index with the table it indexes (plain 'integrity-check' does not, here)
            db.execute(f"INSERT INTO {fts}({fts}, rank) VALUES('integrity-check', 1)")
        except sqlite3.DatabaseError as e:
            problems.append(f"{fts} disagrees with its table ({e}): rebuild_search_index() rebuilds it")
    return tuple(problems)


def rebuild_search_index(db: sqlite_utils.Database) -> None:
    """Rebuild both search indexes from their tables (minutes for a large history; writers wait meanwhile)."""
    with db.atomic():
        for fts in ("conversations_fts", "messages_fts"):
            db.execute(f"INSERT INTO {fts}({fts}) VALUES('rebuild')")
