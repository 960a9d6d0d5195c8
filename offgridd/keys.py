"""API keys: stored hashed in offgridd.db with a scope and limits, checked per request from a short-lived cache.

A key is shown once, when it is made; the database holds its SHA-256. `chat` keys reach /v1/* and read /api/*;
`admin` keys also change things (delete and import models, USB, keys, fleet). The config file's `api_key` and
`admin_key` keep working as keys named after them.
"""

from __future__ import annotations

import hashlib
import math
import secrets
import time
from dataclasses import dataclass, field

import sqlite_utils

from .db import Database

SCOPES = ("chat", "admin")
RELOAD_S = 1.0  # a key added or revoked from the command line counts within this long
TOUCH_EVERY_S = 60.0  # how often a key's last use is written


class KeyRefused(ValueError):
    """A key that cannot be made or revoked as asked; the message says why."""


@dataclass(frozen=True, slots=True)
class ApiKey:
    name: str
    scope: str  # chat | admin
    rpm: int = 0  # requests per minute, 0 for no bound
    tpm: int = 0  # tokens (prompt + completion) per minute, 0 for no bound

    @property
    def admin(self) -> bool:
        return self.scope == "admin"


def digest(secret: bytes) -> str:
    return hashlib.sha256(secret).hexdigest()


def new_secret() -> str:
    return "og-" + secrets.token_urlsafe(24)


def _valid_name(name: str) -> bool:
    return 0 < len(name) <= 64 and name.replace("-", "").replace("_", "").replace(".", "").isalnum() \
        and name.isascii()


# --- the table (blocking: the command line calls these directly, the daemon on its database thread)

def add_key(db: sqlite_utils.Database, name: str, scope: str = "chat", rpm: int = 0, tpm: int = 0) -> str:
    """Make a key and return its secret, the only time it is seen."""
    if not _valid_name(name):
        raise KeyRefused(f"a key's name is 1-64 letters, digits, '-', '_' or '.', got {name!r}")
    if name in ("api_key", "admin_key"):
        raise KeyRefused(f"{name!r} is the config file's key; pick another name")
    if scope not in SCOPES:
        raise KeyRefused(f"scope must be one of {', '.join(SCOPES)}, got {scope!r}")
    if rpm < 0 or tpm < 0:
        raise KeyRefused("limits are 0 (none) or more")
    if db["keys"].count_where("name = ?", [name]):
        raise KeyRefused(f"a key named {name!r} exists; revoke it first")
    secret = new_secret()
    db["keys"].insert({"name": name, "hash": digest(secret.encode()), "scope": scope, "rpm": rpm, "tpm": tpm,
                       "created": time.time(), "last_used": 0.0})
    return secret


def list_keys(db: sqlite_utils.Database) -> list[dict]:
    return [{k: row[k] for k in ("name", "scope", "rpm", "tpm", "created", "last_used")}
            for row in db["keys"].rows_where(order_by="name")]


def revoke_key(db: sqlite_utils.Database, name: str) -> None:
    if not db["keys"].count_where("name = ?", [name]):
        raise KeyRefused(f"no key named {name!r}")
    db["keys"].delete_where("name = ?", [name])


# --- per request

@dataclass(slots=True)
class _Bucket:
    """A minute's allowance refilled continuously; may go below zero when tokens are charged after the fact."""

    per_minute: int
    level: float = 0.0
    at: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.level = float(self.per_minute)

    def _refill(self, now: float) -> None:
        self.level = min(self.per_minute, self.level + (now - self.at) * self.per_minute / 60)
        self.at = now

    def wait(self, cost: float, now: float) -> float:
        """Seconds until `cost` fits (0: it fits now)."""
        self._refill(now)
        return 0.0 if self.level >= cost else (cost - self.level) * 60 / self.per_minute

    def take(self, cost: float, now: float) -> None:
        self._refill(now)
        self.level -= cost


class KeyRing:
    """The keys the daemon accepts, and their limits. Lookups are served from memory, reloaded from the database
    at most every RELOAD_S; a miss does not cause a reload of its own, so guessing costs nothing."""

    def __init__(self, db: Database, api_key: str | None = None, admin_key: str | None = None):
        self.db = db
        self._config: dict[str, ApiKey] = {}
        if admin_key:
            self._config[digest(admin_key.encode())] = ApiKey("admin_key", "admin")
        if api_key:  # the LAN's key: admin too unless an admin key of its own is configured
            self._config[digest(api_key.encode())] = ApiKey("api_key", "chat" if admin_key else "admin")
        self._stored: dict[str, ApiKey] = {}
        self._loaded = -math.inf
        self._requests: dict[str, _Bucket] = {}
        self._tokens: dict[str, _Bucket] = {}
        self._used: dict[str, float] = {}
        self._touched = time.monotonic()

    async def _reload(self) -> None:
        now = time.monotonic()
        if now - self._loaded < RELOAD_S:
            return
        self._loaded = now
        rows = await self.db.run(lambda db: list(db["keys"].rows))
        self._stored = {r["hash"]: ApiKey(r["name"], r["scope"], r["rpm"] or 0, r["tpm"] or 0) for r in rows}
        names = {k.name for k in self._stored.values()} | {k.name for k in self._config.values()}
        for table in (self._requests, self._tokens, self._used):
            for name in set(table) - names:
                del table[name]
        if self._used and now - self._touched >= TOUCH_EVERY_S:
            self._touched, used, self._used = now, self._used, {}
            self.db.submit(lambda db: [db["keys"].update(n, {"last_used": t}) for n, t in used.items()
                                       if db["keys"].count_where("name = ?", [n])], "recording keys' last use")

    async def lookup(self, secret: bytes) -> ApiKey | None:
        await self._reload()
        h = digest(secret)
        key = self._config.get(h) or self._stored.get(h)
        if key is not None and key.name not in ("api_key", "admin_key"):
            self._used[key.name] = time.time()
        return key

    async def chat_needs_key(self) -> bool:
        """Whether /v1/* is closed to clients without a key: a chat key (or the config's api_key) exists."""
        await self._reload()
        return any(k.scope == "chat" or k.name == "api_key"
                   for k in (*self._config.values(), *self._stored.values()))

    async def has_admin(self) -> bool:
        await self._reload()
        return any(k.admin for k in (*self._config.values(), *self._stored.values()))

    def admit(self, key: ApiKey) -> float:
        """Seconds this key must wait before another request (0: go ahead, and it is counted)."""
        now = time.monotonic()
        wait = 0.0
        if key.rpm:
            wait = self._requests.setdefault(key.name, _Bucket(key.rpm)).wait(1, now)
        if key.tpm:
            wait = max(wait, self._tokens.setdefault(key.name, _Bucket(key.tpm)).wait(0, now))
        if wait == 0 and key.rpm:
            self._requests[key.name].take(1, now)
        return wait

    def charge(self, key: ApiKey, tokens: int) -> None:
        """Count a finished request's tokens against its key's minute."""
        if key.tpm:
            self._tokens.setdefault(key.name, _Bucket(key.tpm)).take(tokens, time.monotonic())
