"""What history is made of: conversations, messages, owner scopes, bounds and the errors a person can act on."""

from __future__ import annotations

import hashlib
import unicodedata
from dataclasses import asdict, dataclass
from typing import Any

ROLES = ("system", "user", "assistant", "tool", "error")
SOURCES = ("ui", "api")
MAX_TITLE_CHARS = 200
MAX_MESSAGE_CHARS = 1 << 20  # a generous bound on one message; the HTTP body limit is usually the tighter one
MAX_PAGE = 200
DEFAULT_TITLE = "New conversation"


class _Everyone:
    def __repr__(self) -> str:
        return "EVERYONE"


EVERYONE: Any = _Everyone()  # the owner scope of the admin and the local CLI: every owner's conversations
Owner = str | None  # or EVERYONE


class HistoryError(Exception):
    """A request about history that cannot be done; the message says why, in words for the person asking."""


class ConversationNotFound(HistoryError, LookupError):
    pass


class InvalidHistory(HistoryError, ValueError):
    pass


class HistoryFull(HistoryError):
    pass


@dataclass(frozen=True, slots=True, kw_only=True)
class Conversation:
    id: str
    title: str
    created: float
    updated: float
    owner: str | None
    model: str
    source: str  # "ui" | "api"
    message_count: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True, slots=True, kw_only=True)
class Message:
    id: int
    conversation_id: str
    role: str
    content: str
    created: float
    model: str = ""
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reason: str | None = None
    sources: list[dict] | None = None  # an answer grounded in documents: [{file, page, score, excerpt, document_id}]

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True, slots=True, kw_only=True)
class Transcript:
    """A conversation with its messages, oldest first."""
    conversation: Conversation
    messages: tuple[Message, ...]

    def to_dict(self) -> dict:
        return self.conversation.to_dict() | {"messages": [m.to_dict() for m in self.messages]}


@dataclass(frozen=True, slots=True, kw_only=True)
class ConversationPage:
    conversations: tuple[Conversation, ...]  # newest activity first
    total: int
    next_offset: int | None  # None on the last page

    def to_dict(self) -> dict:
        return {"conversations": [c.to_dict() for c in self.conversations], "total": self.total,
                "next_offset": self.next_offset}


def parse_page(limit: str | int | None, offset: str | int | None, default_limit: int = 50) -> tuple[int, int]:
    """A page's limit and offset from a request's query (strings or None), or InvalidHistory saying what is wrong."""
    try:
        limit_ = default_limit if limit in (None, "") else int(limit)
        offset_ = 0 if offset in (None, "") else int(offset)
    except (TypeError, ValueError):
        raise InvalidHistory("limit and offset are whole numbers") from None
    if not 1 <= limit_ <= MAX_PAGE or offset_ < 0:
        raise InvalidHistory(f"limit is from 1 to {MAX_PAGE} and offset 0 or more, not {limit_} and {offset_}")
    return limit_, offset_


def owner_clause(owner: Owner, column: str = "owner") -> tuple[str, list]:
    if owner is EVERYONE:
        return "1", []
    if owner is not None and not isinstance(owner, str):
        raise TypeError(f"owner must be a key name, None or EVERYONE, not {owner!r}")
    return f"{column} IS ?", [owner]


def check_owner(owner: object) -> None:
    """A conversation belongs to one owner: a key's name, or None (no keys). Not EVERYONE, not ""."""
    if owner is not None and (not isinstance(owner, str) or not owner):
        raise InvalidHistory("a conversation belongs to one owner: an API key's name, or none")


def scope_token(owner: str | None) -> str:
    """The one FTS5 token standing for an owner in the messages index: digits after "k", which no tokenizer splits."""
    if owner is None:
        return "k"
    return "k" + str(int.from_bytes(hashlib.sha256(owner.encode("utf-8", "surrogatepass")).digest()[:8], "big"))


def clean_title(title: str) -> str:
    if not isinstance(title, str):
        raise InvalidHistory("a title is text")
    # control, format (bidi overrides, zero-width) and private-use characters would reach terminals and snippets
    title = "".join(ch for ch in title if unicodedata.category(ch)[0] != "C" or ch.isspace())
    title = " ".join(title.split())[:MAX_TITLE_CHARS]
    if not title:
        raise InvalidHistory("a title needs at least one visible character")
    return title


def check_message(role: str, content: str) -> None:
    if role not in ROLES:
        raise InvalidHistory(f"a message's role is one of {', '.join(ROLES)}, not {role!r}")
    if not isinstance(content, str):
        raise InvalidHistory("a message's content is text")
    if len(content) > MAX_MESSAGE_CHARS:
        raise InvalidHistory(f"a message holds at most {MAX_MESSAGE_CHARS} characters, this one {len(content)}")


@dataclass(frozen=True, slots=True, kw_only=True)
class ImportReport:
    imported: dict[str, str]  # the browser's id -> the new conversation's id
    already: dict[str, str]  # imported before: the browser's id -> that conversation's id
    rejected: tuple[str, ...]  # one reason per conversation or message left out

    def to_dict(self) -> dict:
        return asdict(self)
