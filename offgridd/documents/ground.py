"""Answers grounded in a collection: the passages that best match a chat's last question go into its prompt, as a
system message with numbered sources, and the sources come back to be shown beside the answer."""

from __future__ import annotations

from typing import Protocol

from .records import Passage

EXCERPT_CHARS = 300
INSTRUCTIONS = ("Answer using the numbered passages below, taken from the person's own documents. Cite a passage "
                "by its number in brackets, like [1]. If the passages do not answer the question, say so.")


class Searcher(Protocol):
    async def search(self, text: str, collection: str | None = None, *, top_k: int | None = None,
                     method: str = "hybrid") -> tuple[Passage, ...]: ...


def _text(message: object) -> str:
    """A message's content, as the API parsed it: text, or None (an assistant's tool calls)."""
    content = message.get("content") if isinstance(message, dict) else None
    return content if isinstance(content, str) else ""


def question_of(messages: list[dict]) -> str:
    """What to look for: the last user message's text."""
    return next((_text(m) for m in reversed(messages) if isinstance(m, dict) and m.get("role") == "user"), "")


def context_message(passages: tuple[Passage, ...]) -> dict:
    numbered = "\n\n".join(f"[{i}] {p.filename}, page {p.page}:\n{p.text}" for i, p in enumerate(passages, start=1))
    return {"role": "system", "content": f"{INSTRUCTIONS}\n\n{numbered}"}


def source(passage: Passage) -> dict:
    excerpt = passage.text if len(passage.text) <= EXCERPT_CHARS else passage.text[:EXCERPT_CHARS - 1] + "…"
    return {"file": passage.filename, "page": passage.page, "score": round(passage.score, 6), "excerpt": excerpt,
            "document_id": passage.document_id}


async def ground(messages: list[dict], collection: str, store: Searcher,
                 top_k: int | None = None) -> tuple[list[dict], list[dict]]:
    """The chat's messages (as the API parsed them) with the collection's top passages for its last question in a
    system message, and the sources [{file, page, score, excerpt, document_id}] numbered as in that message (source n
    is [n+1]).

    The passages join the system message at the start, after the client's own system text when there is one (many
    chat templates, Gemma's among them, take a system message only first). With no question or nothing found, the
    messages come back as they were and the sources empty. Raises what the store raises (InvalidDocument for a bad
    collection name, the embedding model's errors)."""
    question = question_of(messages)
    passages = await store.search(question, collection, top_k=top_k) if question.strip() else ()
    if not passages:
        return list(messages), []
    context = context_message(passages)
    first = messages[0] if messages else None
    if isinstance(first, dict) and first.get("role") in ("system", "developer"):
        merged = {**first, "content": f"{_text(first).rstrip()}\n\n{context['content']}"}
        grounded = [merged, *messages[1:]]
    else:
        grounded = [context, *messages]
    return grounded, [source(p) for p in passages]
