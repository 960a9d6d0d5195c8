"""A conversation written out for a person to keep: JSON (readable back by a program) and Markdown (by a person)."""

from __future__ import annotations

import json
import time

from .records import InvalidHistory, Message, Transcript

JSON_FORMAT = "offgridd.conversation"
JSON_VERSION = 1
CONTENT_TYPES = {"json": "application/json", "md": "text/markdown; charset=utf-8"}
SPEAKERS = {"user": "You", "assistant": "Model", "system": "System", "tool": "Tool", "error": "Error"}


def to_json(transcript: Transcript) -> dict:
    """A JSON-ready dict: {"format", "version", the conversation's fields, "messages": [...]}, oldest message first."""
    return {"format": JSON_FORMAT, "version": JSON_VERSION} | transcript.to_dict()


def _when(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(seconds))


def _speaker(message: Message) -> str:
    name = SPEAKERS.get(message.role, message.role)
    return f"{name} ({message.model})" if message.role == "assistant" and message.model else name


def to_markdown(transcript: Transcript) -> str:
    """A heading per message; contents as they were written, since they are Markdown already more often than not."""
    c = transcript.conversation
    about = [f"started {_when(c.created)}", f"last message {_when(c.updated)}"]
    if c.model:
        about.append(f"model {c.model}")
    about.append(f"{len(transcript.messages)} messages")
    lines = [f"# {c.title}", "", "_" + " · ".join(about) + "_", ""]
    for m in transcript.messages:
        lines += [f"## {_speaker(m)}", "", m.content.rstrip("\n"), ""]
        if m.sources:  # an answer grounded in the box's documents, numbered as it cites them
            lines += [f"{i}. {s.get('file')}, page {s.get('page')}" for i, s in enumerate(m.sources, start=1)] + [""]
    return "\n".join(lines)


def filename(transcript: Transcript, extension: str) -> str:
    """A safe file name for a download: the title's letters and digits, then the id's start."""
    c = transcript.conversation
    words = "".join(ch if ch.isascii() and ch.isalnum() else " " for ch in c.title).split()
    stem = "-".join(words)[:60] or "conversation"
    return f"{stem}-{c.id[:8]}.{extension}"


def render_export(transcript: Transcript, fmt: str) -> tuple[bytes, str, str]:
    """A download: (body, content type, file name) for `fmt` "json" or "md" ("markdown" too)."""
    fmt = {"markdown": "md"}.get(fmt, fmt)
    if fmt not in CONTENT_TYPES:
        raise InvalidHistory(f"export formats are json and md, not {str(fmt)[:20]!r}")
    if fmt == "json":
        body = json.dumps(to_json(transcript), ensure_ascii=False, indent=1).encode()
    else:
        body = to_markdown(transcript).encode("utf-8", "surrogatepass")
    return body, CONTENT_TYPES[fmt], filename(transcript, fmt)
