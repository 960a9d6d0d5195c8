"""Pages into overlapping chunks of words, each within one page so that a passage cites the page it came from."""

from __future__ import annotations

from collections.abc import Iterable

from .records import Chunk, Page

MAX_WORD_CHARS = 32  # a longer "word" (a URL, a hash, a hostile run of letters) is cut, so a chunk stays embeddable


def chunk_pages(pages: Iterable[Page], *, words: int, overlap: int) -> list[Chunk]:
    """Windows of `words` words, each starting `words - overlap` after the one before; a page shorter than a window is
    one chunk, and a page's last window ends at its last word (overlapping more), so no chunk is a scrap. Whitespace
    becomes single spaces: the text is for search and prompts, not layout."""
    if words < 1 or not 0 <= overlap < words:
        raise ValueError(f"chunks of {words} words cannot overlap by {overlap}")
    step = words - overlap
    out: list[Chunk] = []
    for page in pages:
        tokens = [w[i:i + MAX_WORD_CHARS] for w in page.text.split() for i in range(0, len(w), MAX_WORD_CHARS)]
        start = 0
        while start < len(tokens):
            start = max(0, min(start, len(tokens) - words))
            out.append(Chunk(page=page.number, seq=len(out), text=" ".join(tokens[start:start + words])))
            if start + words >= len(tokens):
                break
            start += step
    return out
