"""The OpenAI-compatible endpoints: /v1/models, /v1/chat/completions, /v1/completions, /v1/embeddings."""

from __future__ import annotations

import asyncio
import base64
import json
import struct
import time
import uuid

from aiohttp import web

from .. import __version__
from ..inference import Done, Generation, InferenceError, Overloaded, Token
from ..store import UnknownModel
from ..web import ELSEWHERE, ApiError, as_api_error, charge, error_body, read_json
from .keys import RUNTIME
from .schemas import GenerationRequest, parse_chat, parse_completion, parse_embeddings

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
    return await _generate(request, parse_chat(await read_json(request)), chat=True)


async def completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, parse_completion(await read_json(request)), chat=False)


async def _elsewhere(request: web.Request, model: str | None, refused: Exception) -> web.StreamResponse:
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
        return await _elsewhere(request, model, e)
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


async def _generate(request: web.Request, req: GenerationRequest, chat: bool) -> web.StreamResponse:
    try:
        generation = await request.app[RUNTIME].inference.generate(
            req.model, prompt=req.prompt, messages=req.messages, params=req.params)
    except (UnknownModel, Overloaded) as e:
        return await _elsewhere(request, req.model, e)
    async with generation:  # errors from here on come from a request the worker started
        try:
            return await _answer(request, req, chat, generation)
        finally:
            if (done := generation.done) is not None:
                charge(request, done.prompt_tokens + done.completion_tokens)


async def _answer(request: web.Request, req: GenerationRequest, chat: bool, generation: Generation):
    shape = _Shape(generation.model, chat, req.params.get("n") or 1)
    if req.stream:
        return await _stream(request, generation, shape, req.include_usage)
    texts: list[list[str]] = [[] for _ in range(shape.n)]
    async for event in generation:
        if isinstance(event, Token):
            texts[event.index].append(event.text)
    if generation.done is None:
        raise ApiError(500, "the worker ended the request without finishing it")
    return web.json_response(shape.whole(["".join(t) for t in texts], generation.done))


async def _stream(request: web.Request, generation: Generation, shape: _Shape, include_usage: bool):
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                       "X-Accel-Buffering": "no"})
    await resp.prepare(request)

    async def send(obj: dict) -> None:
        await resp.write(b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n")

    usage_field = {"usage": None} if include_usage else {}
    if shape.chat:
        for index in range(shape.n):
            await send({**shape.chunk({"role": "assistant", "content": ""}, None, index), **usage_field})
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


def _usage(done: Done) -> dict:
    p, c = done.prompt_tokens, done.completion_tokens
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


class _Shape:
    """Chat and text completions differ only in their object names and where the text goes."""

    def __init__(self, model: str, chat: bool, n: int = 1):
        self.model, self.chat, self.n = model, chat, n
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": FINGERPRINT}

    def chunk(self, delta, finish: str | None, index: int = 0) -> dict:
        if self.chat:
            if isinstance(delta, str):
                delta = {"content": delta}
            choice = {"index": index, "delta": delta or {}, "logprobs": None, "finish_reason": finish}
            return {**self._head("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": index, "text": delta or "", "logprobs": None, "finish_reason": finish}
        return {**self._head("text_completion"), "choices": [choice]}

    def whole(self, texts: list[str], done: Done) -> dict:
        reasons = done.finish_reasons
        if self.chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None,
                        "finish_reason": reason} for i, (text, reason) in enumerate(zip(texts, reasons, strict=True))]
            return {**self._head("chat.completion"), "choices": choices, "usage": _usage(done)}
        choices = [{"index": i, "text": text, "logprobs": None, "finish_reason": reason}
                   for i, (text, reason) in enumerate(zip(texts, reasons, strict=True))]
        return {**self._head("text_completion"), "choices": choices, "usage": _usage(done)}
