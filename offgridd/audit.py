"""The audit log in offgridd.db: every admin action, every refused key, every fleet join and rotation, with the
time, the key's name (never the key), the client's address and the outcome. Bounded on the card: the oldest rows
go past MAX_ROWS, and a client refused over and over is recorded at most once per REFUSAL_GAP_S."""

from __future__ import annotations

import time

import sqlite_utils

from .db import Database

MAX_ROWS = 20_000
TRIM_EVERY = 200  # records between trims
REFUSAL_GAP_S = 10.0
MAX_TRACKED = 1024  # clients whose last refusal time is remembered


def record_now(db: sqlite_utils.Database, action: str, outcome: str, key: str | None = None,
               client: str | None = None, detail: str = "") -> None:
    """Blocking: write one entry (the command line, or the daemon's database thread)."""
    db["audit"].insert({"time": time.time(), "action": action[:200], "key": key, "client": client,
                        "outcome": outcome[:200], "detail": detail[:500]})


def trim(db: sqlite_utils.Database, keep: int = MAX_ROWS) -> None:
    db.execute("DELETE FROM audit WHERE id <= (SELECT id FROM audit ORDER BY id DESC LIMIT 1 OFFSET ?)", [keep])


def entries(db: sqlite_utils.Database, since: float = 0.0, limit: int = 1000) -> list[dict]:
    return list(db["audit"].rows_where("time >= ?", [since], order_by="id desc", limit=limit))


class Audit:
    def __init__(self, db: Database):
        self.db = db
        self._written = 0
        self._refused: dict[str, float] = {}

    def record(self, action: str, outcome: str, key: str | None = None, client: str | None = None,
               detail: str = "") -> None:
        self.db.submit(lambda db: record_now(db, action, outcome, key, client, detail), f"the audit entry {action}")
        self._written += 1
        if self._written % TRIM_EVERY == 0:
            self.db.submit(trim, "trimming the audit log")

    def refused(self, action: str, outcome: str, client: str | None, key: str | None = None) -> None:
        """A refused key or scope: recorded, but not more than once per REFUSAL_GAP_S per client and outcome."""
        now = time.monotonic()
        mark = f"{client}|{outcome}"
        if now - self._refused.get(mark, -REFUSAL_GAP_S) < REFUSAL_GAP_S:
            return
        if len(self._refused) >= MAX_TRACKED:
            self._refused = {m: t for m, t in self._refused.items() if now - t < REFUSAL_GAP_S}
        self._refused[mark] = now
        self.record(action, outcome, key, client)

    async def recent(self, since: float = 0.0, limit: int = 1000) -> list[dict]:
        return await self.db.run(lambda db: entries(db, since, limit))
