"""What a browser kept in localStorage before history lived on the box, read as hostile input.

Format (version 0, written by `ui/static/app.js` up to this release): the value of the key "offgrid.conversations" is
a JSON array of at most 50 conversations, newest first:

    {"id": "<Date.now() in base 36><4 random base-36 characters>", "title": str, "model": str,
     "messages": [{"role": "user" | "assistant" | "error", "content": str, "stats"?: "<n> tokens · <r> tokens/s"}]}

Also accepted: {"conversations": [...]}. Anything else, and anything past the bounds below, is left out with a reason;
nothing here raises on any JSON value.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

from .records import DEFAULT_TITLE, MAX_MESSAGE_CHARS, ROLES, InvalidHistory, clean_title

MAX_CONVERSATIONS = 1000
MAX_MESSAGES = 10_000  # per conversation
MAX_MODEL_CHARS = 200
CLIENT_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
STATS_TOKENS = re.compile(r"(\d{1,9}) tokens")
EARLIEST = 1577836800.0  # 2020-01-01: an id decoding to before this was not made by Date.now()


@dataclass(frozen=True, slots=True, kw_only=True)
class BrowserMessage:
    role: str
    content: str
    completion_tokens: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class BrowserConversation:
    client_id: str
    title: str
    model: str
    created: float
    messages: tuple[BrowserMessage, ...]

    def size(self) -> int:
        return len(self.title) + sum(len(m.content.encode("utf-8", "surrogatepass")) for m in self.messages)


def created_from_id(client_id: str, now: float) -> float:
    """The UI's ids start with the creation time in base-36 milliseconds; a box without a clock has only that."""
    try:
        seconds = int(client_id[:-4], 36) / 1000
    except ValueError:
        return now
    return seconds if EARLIEST <= seconds <= now + 86400 else now


def _message(raw: object, where: str, rejected: list[str]) -> BrowserMessage | None:
    if not isinstance(raw, dict):
        rejected.append(f"{where}: not an object")
        return None
    role, content = raw.get("role"), raw.get("content")
    if role not in ROLES:
        rejected.append(f"{where}: role {str(role)[:20]!r} is not one of {', '.join(ROLES)}")
        return None
    if not isinstance(content, str):
        rejected.append(f"{where}: content is not text")
        return None
    if not content:
        return None  # an answer stopped before its first token: nothing to keep
    if len(content) > MAX_MESSAGE_CHARS:
        rejected.append(f"{where}: {len(content)} characters, over the {MAX_MESSAGE_CHARS} a message may hold")
        return None
    stats = raw.get("stats")
    tokens = STATS_TOKENS.match(stats) if isinstance(stats, str) else None
    return BrowserMessage(role=role, content=content, completion_tokens=int(tokens[1]) if tokens else None)


def parse_browser_storage(saved: object, now: float | None = None) -> tuple[list[BrowserConversation], tuple[str, ...]]:
    """The conversations worth importing, and one reason for each thing left out."""
    now = time.time() if now is None else now
    if isinstance(saved, dict):
        saved = saved.get("conversations")
    if not isinstance(saved, list):
        return [], ("expected the browser's conversations: a JSON array, or an object with a \"conversations\" array",)
    rejected: list[str] = []
    if len(saved) > MAX_CONVERSATIONS:
        rejected.append(f"{len(saved) - MAX_CONVERSATIONS} conversations past the first {MAX_CONVERSATIONS} left out")
    found: list[BrowserConversation] = []
    seen: set[str] = set()
    for i, raw in enumerate(saved[:MAX_CONVERSATIONS]):
        where = f"conversation {i}"
        if not isinstance(raw, dict):
            rejected.append(f"{where}: not an object")
            continue
        client_id = raw.get("id")
        if not isinstance(client_id, str) or not CLIENT_ID.fullmatch(client_id):
            rejected.append(f"{where}: its id is not 1-64 letters, digits, '-' or '_'")
            continue
        where = f"conversation {client_id!r}"
        if client_id in seen:
            rejected.append(f"{where}: appears twice; the first one was taken")
            continue
        seen.add(client_id)
        messages = raw.get("messages")
        if not isinstance(messages, list):
            rejected.append(f"{where}: messages is not an array")
            continue
        if len(messages) > MAX_MESSAGES:
            rejected.append(f"{where}: {len(messages) - MAX_MESSAGES} messages past the first {MAX_MESSAGES} left out")
        kept = [m for j, raw_message in enumerate(messages[:MAX_MESSAGES])
                if (m := _message(raw_message, f"{where} message {j}", rejected)) is not None]
        if not kept:
            continue  # the UI's empty "New conversation": nothing to keep
        try:
            title = clean_title(raw.get("title"))
        except InvalidHistory:
            title = DEFAULT_TITLE
        model = raw.get("model")
        model = model if isinstance(model, str) and len(model) <= MAX_MODEL_CHARS else ""
        found.append(BrowserConversation(client_id=client_id, title=title, model=model,
                                         created=created_from_id(client_id, now), messages=tuple(kept)))
    return found, tuple(rejected)
