"""Turning chat messages into a prompt: the model's own template when it has one, else a plain transcript.

Tools: a template that knows tools (it reads `tools`, `tool_calls` or a "tool" role, as Hugging Face's tool-use
templates do) gets the tools and the messages as they are. Any other template, Gemma 3's among them, and the plain
transcript get a fallback (docs/structured-output.md): the tools described after the system text, an assistant's
calls written as TOOL_MARKER and the calls' JSON (the form grammar_for_tools makes the model write), each tool result
as a user turn starting "Tool result (<name>, call <id>):", and consecutive turns of one role merged, since Gemma's
template refuses roles that do not alternate.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from .grammar import TOOL_MARKER

TRANSCRIPT_SYSTEM = "A conversation between a curious user and a helpful, knowledgeable assistant."
TRANSCRIPT_STOPS = ("\nUser:", "\nSystem:")
ROLE_LABELS = {"user": "User", "assistant": "Assistant"}
TOOL_AWARE = re.compile(r"tool_calls|\btools\b|['\"]tool['\"]")


@dataclass(frozen=True, slots=True)
class ChatPrompt:
    text: str
    stops: tuple[str, ...]
    add_bos: bool  # False when the rendered template already starts with the BOS token


def render_transcript(messages: list[dict], tools: list[dict] | None = None) -> ChatPrompt:
    """For a base model with no chat template: a short system line, then User:/Assistant: turns."""
    messages = tool_fallback(messages, tools)
    system = [_text(m.get("content")) for m in messages if m["role"] in ("system", "developer")]
    lines = [" ".join(system) if system else TRANSCRIPT_SYSTEM]
    for m in messages:
        if m["role"] in ROLE_LABELS:
            lines.append(f"{ROLE_LABELS[m['role']]}: {_text(m.get('content')).strip()}")
    return ChatPrompt("\n".join(lines) + "\nAssistant:", TRANSCRIPT_STOPS, add_bos=True)


def render_template(template: str, bos: str, eos: str, messages: list[dict],
                    tools: list[dict] | None = None) -> ChatPrompt:
    """Render the GGUF's own Jinja chat template, the way llama-cpp-python does for its chat formats."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    formatter = Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos, add_generation_prompt=True)
    if TOOL_AWARE.search(template):
        result = formatter(messages=messages, tools=tools or None)
    else:
        result = formatter(messages=tool_fallback(messages, tools))
    stops = result.stop if isinstance(result.stop, list) else [result.stop] if result.stop else []
    return ChatPrompt(result.prompt, tuple(s for s in stops if s), add_bos=not (bos and result.prompt.startswith(bos)))


def tool_fallback(messages: list[dict], tools: list[dict] | None) -> list[dict]:
    """Messages with tools, tool calls and tool results spelled as system, assistant and user text."""
    if not tools and not any(m.get("role") == "tool" or m.get("tool_calls") for m in messages):
        return messages
    names = {call.get("id"): (call.get("function") or {}).get("name")
             for m in messages for call in m.get("tool_calls") or ()}
    out: list[dict] = []
    for m in messages:
        role, content = m["role"], _text(m.get("content"))
        if role == "tool":
            label = ", ".join(x for x in (names.get(m.get("tool_call_id")) or m.get("name"),
                                          f"call {m['tool_call_id']}" if m.get("tool_call_id") else None) if x)
            role, content = "user", f"Tool result ({label}):\n{content}" if label else f"Tool result:\n{content}"
        elif m.get("tool_calls"):
            calls = [_call(c) for c in m["tool_calls"]]
            written = json.dumps(calls[0] if len(calls) == 1 else calls, ensure_ascii=False)
            content = f"{content}\n{TOOL_MARKER}{written}" if content.strip() else f"{TOOL_MARKER}{written}"
        if out and out[-1]["role"] == role and role != "system":
            out[-1] = {"role": role, "content": f"{out[-1]['content']}\n\n{content}"}
        else:
            out.append({"role": role, "content": content})
    if tools:
        described = describe_tools(tools)
        if out and out[0]["role"] in ("system", "developer"):
            out[0] = {"role": out[0]["role"], "content": f"{out[0]['content']}\n\n{described}"}
        else:
            out.insert(0, {"role": "system", "content": described})
    return out


def describe_tools(tools: list[dict]) -> str:
    """The tools in words and JSON, and how to call one, for a model whose template has no place for them."""
    lines = [f"You can call these tools. To call one, reply with {TOOL_MARKER} followed by a JSON object "
             '{"name": <tool name>, "arguments": {...}}.']
    for tool in tools:
        function = tool.get("function") or {}
        lines.append(f"- {function.get('name')}: {function.get('description') or ''}".rstrip(": ")
                     + f" Arguments: {json.dumps(function.get('parameters') or {}, ensure_ascii=False)}")
    return "\n".join(lines)


def _call(call: dict) -> dict:
    function = call.get("function") or {}
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            pass  # kept as the client sent it
    return {"name": function.get("name"), "arguments": arguments if arguments is not None else {}}


def _text(content) -> str:
    """A message's text: OpenAI allows a string, null, or a list of parts."""
    if content is None:
        return ""
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return str(content)
