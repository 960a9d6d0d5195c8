"""What documents are made of: a document, its pages and chunks, a passage found, and the errors a person can act on."""

from __future__ import annotations

import re
import unicodedata
from dataclasses import asdict, dataclass
from urllib.parse import unquote

KINDS = ("text", "markdown", "html", "pdf")
MAX_NAME_CHARS = 200
DEFAULT_COLLECTION = "default"
COLLECTION = re.compile(r"[A-Za-z0-9][A-Za-z0-9 _.-]{0,63}")


class DocumentError(Exception):
    """A request about documents that cannot be done; the message says why, in words for the person asking."""

    status = 400


class InvalidDocument(DocumentError, ValueError):
    """The upload is not what it claims, or holds no text to search."""


class UnsupportedDocument(DocumentError):
    status = 415


class DocumentTooLarge(DocumentError):
    status = 413


class DocumentsFull(DocumentError):
    """offgridd.db has no room for the document within its bound."""

    status = 507


class DocumentExists(DocumentError):
    status = 409


class DocumentNotFound(DocumentError, LookupError):
    status = 404


@dataclass(frozen=True, slots=True, kw_only=True)
class Page:
    number: int  # from 1, as a person cites it
    text: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Extracted:
    kind: str
    pages: tuple[Page, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class Chunk:
    page: int
    seq: int  # its place in the document, from 0
    text: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Document:
    id: int
    collection: str
    filename: str
    kind: str
    size: int  # bytes uploaded
    sha256: str
    pages: int
    chunks: int
    model: str  # the model whose embeddings its chunks carry
    added: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True, slots=True, kw_only=True)
class Passage:
    """A chunk found for a query: where it comes from (file, page) and how it ranked."""

    document_id: int
    filename: str
    page: int
    text: str
    score: float  # reciprocal rank fusion of the two rankings: higher is better
    vector_rank: int | None  # 1 for the closest; None when not among the candidates
    bm25_rank: int | None

    def to_dict(self) -> dict:
        return asdict(self)


def clean_filename(name: object) -> str:
    """A file name to show and cite: its last path part, without control characters, bounded; never a path."""
    if not isinstance(name, str):
        return "document"
    # clients percent-encode a multipart file name (aiohttp does): "..%2Fetc%2Fx" is the path "../etc/x"
    name = unquote(name).replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(ch for ch in name if unicodedata.category(ch)[0] != "C")
    name = " ".join(name.split()).strip(". ")[:MAX_NAME_CHARS]
    return name or "document"


def check_collection(name: object) -> str:
    if name is None or name == "":
        return DEFAULT_COLLECTION
    if not isinstance(name, str) or not COLLECTION.fullmatch(name):
        raise InvalidDocument("a collection's name is 1 to 64 letters, digits, spaces, '.', '_' or '-', starting with "
                              f"a letter or digit, not {str(name)[:80]!r}")
    return name
