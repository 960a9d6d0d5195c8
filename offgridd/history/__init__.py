"""Conversation history on the box: stored in offgridd.db, searched with FTS5, exported, bounded on the card."""

from .browser import parse_browser_storage
from .export import filename, render_export, to_json, to_markdown
from .records import (
    EVERYONE,
    Conversation,
    ConversationNotFound,
    ConversationPage,
    HistoryError,
    HistoryFull,
    ImportReport,
    InvalidHistory,
    Message,
    Owner,
    Transcript,
    parse_page,
)
from .search import SearchHit, fts_query
from .store import ConversationStore, vacuum_periodically
from .upkeep import DatabaseSize, VacuumResult

__all__ = [
    "EVERYONE", "Conversation", "ConversationNotFound", "ConversationPage", "ConversationStore", "DatabaseSize",
    "HistoryError", "HistoryFull", "ImportReport", "InvalidHistory", "Message", "Owner", "SearchHit", "Transcript",
    "VacuumResult", "filename", "fts_query", "parse_browser_storage", "parse_page", "render_export", "to_json",
    "to_markdown", "vacuum_periodically",
]
