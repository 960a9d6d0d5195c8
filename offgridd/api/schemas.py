"""Validation of OpenAI request bodies: a clear 400 naming the parameter, or plain data for the worker."""

from __future__ import annotations

from dataclasses import dataclass

from ..web import ApiError
from .tools import ToolUse, format_grammar, tool_use

MAX_STOPS = 8
MAX_MESSAGES = 1024
MAX_PARTS = 64  # text parts in one message's content
MAX_CHOICES = 8  # OpenAI's n: choices decoded together as sequences of one prompt
MAX_EMBED_INPUTS = 256
ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_TOP_LOGPROBS = 20
MAX_CALLS = 64  # tool calls in one assistant message of the history


@dataclass(frozen=True, slots=True, kw_only=True)
class GenerationRequest:
    model: str | None
    prompt: str | None
    messages: list[dict] | None
    params: dict
    stream: bool
    include_usage: bool
    tools: ToolUse | None = None  # tools the reply may call (None: plain text)


def _number(body: dict, key: str, lo: float, hi: float, integer: bool = False) -> float | int | None:
    value = body.get(key)
    if value is None:
        return None
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not lo <= value <= hi:
        kind = "an integer" if integer else "a number"
        raise ApiError(400, f"'{key}' must be {kind} between {lo} and {hi}, got {value!r}", param=key)
    return value


def _model(body: dict) -> str | None:
    model = body.get("model")
    if model is not None and (not isinstance(model, str) or not model):
        raise ApiError(400, "'model' must be a non-empty string", param="model")
    return model


def unicode(text: str, param: str) -> str:
    """Text that can be encoded: JSON's \\ud800 escapes can make a lone surrogate, which is no character."""
    if not text.isascii():
        try:
            text.encode()
        except UnicodeEncodeError:
            raise ApiError(400, f"'{param}' holds a lone surrogate (\\ud800-\\udfff), which is not text",
                           param=param) from None
    return text


def _text(value: object, param: str) -> str:
    """Message content: a string, or a list of text parts."""
    if isinstance(value, str):
        return unicode(value, param)
    if isinstance(value, list) and len(value) <= MAX_PARTS and all(isinstance(p, dict) for p in value):
        if any(p.get("type") != "text" or not isinstance(p.get("text"), str) for p in value):
            raise ApiError(400, f"'{param}' may only hold text parts on this server", param=param)
        return unicode("".join(p["text"] for p in value), param)
    raise ApiError(400, f"'{param}' must be a string or a list of at most {MAX_PARTS} text parts", param=param)


def generation_request(body: dict, prompt: str | None, messages: list[dict] | None, *, logprobs: int | None = None,
            tools: ToolUse | None = None, grammar: str | None = None) -> GenerationRequest:
    if grammar is None:
        grammar = format_grammar(body.get("response_format"), "response_format")
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (not isinstance(stop, list) or len(stop) > MAX_STOPS
                             or not all(isinstance(s, str) and s for s in stop)):
        raise ApiError(400, f"'stop' must be a string or a list of at most {MAX_STOPS} non-empty strings",
                       param="stop")
    for stop_string in stop or ():
        unicode(stop_string, "stop")
    max_tokens = _number(body, "max_tokens", 1, 1 << 20, integer=True)
    if max_tokens is None:
        max_tokens = _number(body, "max_completion_tokens", 1, 1 << 20, integer=True)
    params = {
        "max_tokens": max_tokens,
        "temperature": _number(body, "temperature", 0, 2),
        "top_p": _number(body, "top_p", 0, 1),
        "top_k": _number(body, "top_k", 0, 1 << 16, integer=True),
        "min_p": _number(body, "min_p", 0, 1),
        "repeat_penalty": _number(body, "repeat_penalty", 0, 10),
        "presence_penalty": _number(body, "presence_penalty", -2, 2),
        "frequency_penalty": _number(body, "frequency_penalty", -2, 2),
        "seed": _number(body, "seed", -(1 << 63), (1 << 64) - 1, integer=True),
        "n": _number(body, "n", 1, MAX_CHOICES, integer=True),
        "stop": stop,
        "grammar": grammar,
        "logprobs": logprobs,
        "tools": tools.tools if tools is not None else None,
    }
    if params["seed"] is not None:
        params["seed"] %= 1 << 32
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be a boolean", param="stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise ApiError(400, "'stream_options' must be an object like {'include_usage': true}", param="stream_options")
    return GenerationRequest(model=_model(body), prompt=prompt, messages=messages,
                             params={k: v for k, v in params.items() if v is not None}, stream=stream,
                             include_usage=bool(options.get("include_usage")), tools=tools)


def parse_chat(body: dict) -> GenerationRequest:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or len(messages) > MAX_MESSAGES:
        raise ApiError(400, f"'messages' must be a list of 1 to {MAX_MESSAGES} messages", param="messages")
    clean = [_message(m, i) for i, m in enumerate(messages)]
    for key in ("functions", "function_call"):
        if body.get(key) is not None:
            raise ApiError(400, f"'{key}' is deprecated by OpenAI and not served here: send 'tools' (and "
                           "'tool_choice') instead", param=key)
    use, grammar = tool_use(body.get("tools"), body.get("tool_choice"), body.get("parallel_tool_calls"))
    if grammar is not None and body.get("response_format") not in (None, {"type": "text"}):
        raise ApiError(400, "'response_format' together with callable tools is not supported here: send one, or "
                       "tool_choice 'none'", param="response_format")
    logprobs = body.get("logprobs")
    if logprobs not in (None, True, False):
        raise ApiError(400, "'logprobs' must be a boolean (and 'top_logprobs' the alternatives per token)",
                       param="logprobs")
    top = _number(body, "top_logprobs", 0, MAX_TOP_LOGPROBS, integer=True)
    if top is not None and not logprobs:
        raise ApiError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    return generation_request(body, None, clean, logprobs=(top or 0) if logprobs else None, tools=use, grammar=grammar)


def _message(m: object, i: int) -> dict:
    """One chat message as the worker takes it: text content, and an assistant's calls or a tool's result."""
    if not isinstance(m, dict) or m.get("role") not in ROLES:
        raise ApiError(400, f"messages[{i}] must be an object with a role among {', '.join(ROLES)}",
                       param=f"messages[{i}].role")
    role = "system" if m["role"] == "developer" else m["role"]
    out = {"role": role,
           "content": _text(m.get("content") if m.get("content") is not None else "", f"messages[{i}].content")}
    if role == "tool":
        if not isinstance(m.get("tool_call_id"), str) or not m["tool_call_id"]:
            raise ApiError(400, f"messages[{i}] (a tool result) needs the 'tool_call_id' it answers",
                           param=f"messages[{i}].tool_call_id")
        out["tool_call_id"] = unicode(m["tool_call_id"], f"messages[{i}].tool_call_id")
    if isinstance(m.get("name"), str) and m["name"]:
        out["name"] = unicode(m["name"], f"messages[{i}].name")
    if m.get("tool_calls") is not None:
        if role != "assistant":
            raise ApiError(400, f"messages[{i}]: only assistant messages hold tool_calls",
                           param=f"messages[{i}].tool_calls")
        out["tool_calls"] = [_call(c, f"messages[{i}].tool_calls[{j}]") for j, c in enumerate(
            m["tool_calls"] if isinstance(m["tool_calls"], list) and len(m["tool_calls"]) <= MAX_CALLS else [None])]
    return out


def _call(call: object, param: str) -> dict:
    function = call.get("function") if isinstance(call, dict) else None
    if (not isinstance(function, dict) or not isinstance(function.get("name"), str)
            or not isinstance(function.get("arguments", "{}"), str) or not isinstance(call.get("id", ""), str)):
        raise ApiError(400, f"'{param}' must be {{'id', 'type': 'function', 'function': {{'name', 'arguments': "
                       "<JSON text>}}}}", param=param)
    return {"id": unicode(call.get("id") or "", param), "type": "function",
            "function": {"name": unicode(function["name"], param),
                         "arguments": unicode(function.get("arguments", "{}"), param)}}


def parse_completion(body: dict) -> GenerationRequest:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise ApiError(400, "'prompt' must be a string (or a list holding one string)", param="prompt")
    unicode(prompt, "prompt")
    if body.get("echo"):
        raise ApiError(400, "echo is not supported by this server", param="echo")
    for key in ("tools", "functions"):
        if body.get(key):
            raise ApiError(400, f"'{key}' belong in /v1/chat/completions or /v1/responses", param=key)
    logprobs = body.get("logprobs")
    if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, int)
                                 or not 0 <= logprobs <= MAX_TOP_LOGPROBS):
        raise ApiError(400, f"'logprobs' must be an integer between 0 and {MAX_TOP_LOGPROBS} (the alternatives "
                       "per token)", param="logprobs")
    return generation_request(body, prompt, None, logprobs=logprobs)


def parse_embeddings(body: dict) -> tuple[str | None, list[str], bool]:
    value = body.get("input")
    inputs = [value] if isinstance(value, str) else value
    if not isinstance(inputs, list) or not inputs or not all(isinstance(s, str) and s for s in inputs):
        raise ApiError(400, "'input' must be a non-empty string or a list of non-empty strings", param="input")
    if len(inputs) > MAX_EMBED_INPUTS:
        raise ApiError(400, f"'input' may hold at most {MAX_EMBED_INPUTS} strings", param="input")
    for text in inputs:
        unicode(text, "input")
    if body.get("encoding_format") not in (None, "float", "base64"):
        raise ApiError(400, "'encoding_format' must be 'float' or 'base64'", param="encoding_format")
    return _model(body), inputs, body.get("encoding_format") == "base64"
