"""Text out of an upload, page by page: plain text and Markdown as they are, HTML through the standard library's
parser (scripts, styles and markup dropped), PDF through pypdf.

An upload is hostile input. Its kind is decided by its name and checked against its bytes (a ".pdf" must start like
a PDF; text must be UTF-8 without NUL bytes); pages are bounded (MAX_PAGES) and so is the text kept of each
(MAX_PAGE_CHARS); an upload with no text at all is refused, since nothing in it could ever be found.
"""

from __future__ import annotations

import io
import logging
from html.parser import HTMLParser

from .records import Extracted, InvalidDocument, Page, UnsupportedDocument

log = logging.getLogger(__name__)

MAX_PAGES = 5_000
MAX_PAGE_CHARS = 200_000  # a page of a dense manual is about 5,000
SUFFIXES = {".txt": "text", ".text": "text", ".md": "markdown", ".markdown": "markdown", ".html": "html",
            ".htm": "html", ".xhtml": "html", ".pdf": "pdf"}
SKIPPED_TAGS = {"script", "style", "template", "noscript", "head", "svg", "math", "iframe", "object"}
BLOCK_TAGS = {"p", "div", "br", "li", "ul", "ol", "tr", "td", "th", "table", "section", "article", "header", "footer",
              "h1", "h2", "h3", "h4", "h5", "h6", "pre", "blockquote", "hr", "dt", "dd", "title", "main", "nav"}
VOID_TAGS = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


def kind_of(filename: str, data: bytes) -> str:
    """The kind of an upload, from its name, checked against its first bytes."""
    suffix = "." + filename.rsplit(".", 1)[-1].lower() if "." in filename else ""
    kind = SUFFIXES.get(suffix)
    head = data[:1024].lstrip()
    if kind is None:
        if head.startswith(b"%PDF-"):
            kind = "pdf"
        elif head[:15].lower().startswith((b"<!doctype html", b"<html")):
            kind = "html"
        elif suffix:
            raise UnsupportedDocument(f"{filename!r}: this box reads text (.txt), Markdown (.md), HTML (.html) and PDF "
                                      f"(.pdf), not {suffix!r} files")
        else:
            kind = "text"
    if kind == "pdf" and not data[:1024].lstrip(b"\x00\t\n\r ").startswith(b"%PDF-"):
        raise InvalidDocument(f"{filename!r} is named as a PDF but is not one (a PDF starts with '%PDF-')")
    return kind


def _text(filename: str, data: bytes) -> str:
    if b"\x00" in data:
        raise InvalidDocument(f"{filename!r} holds binary data (NUL bytes), not text")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise InvalidDocument(f"{filename!r} is not UTF-8 text (byte {e.start} is not): save it as UTF-8") from None


def _clean(text: str) -> str:
    """Lines without their trailing spaces, at most one blank line in a row, no control characters but newlines."""
    text = "".join(ch if ch in "\n\t" or ch >= " " and ch != "\x7f" else " " for ch in text[:MAX_PAGE_CHARS])
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    out: list[str] = []
    for line in lines:
        if line or (out and out[-1]):
            out.append(line)
    return "\n".join(out).strip()


class _HtmlText(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skipping: list[str] = []  # open tags whose content is not text a person reads

    def handle_starttag(self, tag: str, attrs) -> None:
        if tag == "body" and "head" in self.skipping:  # </head> is optional in HTML
            del self.skipping[self.skipping.index("head"):]
        if tag in SKIPPED_TAGS and tag not in VOID_TAGS:
            self.skipping.append(tag)
        if tag in BLOCK_TAGS:
            self.parts.append("\n")

    def handle_startendtag(self, tag: str, attrs) -> None:
        if tag in BLOCK_TAGS:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self.skipping:
            while self.skipping and self.skipping.pop() != tag:
                pass
        if tag in BLOCK_TAGS:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self.skipping:
            self.parts.append(data)


def html_text(source: str) -> str:
    parser = _HtmlText()
    parser.feed(source)
    parser.close()
    return "".join(parser.parts)


def _pdf_pages(filename: str, data: bytes) -> list[str]:
    from pypdf import PdfReader  # imported here: only an upload of a PDF pays for it

    try:
        reader = PdfReader(io.BytesIO(data), strict=False)
        if reader.is_encrypted and not reader.decrypt(""):
            raise InvalidDocument(f"{filename!r} is a PDF locked with a password: upload an unlocked copy")
        count = len(reader.pages)
    except InvalidDocument:
        raise
    except Exception as e:  # pypdf raises many kinds on a damaged file; each means the same to the person
        raise InvalidDocument(f"{filename!r} could not be read as a PDF ({type(e).__name__}: {str(e)[:200]})") from None
    if count > MAX_PAGES:
        raise InvalidDocument(f"{filename!r} has {count} pages; this box reads PDFs of at most {MAX_PAGES}")
    pages = []
    for i in range(count):
        try:
            pages.append(reader.pages[i].extract_text() or "")
        except Exception as e:  # one damaged page costs that page, not the document
            log.warning("%s: page %d could not be read: %s", filename, i + 1, e)
            pages.append("")
    return pages


def extract(filename: str, data: bytes) -> Extracted:
    """The pages of an upload as text; raises InvalidDocument or UnsupportedDocument with the reason."""
    if not data:
        raise InvalidDocument(f"{filename!r} is empty")
    kind = kind_of(filename, data)
    if kind == "pdf":
        raw = _pdf_pages(filename, data)
    elif kind == "html":
        raw = [html_text(_text(filename, data))]
    else:
        raw = _text(filename, data).split("\f")  # a form feed is a page break, as `pr` and many manuals use it
        if len(raw) > MAX_PAGES:
            raise InvalidDocument(f"{filename!r} has {len(raw)} pages (form feeds); at most {MAX_PAGES}")
    pages = tuple(Page(number=i, text=_clean(text)) for i, text in enumerate(raw, start=1))
    if not any(p.text for p in pages):
        hint = " (a scanned PDF holds pictures of text; this box does not read those)" if kind == "pdf" else ""
        raise InvalidDocument(f"{filename!r} holds no text to search{hint}")
    return Extracted(kind=kind, pages=pages)
