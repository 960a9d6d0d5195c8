"""POST /v1/responses: OpenAI's Responses API over the same generation as chat, with no server-side state.

A response is never stored (`store: false` in every reply): `store: true`, `previous_response_id` and `background`
are refused, so a client resends its conversation as `input`, as it does with chat. Input items are turned into
chat messages (a `function_call` item into an assistant's tool call, a `function_call_output` item into a tool
result); output is one message with `output_text`, or `function_call` items.
"""

from __future__ import annotations

import json
import time
import uuid

from aiohttp import web

from ..inference import Generation, InferenceError, Overloaded, Token
from ..store import UnknownModel
from ..web import ApiError, as_api_error, charge, read_json
from .keys import RUNTIME
from .openai import elsewhere
from .schemas import GenerationRequest, generation_request, unicode
from .tools import Call, ReplyReader, ToolUse, format_grammar, settle, tool_use

MAX_ITEMS = 1024
ROLES = ("user", "system", "developer", "assistant")
TEXT_PARTS = ("input_text", "output_text", "text")


async def create_response(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    req = parse_response_request(body)
    try:
        generation = await request.app[RUNTIME].inference.generate(req.model, messages=req.messages,
                                                                   params=req.params)
    except (UnknownModel, Overloaded) as e:
        return await elsewhere(request, req.model, e)
    async with generation:
        try:
            shape = _Response(generation.model, body, req)
            if req.stream:
                return await _stream(request, generation, shape, req.tools)
            reader = ReplyReader(req.tools)
            async for event in generation:
                if isinstance(event, Token):
                    reader.text.append(event.text)
            if (done := generation.done) is None:
                raise ApiError(500, "the worker ended the request without finishing it")
            text = "".join(reader.text)
            calls, reason = settle(req.tools, text, done.finish_reasons[0])
            items = [_call_item(c) for c in calls] if calls else [_message_item(text, reason)]
            return web.json_response(shape.whole(items, reason, done))
        finally:
            if (done := generation.done) is not None:
                charge(request, done.prompt_tokens + done.completion_tokens)


def parse_response_request(body: dict) -> GenerationRequest:
    for key, why in (("previous_response_id", "this box keeps no responses: send the whole conversation as 'input'"),
                     ("conversation", "this box keeps no conversations for the Responses API: send the whole "
                                      "conversation as 'input'"),
                     ("background", "background responses need server-side state, which this box does not keep")):
        if body.get(key):
            raise ApiError(400, f"'{key}' is not supported: {why}", param=key)
    if body.get("store"):
        raise ApiError(400, "'store': true is not supported: this box keeps no responses (every reply says "
                       "store: false); leave it out or send false", param="store")
    messages = _instructions(body.get("instructions")) + _input(body.get("input"))
    use, grammar = _tools(body)
    text = body.get("text")
    if text is not None and not isinstance(text, dict):
        raise ApiError(400, "'text' must be an object like {'format': {'type': 'json_schema', ...}}", param="text")
    fmt = (text or {}).get("format")
    if (shaped := format_grammar(fmt, "text.format", flat=True)) is not None:
        if grammar is not None:
            raise ApiError(400, "'text.format' together with callable tools is not supported here: send one, or "
                           "tool_choice 'none'", param="text.format")
        grammar = shaped
    if body.get("top_logprobs"):
        raise ApiError(400, "'top_logprobs' is served on /v1/chat/completions and /v1/completions, not here",
                       param="top_logprobs")
    chat_like = {k: body[k] for k in ("model", "temperature", "top_p", "stream", "seed") if k in body}
    if body.get("max_output_tokens") is not None:
        chat_like["max_tokens"] = body["max_output_tokens"]
    try:
        return generation_request(chat_like, None, messages, tools=use, grammar=grammar)
    except ApiError as e:
        if e.param == "max_tokens":
            e.param, e.message = "max_output_tokens", e.message.replace("max_tokens", "max_output_tokens")
        raise


def _instructions(value: object) -> list[dict]:
    if value is None:
        return []
    if not isinstance(value, str):
        raise ApiError(400, "'instructions' must be a string", param="instructions")
    return [{"role": "system", "content": unicode(value, "instructions")}]


def _input(value: object) -> list[dict]:
    if isinstance(value, str):
        return [{"role": "user", "content": unicode(value, "input")}]
    if not isinstance(value, list) or not value or len(value) > MAX_ITEMS:
        raise ApiError(400, f"'input' must be a string or a list of 1 to {MAX_ITEMS} items", param="input")
    messages: list[dict] = []
    for i, item in enumerate(value):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise ApiError(400, f"'{where}' must be an object", param=where)
        kind = item.get("type", "message")
        if kind == "message":
            if item.get("role") not in ROLES:
                raise ApiError(400, f"'{where}.role' must be one of {', '.join(ROLES)}", param=f"{where}.role")
            role = "system" if item["role"] == "developer" else item["role"]
            messages.append({"role": role, "content": _content(item.get("content"), f"{where}.content")})
        elif kind == "function_call":
            call = {"id": _string(item, "call_id", where), "type": "function",
                    "function": {"name": _string(item, "name", where), "arguments": _string(item, "arguments", where)}}
            if messages and messages[-1]["role"] == "assistant" and "tool_calls" in messages[-1]:
                messages[-1]["tool_calls"].append(call)
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            messages.append({"role": "tool", "tool_call_id": _string(item, "call_id", where),
                             "content": _content(output, f"{where}.output")})
        else:
            raise ApiError(400, f"input items of type {kind!r} are not supported here (messages with text, "
                           "function_call and function_call_output are)", param=f"{where}.type")
    return messages


def _string(item: dict, key: str, where: str) -> str:
    value = item.get(key)
    if not isinstance(value, str):
        raise ApiError(400, f"'{where}.{key}' must be a string", param=f"{where}.{key}")
    return unicode(value, f"{where}.{key}")


def _content(value: object, where: str) -> str:
    if isinstance(value, str):
        return unicode(value, where)
    if isinstance(value, list) and all(isinstance(p, dict) for p in value):
        for j, part in enumerate(value):
            if part.get("type") not in TEXT_PARTS or not isinstance(part.get("text"), str):
                raise ApiError(400, f"'{where}[{j}]' must be a text part ({', '.join(TEXT_PARTS)}): images, files "
                               "and audio are not read on this server", param=f"{where}[{j}].type")
        return unicode("".join(p["text"] for p in value), where)
    raise ApiError(400, f"'{where}' must be a string or a list of text parts", param=where)


def _tools(body: dict) -> tuple[ToolUse | None, str | None]:
    """Responses' flat function tools and tool_choice, in chat's shape for the grammar and the prompt."""
    tools = body.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise ApiError(400, "'tools' must be a list", param="tools")
    chat_tools = []
    for i, tool in enumerate(tools or ()):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            kind = tool.get("type") if isinstance(tool, dict) else None
            raise ApiError(400, f"tools[{i}] of type {kind!r} cannot run here: only function tools, which the "
                           "client runs, are served", param=f"tools[{i}].type")
        chat_tools.append({"type": "function", "function": {
            k: tool[k] for k in ("name", "description", "parameters", "strict") if tool.get(k) is not None}})
    choice = body.get("tool_choice")
    if isinstance(choice, dict):
        if choice.get("type") != "function":
            raise ApiError(400, "'tool_choice' must be 'auto', 'none', 'required' or {'type': 'function', "
                           "'name': ...}", param="tool_choice")
        choice = {"type": "function", "function": {"name": choice.get("name")}}
    return tool_use(chat_tools, choice, body.get("parallel_tool_calls"), flat=True)


def _message_item(text: str, reason: str) -> dict:
    return {"type": "message", "id": "msg_" + uuid.uuid4().hex, "status": _status(reason), "role": "assistant",
            "content": [_text_part(text)]}


def _text_part(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _call_item(call: Call, status: str = "completed") -> dict:
    return {"type": "function_call", "id": "fc_" + call.id.removeprefix("call_"), "call_id": call.id,
            "name": call.name, "arguments": call.arguments, "status": status}


def _status(reason: str) -> str:
    return "incomplete" if reason == "length" else "completed"


class _Response:
    """The response object, with what the request asked for echoed back as OpenAI does."""

    def __init__(self, model: str, body: dict, req: GenerationRequest):
        self.id = "resp_" + uuid.uuid4().hex
        self.created = int(time.time())
        text = body.get("text") if isinstance(body.get("text"), dict) else {}
        self.echo = {
            "instructions": body.get("instructions"), "max_output_tokens": body.get("max_output_tokens"),
            "model": model, "parallel_tool_calls": body.get("parallel_tool_calls") is True,
            "previous_response_id": None, "reasoning": {"effort": None, "summary": None}, "store": False,
            "temperature": body.get("temperature", 1.0), "text": {"format": text.get("format") or {"type": "text"}},
            "tool_choice": body.get("tool_choice", "auto"), "tools": body.get("tools") or [],
            "top_p": body.get("top_p", 1.0), "truncation": "disabled", "user": None,
            "metadata": body.get("metadata") or {},
        }

    def obj(self, status: str, output: list[dict], usage: dict | None = None) -> dict:
        incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
        return {"id": self.id, "object": "response", "created_at": self.created, "status": status, "error": None,
                "incomplete_details": incomplete, "output": output, "usage": usage, **self.echo}

    def whole(self, items: list[dict], reason: str, done) -> dict:
        return self.obj(_status(reason), items, _usage(done))


def _usage(done) -> dict:
    p, c = done.prompt_tokens, done.completion_tokens
    return {"input_tokens": p, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": c,
            "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": p + c}


async def _stream(request: web.Request, generation: Generation, shape: _Response, tools: ToolUse | None
                  ) -> web.StreamResponse:
    """OpenAI's events, in its order, each with its type as the SSE event name and a rising sequence_number."""
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                       "X-Accel-Buffering": "no"})
    await resp.prepare(request)
    events = _Events(resp, shape)
    await events.send("response.created", response=shape.obj("in_progress", []))
    await events.send("response.in_progress", response=shape.obj("in_progress", []))
    reader = ReplyReader(tools)
    try:
        async for event in generation:
            if isinstance(event, Token):
                await events.say(reader.feed(event.text))
            else:
                await events.say(reader.finish())
                reason = event.finish_reasons[0]
                await events.close(reason)
                status = _status(reason)
                await events.send(f"response.{status}", response=shape.obj(status, events.items, _usage(event)))
    except (ApiError, InferenceError) as e:
        err = as_api_error(e)
        await events.send("error", code=err.code, message=err.message, param=err.param)
        return resp
    await resp.write_eof()
    return resp


class _Events:
    """The open output item (a message being written, or a call whose arguments are coming) and the events that
    open, fill and close it."""

    def __init__(self, resp: web.StreamResponse, shape: _Response):
        self.resp, self.shape = resp, shape
        self.sequence = 0
        self.items: list[dict] = []  # closed items, as the final response lists them
        self.open: dict | None = None
        self.text: list[str] = []

    async def send(self, kind: str, **fields) -> None:
        data = json.dumps({"type": kind, **fields, "sequence_number": self.sequence}, separators=(",", ":"))
        self.sequence += 1
        await self.resp.write(f"event: {kind}\ndata: {data}\n\n".encode())

    async def say(self, events: list[tuple]) -> None:
        for event in events:
            if event[0] == "content":
                if self.open is None:
                    await self._open_message()
                self.text.append(event[1])
                await self.send("response.output_text.delta", item_id=self.open["id"], output_index=len(self.items),
                                content_index=0, delta=event[1], logprobs=[])
            elif event[0] == "call":
                await self._close_item("completed")
                # the call's arguments may have grown already in this feed; they go out in the deltas that follow
                self.open = {**_call_item(event[2], "in_progress"), "arguments": ""}
                await self.send("response.output_item.added", output_index=len(self.items), item=self.open)
            else:
                self.open["arguments"] += event[2]
                await self.send("response.function_call_arguments.delta", item_id=self.open["id"],
                                output_index=len(self.items), delta=event[2])

    async def _open_message(self) -> None:
        self.open = {**_message_item("", "stop"), "status": "in_progress", "content": []}
        await self.send("response.output_item.added", output_index=len(self.items), item=self.open)
        await self.send("response.content_part.added", item_id=self.open["id"], output_index=len(self.items),
                        content_index=0, part=_text_part(""))

    async def close(self, reason: str) -> None:
        if self.open is None and not self.items:
            await self._open_message()  # an empty answer is still a message
        await self._close_item(_status(reason))

    async def _close_item(self, status: str) -> None:
        item, index = self.open, len(self.items)
        if item is None:
            return
        if item["type"] == "message":
            text = "".join(self.text)
            part = _text_part(text)
            await self.send("response.output_text.done", item_id=item["id"], output_index=index, content_index=0,
                            text=text, logprobs=[])
            await self.send("response.content_part.done", item_id=item["id"], output_index=index, content_index=0,
                            part=part)
            item = {**item, "status": status, "content": [part]}
        else:
            await self.send("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                            name=item["name"], arguments=item["arguments"])
            item = {**item, "status": status}
        await self.send("response.output_item.done", output_index=index, item=item)
        self.items.append(item)
        self.open = None
