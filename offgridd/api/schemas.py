"""Validation of OpenAI request bodies: a clear 400 naming the parameter, or plain data for the worker."""

from __future__ import annotations

from dataclasses import dataclass

from ..web import ApiError

MAX_STOPS = 8
MAX_MESSAGES = 1024
MAX_PARTS = 64  # text parts in one message's content
MAX_CHOICES = 8  # OpenAI's n: choices decoded together as sequences of one prompt
MAX_EMBED_INPUTS = 256
ROLES = ("system", "developer", "user", "assistant")


@dataclass(frozen=True, slots=True, kw_only=True)
class GenerationRequest:
    model: str | None
    prompt: str | None
    messages: list[dict] | None
    params: dict
    stream: bool
    include_usage: bool


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


def _common(body: dict, prompt: str | None, messages: list[dict] | None) -> GenerationRequest:
    for key in ("tools", "functions"):
        if body.get(key):
            raise ApiError(400, f"'{key}' is not supported by this server", param=key)
    if body.get("logprobs") not in (None, False, 0):
        raise ApiError(400, "logprobs are not supported by this server", param="logprobs")
    fmt = body.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
        raise ApiError(400, "only response_format {'type': 'text'} is supported", param="response_format")
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
                             include_usage=bool(options.get("include_usage")))


def parse_chat(body: dict) -> GenerationRequest:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or len(messages) > MAX_MESSAGES:
        raise ApiError(400, f"'messages' must be a list of 1 to {MAX_MESSAGES} messages", param="messages")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ApiError(400, f"messages[{i}] must be an object with a role among {', '.join(ROLES)}",
                           param=f"messages[{i}].role")
        content = _text(m.get("content") if m.get("content") is not None else "", f"messages[{i}].content")
        clean.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
    return _common(body, None, clean)


def parse_completion(body: dict) -> GenerationRequest:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise ApiError(400, "'prompt' must be a string (or a list holding one string)", param="prompt")
    unicode(prompt, "prompt")
    if body.get("echo"):
        raise ApiError(400, "echo is not supported by this server", param="echo")
    return _common(body, prompt, None)


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
