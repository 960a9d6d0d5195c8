"""Structured output and tool calls between OpenAI's shapes and the worker's grammars (docs/structured-output.md).

Requests: `response_format` / `text.format` and `tools` / `tool_choice` become a GBNF grammar for `params["grammar"]`
(offgridd.inference.grammar builds it; a schema it cannot guarantee is a 400 naming the part). Replies: `ReplyReader`
reads one choice's text as it comes and tells plain content from tool calls, so the chat, Responses, streamed and
whole answers all cut the calls out of the text the same way.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from ..inference.grammar import (
    TOOL_MARKER,
    GrammarError,
    grammar_for_json_object,
    grammar_for_schema,
    grammar_for_tools,
)
from ..web import ApiError

MAX_TOOLS = 128
CHOICES = ("auto", "none", "required")


@dataclass(frozen=True, slots=True, kw_only=True)
class ToolUse:
    """The tools a request may call, in the chat shape the worker's prompt takes, and how it may call them."""

    tools: list[dict]
    choice: str  # "auto", "required" or a function's name
    parallel: bool


def refused(e: GrammarError, prefix: str) -> ApiError:
    """A grammar the request asked for that cannot be made: a 400 naming the part, the parameter then the JSON
    pointer inside it ("response_format.json_schema.schema/properties/age/minimum")."""
    where = prefix + e.path.removeprefix("#")
    return ApiError(400, f"{e.message} (at {where}); this server refuses what its grammar cannot guarantee rather "
                    "than ignore it", param=where)


def format_grammar(fmt: object, param: str, flat: bool = False) -> str | None:
    """The grammar for a response format: None for text, else json_object's or json_schema's grammar. `flat`: the
    Responses API's `text.format`, whose json_schema holds `schema` itself rather than in `json_schema`."""
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
        raise ApiError(400, f"'{param}' must be {{'type': 'text' | 'json_object' | 'json_schema', ...}}", param=param)
    if fmt["type"] == "text":
        return None
    if fmt["type"] == "json_object":
        return grammar_for_json_object()
    envelope = fmt if flat else fmt.get("json_schema")
    where = param if flat else f"{param}.json_schema"
    if not isinstance(envelope, dict) or not isinstance(envelope.get("schema"), dict):
        raise ApiError(400, f"'{where}' needs a 'schema' object", param=f"{where}.schema")
    try:
        return grammar_for_schema(envelope["schema"])
    except GrammarError as e:
        raise refused(e, f"{where}.schema") from None


def tool_use(tools: object, choice: object, parallel: object, *, flat: bool = False
             ) -> tuple[ToolUse | None, str | None]:
    """Chat-shaped `tools`, `tool_choice` and `parallel_tool_calls` checked: (the use, its grammar), or (None, None)
    when no tool may be called. `flat`: errors name the Responses API's places (`tools[0].parameters`)."""
    param = "tools"
    if parallel is not None and not isinstance(parallel, bool):
        raise ApiError(400, "'parallel_tool_calls' must be a boolean", param="parallel_tool_calls")
    if tools is None or tools == []:
        if choice not in (None, "none", "auto"):
            raise ApiError(400, "'tool_choice' needs 'tools'", param="tool_choice")
        return None, None
    if not isinstance(tools, list) or len(tools) > MAX_TOOLS:
        raise ApiError(400, f"'{param}' must be a list of at most {MAX_TOOLS} tools", param=param)
    names = set()
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(function, dict):
            raise ApiError(400, f"{param}[{i}] must be {{'type': 'function', 'function': {{...}}}}: only function "
                           "tools run on this server", param=f"{param}[{i}]")
        name = function.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
            raise ApiError(400, f"{param}[{i}].function.name must be 1-64 letters, digits, '_', '.' or '-'",
                           param=f"{param}[{i}].function.name")
        if name in names:
            raise ApiError(400, f"two tools are named {name!r}", param=f"{param}[{i}].function.name")
        names.add(name)
    if choice is None:
        choice = "auto"
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name") if choice.get("type") == "function" else None
        if not isinstance(name, str) or name not in names:
            raise ApiError(400, "'tool_choice' must be 'auto', 'none', 'required' or {'type': 'function', "
                           "'function': {'name': <one of the tools>}}", param="tool_choice")
        choice = name
    elif choice not in CHOICES:
        raise ApiError(400, f"'tool_choice' must be one of {', '.join(CHOICES)} or name a function",
                       param="tool_choice")
    if choice == "none":
        return None, None
    # One call a reply unless the client asks for several: OpenAI's default allows a list, but given a list grammar
    # the 270M model repeats its call until the list's bound (8 calls, 120 tokens, measured), where one was meant.
    use = ToolUse(tools=tools, choice=choice, parallel=parallel is True)
    try:
        return use, grammar_for_tools(tools, choice, parallel=use.parallel)
    except GrammarError as e:
        m = re.match(r"#/tools/(\d+)/function/parameters(.*)", e.path)
        if m is None:
            raise ApiError(400, e.message, param=e.path.removeprefix("#/")) from None
        where = f"tools[{m.group(1)}].parameters" if flat else f"tools[{m.group(1)}].function.parameters"
        raise refused(GrammarError(e.message, "#" + m.group(2)), where) from None


def call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"arguments"\s*:')
_SPACE = " \t\n\r"


@dataclass(slots=True)
class Call:
    id: str
    name: str
    arguments: str = ""  # the JSON text the model wrote, as OpenAI hands it on: a string


class ReplyReader:
    """One choice's text, read as it comes: content, or tool calls as `{"name", "arguments"}` envelopes (a list of
    them when parallel; after TOOL_MARKER with tool_choice "auto"). `feed` answers what can be said so far:
    ("content", text), ("call", index, Call) when a call's name is known, ("arguments", index, text) as they come."""

    def __init__(self, use: ToolUse | None):
        self.use = use
        self.text: list[str] = []
        self.calls: list[Call] = []
        self._buf = ""
        self._state = "decide" if use is not None and use.choice == "auto" else "open" if use else "content"
        self._depth, self._in_string, self._escaped, self._started = 0, False, False, False

    @property
    def calling(self) -> bool:
        return self._state not in ("decide", "content")

    def feed(self, text: str) -> list[tuple]:
        self.text.append(text)
        if self._state == "content":
            return [("content", text)] if text else []
        self._buf += text
        events: list[tuple] = []
        while self._step(events):
            pass
        return events

    def finish(self) -> list[tuple]:
        """At the end: a reply still deciding was plain text after all."""
        if self._state == "decide" and self._buf:
            self._state, buf, self._buf = "content", self._buf, ""
            return [("content", buf)]
        return []

    @property
    def complete(self) -> bool:
        """The calls were written whole (a reply cut by max_tokens or a stop string is not)."""
        return self._state == "done"

    def _step(self, events: list[tuple]) -> bool:
        buf, state = self._buf, self._state
        if state == "decide":
            if buf.startswith(TOOL_MARKER):
                self._buf, self._state = buf[len(TOOL_MARKER):], "open"
                return True
            if TOOL_MARKER.startswith(buf):
                return False
            self._state, self._buf = "content", ""
            events.append(("content", buf))
            return False
        if state == "open":
            stripped = buf.lstrip(_SPACE)
            if not stripped:
                return False
            if self.use.parallel:
                if stripped[0] != "[":
                    self._state = "broken"
                    return False
                stripped = stripped[1:]
            self._buf, self._state = stripped, "head"
            return True
        if state == "head":
            m = _HEAD.match(buf)
            if m is None:
                if buf.lstrip(_SPACE)[:1] not in ("", "{"):
                    self._state = "broken"
                return False
            call = Call(call_id(), json.loads(m.group(1)))
            self.calls.append(call)
            events.append(("call", len(self.calls) - 1, call))
            self._buf, self._state = buf[m.end():], "value"
            self._depth, self._in_string, self._escaped, self._started = 0, False, False, False
            return True
        if state == "value":
            end = self._scan_value(buf)
            taken = buf[:end].lstrip(_SPACE) if not self.calls[-1].arguments else buf[:end]
            if taken:
                self.calls[-1].arguments += taken
                events.append(("arguments", len(self.calls) - 1, taken))
            self._buf = buf[end:]
            if self._state == "value":
                return False
            return True
        if state == "close":
            stripped = buf.lstrip(_SPACE)
            if not stripped:
                return False
            if stripped[0] != "}":
                self._state = "broken"
                return False
            self._buf, self._state = stripped[1:], "next" if self.use.parallel else "done"
            return True
        if state == "next":
            stripped = buf.lstrip(_SPACE)
            if not stripped:
                return False
            self._buf, self._state = stripped[1:], {",": "head", "]": "done"}.get(stripped[0], "broken")
            return self._state != "broken"
        return False  # done or broken: what follows is not read

    def _scan_value(self, buf: str) -> int:
        """How much of buf belongs to the arguments value; sets the state to "close" where it ends."""
        for i, c in enumerate(buf):
            if not self._started:
                if c in _SPACE:
                    continue
                self._started = True
                if c in "{[":
                    self._depth = 1
                elif c == '"':
                    self._in_string = True
                continue
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif c == "\\":
                    self._escaped = True
                elif c == '"':
                    self._in_string = False
                    if self._depth == 0:
                        self._state = "close"
                        return i + 1
                continue
            if self._depth == 0:  # a bare number, true, false or null ends where the envelope goes on
                if c in _SPACE or c in ",}]":
                    self._state = "close"
                    return i
                continue
            if c == '"':
                self._in_string = True
            elif c in "{[":
                self._depth += 1
            elif c in "}]":
                self._depth -= 1
                if self._depth == 0:
                    self._state = "close"
                    return i + 1
        return len(buf)


def settle(use: ToolUse | None, text: str, reason: str) -> tuple[list[Call] | None, str]:
    """A whole choice: its calls and "tool_calls" when it called tools and wrote the calls whole, else (None,
    reason) and the text is the answer (a call cut by max_tokens is answered as the text it got to)."""
    if use is None or reason != "stop":
        return None, reason
    reader = ReplyReader(use)
    reader.feed(text)
    return (reader.calls, "tool_calls") if reader.calls and reader.complete else (None, reason)
