"""Turning chat messages into a prompt: the model's own template when it has one, else a plain transcript."""

from __future__ import annotations

from dataclasses import dataclass

TRANSCRIPT_SYSTEM = "A conversation between a curious user and a helpful, knowledgeable assistant."
TRANSCRIPT_STOPS = ("\nUser:", "\nSystem:")
ROLE_LABELS = {"user": "User", "assistant": "Assistant"}


@dataclass(frozen=True, slots=True)
class ChatPrompt:
    text: str
    stops: tuple[str, ...]
    add_bos: bool  # False when the rendered template already starts with the BOS token


def render_transcript(messages: list[dict]) -> ChatPrompt:
    """For a base model with no chat template: a short system line, then User:/Assistant: turns."""
    system = [m["content"] for m in messages if m["role"] in ("system", "developer")]
    lines = [" ".join(system) if system else TRANSCRIPT_SYSTEM]
    for m in messages:
        if m["role"] in ROLE_LABELS:
            lines.append(f"{ROLE_LABELS[m['role']]}: {m['content'].strip()}")
    return ChatPrompt("\n".join(lines) + "\nAssistant:", TRANSCRIPT_STOPS, add_bos=True)


def render_template(template: str, bos: str, eos: str, messages: list[dict]) -> ChatPrompt:
    """Render the GGUF's own Jinja chat template, the way llama-cpp-python does for its chat formats."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    formatter = Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos, add_generation_prompt=True)
    result = formatter(messages=messages)
    stops = result.stop if isinstance(result.stop, list) else [result.stop] if result.stop else []
    return ChatPrompt(result.prompt, tuple(s for s in stops if s), add_bos=not (bos and result.prompt.startswith(bos)))
