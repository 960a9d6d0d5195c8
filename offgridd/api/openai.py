"""The OpenAI-compatible endpoints: /v1/models, /v1/chat/completions, /v1/completions, /v1/embeddings."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import logging
import struct
import time
import uuid

from aiohttp import web

from .. import __version__
from ..documents import DocumentError, ground
from ..history import ConversationNotFound, ConversationStore, HistoryError, HistoryFull
from ..history.routes import CONVERSATION_HEADER, HISTORY, owner_of
from ..inference import Done, Generation, InferenceError, Overloaded, Token
from ..store import UnknownModel
from ..web import ELSEWHERE, ApiError, as_api_error, charge, error_body, read_json
from . import logprobs
from .keys import RUNTIME
from .schemas import GenerationRequest, parse_chat, parse_completion, parse_embeddings
from .tools import Call, ReplyReader, settle

log = logging.getLogger(__name__)

FINGERPRINT = f"offgridd-{__version__}"
_MARK = "\0offgridd-text\0"  # stands for a token's text in a pre-built event


async def list_models(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    manifests = await asyncio.get_running_loop().run_in_executor(None, rt.store.list)
    return web.json_response({"object": "list", "data": [_model_card(m) for m in manifests]})


async def get_model(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    manifest = await asyncio.get_running_loop().run_in_executor(None, rt.store.get, request.match_info["name"])
    return web.json_response(_model_card(manifest))


def _model_card(m) -> dict:
    return {"id": m.name, "object": "model", "created": int(m.added), "owned_by": "offgridd",
            "quantization": m.quantization, "architecture": m.architecture, "context_length": m.context_length,
            "size": m.size, "kind": m.kind}


async def chat_completions(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    asked = parse_chat(body)
    req, extra = await _grounded(request, body, asked)
    return await _generate(request, req, chat=True, extra=extra, asked=asked)


async def _grounded(request: web.Request, body: dict, req: GenerationRequest) -> tuple[GenerationRequest, dict | None]:
    """A chat that names a collection of the box's documents (`"offgrid": {"collection": NAME}`) gets the top
    passages for its question in the prompt, and their sources (file, page) in the reply."""
    ext = body.get("offgrid")
    if ext is None:
        return req, None
    if not isinstance(ext, dict) or not isinstance(ext.get("collection"), str):
        raise ApiError(400, "'offgrid' must be an object like {\"collection\": \"manuals\"}", param="offgrid")
    rt = request.app[RUNTIME]
    if rt.documents is None:
        raise ApiError(503, "documents are off on this box (documents.enabled = false)", code="documents_disabled")
    try:
        messages, sources = await ground(req.messages, ext["collection"], rt.documents, rt.settings.documents.top_k)
    except DocumentError as e:
        raise ApiError(e.status, str(e), param="offgrid.collection") from None
    return dataclasses.replace(req, messages=messages), {"offgrid": {"collection": ext["collection"],
                                                                     "sources": sources}}


async def completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, parse_completion(await read_json(request)), chat=False)


async def elsewhere(request: web.Request, model: str | None, refused: Exception) -> web.StreamResponse:
    """This node cannot serve the request (no such model here, or too busy): a peer may. Raises `refused` if none
    takes it."""
    for route in request.app.get(ELSEWHERE, ()):
        if (response := await route(request, model or request.app[RUNTIME].settings.model)) is not None:
            return response
    raise refused


async def embeddings(request: web.Request) -> web.StreamResponse:
    model, inputs, as_base64 = parse_embeddings(await read_json(request))
    try:
        result = await request.app[RUNTIME].inference.embed(model, inputs)
    except (UnknownModel, Overloaded) as e:
        return await elsewhere(request, model, e)
    n = result.prompt_tokens
    charge(request, n)
    return web.json_response({
        "object": "list", "model": result.model, "usage": {"prompt_tokens": n, "total_tokens": n},
        "data": [{"object": "embedding", "index": i, "embedding": _b64(v) if as_base64 else v}
                 for i, v in enumerate(result.vectors)],
    })


def _b64(vector: list[float]) -> str:
    """OpenAI's base64 encoding: the float32 little-endian bytes of the vector."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()


async def _generate(request: web.Request, req: GenerationRequest, chat: bool, extra: dict | None = None,
                    asked: GenerationRequest | None = None) -> web.StreamResponse:
    """`asked` is the chat as the client sent it, when `req` is that chat grounded in documents: a kept
    conversation keeps the client's messages and the answer's sources, not the passages put into the prompt."""
    sources = extra["offgrid"]["sources"] if extra else None
    kept = await Kept.asked(request, asked or req, sources) if chat else None
    try:
        generation = await request.app[RUNTIME].inference.generate(
            req.model, prompt=req.prompt, messages=req.messages, params=req.params)
    except (UnknownModel, Overloaded) as e:
        if kept is not None:
            await kept.drop()
        return await elsewhere(request, req.model, e)
    except BaseException:
        if kept is not None:  # refused before it started: the conversation made for it goes too
            await kept.drop()
        raise
    async with generation:  # errors from here on come from a request the worker started
        try:
            return await _answer(request, req, chat, generation, kept, extra)
        finally:
            if (done := generation.done) is not None:
                charge(request, done.prompt_tokens + done.completion_tokens)
                if kept is not None:
                    await _to_the_end(kept.save(generation.model, done))
            elif kept is not None:
                await _to_the_end(kept.drop())


async def _answer(request: web.Request, req: GenerationRequest, chat: bool, generation: Generation,
                  kept: Kept | None, extra: dict | None = None):
    shape = _Shape(generation.model, chat, req.params.get("n") or 1, prompt=req.prompt, extra=extra)
    headers = kept.headers if kept is not None else None
    scored = "logprobs" in req.params
    if req.stream:
        if req.tools is None and not scored:  # the plain path: pre-encoded events, nothing read per token
            return await _stream(request, generation, shape, req.include_usage, kept)
        return await _stream_read(request, generation, shape, req, kept)
    texts: list[list[str]] = [[] for _ in range(shape.n)]
    entries: list[list[dict]] | None = [[] for _ in range(shape.n)] if scored else None
    async for event in generation:
        if isinstance(event, Token):
            texts[event.index].append(event.text)
            if entries is not None and event.logprobs:
                entries[event.index].extend(event.logprobs)
    if generation.done is None:
        raise ApiError(500, "the worker ended the request without finishing it")
    if kept is not None:
        kept.text = texts[0]
    whole = ["".join(t) for t in texts]
    answers = [(text, *settle(req.tools, text, reason)) for text, reason in zip(
        whole, generation.done.finish_reasons, strict=True)]
    return web.json_response(shape.whole(answers, generation.done, entries), headers=headers)


_finishing: set[asyncio.Task] = set()


async def _to_the_end(work) -> None:
    """Run `work` to its end even if the client leaves now: a client that closes its connection on the last byte
    of an answer cancels this handler, and the exchange must still be kept."""
    task = asyncio.ensure_future(work)
    _finishing.add(task)
    task.add_done_callback(_finishing.discard)
    await asyncio.shield(task)


class Kept:
    """A chat the client asked the box to keep (X-Offgrid-Conversation: "new", or a conversation's id): its answer
    (the first choice) is stored with the request's new turn once it is done."""

    def __init__(self, store: ConversationStore, owner: str | None, conversation_id: str, new: bool,
                 messages: list[dict], sources: list[dict] | None):
        self.store, self.owner, self.id, self.new = store, owner, conversation_id, new
        self.messages, self.sources = messages, sources
        self.headers = {CONVERSATION_HEADER: conversation_id}
        self.text: list[str] = []

    @classmethod
    async def asked(cls, request: web.Request, req: GenerationRequest, sources: list[dict] | None) -> Kept | None:
        wanted = request.headers.get(CONVERSATION_HEADER)
        if wanted is None:
            return None
        store, owner = request.app.get(HISTORY), owner_of(request)
        if store is None:
            raise ApiError(400, "conversation history is off on this box", param=CONVERSATION_HEADER)
        try:
            if wanted == "new":
                first = next((m["content"] for m in req.messages if m["role"] == "user" and m["content"]), "")
                conversation = await store.create(owner=owner, source="api", model=req.model or "",
                                                  **({"title": " ".join(first.split())[:60]} if first.strip() else {}))
                return cls(store, owner, conversation.id, True, req.messages, sources)
            await store.get(wanted, owner=owner)
        except ConversationNotFound as e:
            raise ApiError(404, str(e), param=CONVERSATION_HEADER, code="conversation_not_found") from None
        except HistoryError as e:
            raise ApiError(400 if not isinstance(e, HistoryFull) else 507, str(e), param=CONVERSATION_HEADER) \
                from None
        return cls(store, owner, wanted, False, req.messages, sources)

    async def save(self, model: str, done: Done) -> None:
        try:
            await self.store.record_exchange(
                owner=self.owner, conversation_id=self.id, request_messages=self.messages, answer="".join(self.text),
                model=model, prompt_tokens=done.prompt_tokens, completion_tokens=done.completion_tokens,
                finish_reason=done.finish_reasons[0], whole=self.new, sources=self.sources)
        except HistoryError as e:  # the client has its answer; keeping it failed, and the log says why
            log.warning("could not keep a chat in conversation %s: %s", self.id, e)

    async def drop(self) -> None:
        """The request went elsewhere or failed before it started: a conversation made for it is removed."""
        if self.new:
            with contextlib.suppress(HistoryError):
                await self.store.delete(self.id, owner=self.owner)


async def _stream(request: web.Request, generation: Generation, shape: _Shape, include_usage: bool,
                  kept: Kept | None = None):
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                       "X-Accel-Buffering": "no", **(kept.headers if kept is not None else {})})
    await resp.prepare(request)
    keep = kept.text.append if kept is not None else None

    async def send(obj: dict) -> None:
        await resp.write(b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n")

    usage_field = {"usage": None} if include_usage else {}
    if shape.chat:
        for index in range(shape.n):
            await send({**shape.chunk({"role": "assistant", "content": ""}, None, index), **usage_field,
                        **(shape.extra if index == 0 else {})})
    # every token event of a choice is the same JSON around its text: build that once, and per token encode only the
    # text
    events = []
    for index in range(shape.n):
        head, tail = json.dumps({**shape.chunk(_MARK, None, index), **usage_field}, separators=(",", ":")).split(
            json.dumps(_MARK))
        events.append((b"data: " + head.encode(), tail.encode() + b"\n\n"))
    try:
        async for event in generation:
            if isinstance(event, Token):
                head, tail = events[event.index]
                await resp.write(head + json.dumps(event.text).encode() + tail)
                if keep is not None and event.index == 0:
                    keep(event.text)
            else:
                for index, reason in enumerate(event.finish_reasons):
                    await send({**shape.chunk({} if shape.chat else "", reason, index), **usage_field})
                if include_usage:
                    await send({**shape.chunk(None, None), "choices": [], "usage": _usage(event)})
    except (ApiError, InferenceError) as e:
        err = as_api_error(e)
        await send(error_body(err.status, err.message, err.param, err.code))
        return resp
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp


async def _stream_read(request: web.Request, generation: Generation, shape: _Shape, req: GenerationRequest,
                       kept: Kept | None) -> web.StreamResponse:
    """A stream whose text is read as it comes: for tool calls (streamed as OpenAI does, a call's id and name
    first, then its arguments) and for logprobs, which ride on the chunk of their text."""
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                       "X-Accel-Buffering": "no", **(kept.headers if kept is not None else {})})
    await resp.prepare(request)
    usage_field = {"usage": None} if req.include_usage else {}
    readers = [ReplyReader(req.tools) for _ in range(shape.n)]
    pending: list[list[dict]] = [[] for _ in range(shape.n)]  # logprobs of text not sent yet
    legacy = [logprobs.Legacy(req.prompt or "") for _ in range(shape.n)]
    scored = "logprobs" in req.params

    async def send(delta, finish: str | None, index: int, extra: dict | None = None) -> None:
        lp = None
        if scored and (pending[index] or finish is not None):
            entries, pending[index] = pending[index], []
            lp = logprobs.chat(entries) if shape.chat else legacy[index].shape(entries)
        obj = {**shape.chunk(delta, finish, index, lp), **usage_field, **(extra or {})}
        await resp.write(b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n")

    async def say(events: list[tuple], index: int) -> None:
        for event in events:
            if event[0] == "content":
                await send(event[1], None, index)
            elif event[0] == "call":
                call: Call = event[2]
                await send({"tool_calls": [{"index": event[1], "id": call.id, "type": "function",
                                            "function": {"name": call.name, "arguments": ""}}]}, None, index)
            else:
                await send({"tool_calls": [{"index": event[1], "function": {"arguments": event[2]}}]}, None, index)

    if shape.chat:
        for index in range(shape.n):
            await send({"role": "assistant", "content": None if req.tools else ""}, None, index,
                       shape.extra if index == 0 else None)
    try:
        async for event in generation:
            if isinstance(event, Token):
                if event.logprobs:
                    pending[event.index].extend(event.logprobs)
                if kept is not None and event.index == 0:
                    kept.text.append(event.text)
                await say(readers[event.index].feed(event.text), event.index)
            else:
                for index, reason in enumerate(event.finish_reasons):
                    reader = readers[index]
                    await say(reader.finish(), index)
                    if reason == "stop" and reader.calls and reader.complete:
                        reason = "tool_calls"
                    await send({} if shape.chat else "", reason, index)
                if req.include_usage:
                    obj = {**shape.chunk(None, None), "choices": [], "usage": _usage(event)}
                    await resp.write(b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n")
    except (ApiError, InferenceError) as e:
        err = as_api_error(e)
        await resp.write(b"data: " + json.dumps(error_body(err.status, err.message, err.param, err.code)).encode()
                         + b"\n\n")
        return resp
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp


def _usage(done: Done) -> dict:
    p, c = done.prompt_tokens, done.completion_tokens
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


class _Shape:
    """Chat and text completions differ only in their object names and where the text goes."""

    def __init__(self, model: str, chat: bool, n: int = 1, prompt: str | None = None, extra: dict | None = None):
        self.model, self.chat, self.n, self.prompt = model, chat, n, prompt
        self.extra = extra or {}  # offgridd's own fields (a grounded chat's sources): in the reply or first chunk
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": FINGERPRINT}

    def chunk(self, delta, finish: str | None, index: int = 0, lp: dict | None = None) -> dict:
        if self.chat:
            if isinstance(delta, str):
                delta = {"content": delta}
            choice = {"index": index, "delta": delta or {}, "logprobs": lp, "finish_reason": finish}
            return {**self._head("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": index, "text": delta or "", "logprobs": lp, "finish_reason": finish}
        return {**self._head("text_completion"), "choices": [choice]}

    def whole(self, answers: list[tuple[str, list[Call] | None, str]], done: Done,
              entries: list[list[dict]] | None = None) -> dict:
        """Each choice from (its text, its tool calls or None, its finish reason)."""
        choices = []
        for i, (text, calls, reason) in enumerate(answers):
            if self.chat:
                message = {"role": "assistant", "content": text}
                if calls:
                    message = {"role": "assistant", "content": None, "tool_calls": [
                        {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                        for c in calls]}
                lp = logprobs.chat(entries[i]) if entries is not None else None
                choices.append({"index": i, "message": message, "logprobs": lp, "finish_reason": reason})
            else:
                lp = logprobs.Legacy(self.prompt or "").shape(entries[i]) if entries is not None else None
                choices.append({"index": i, "text": text, "logprobs": lp, "finish_reason": reason})
        return {**self._head("chat.completion" if self.chat else "text_completion"), "choices": choices,
                "usage": _usage(done), **self.extra}
