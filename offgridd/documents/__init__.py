"""Documents on the box: uploads of text, Markdown, HTML and PDF, chunked and embedded by a model the box runs,
searched by meaning and by words (hybrid), and the passages put into a chat's prompt with their sources."""

from .extract import extract
from .ground import ground
from .records import (
    KINDS,
    Document,
    DocumentError,
    DocumentExists,
    DocumentNotFound,
    DocumentsFull,
    DocumentTooLarge,
    InvalidDocument,
    Passage,
    UnsupportedDocument,
)
from .store import DocumentStore, Embed, Limits

__all__ = [
    "KINDS", "Document", "DocumentError", "DocumentExists", "DocumentNotFound", "DocumentStore", "DocumentsFull",
    "DocumentTooLarge",
    "Embed", "InvalidDocument", "Limits", "Passage", "UnsupportedDocument", "extract", "ground",
]
