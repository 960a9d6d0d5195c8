"""The OpenAI-compatible endpoints: /v1/models, /v1/chat/completions, /v1/completions, /v1/embeddings."""

from __future__ import annotations

import base64
import contextlib
import json
import struct
import time
import uuid
from collections.abc import AsyncIterator

from aiohttp import web

from .. import __version__
from ..inference import InferenceError, Overloaded
from ..peers.routing import routable
from ..runtime import Runtime
from .errors import ApiError, as_api_error, error_body
from .keys import RUNTIME
from .schemas import GenerationRequest, parse_chat, parse_completion, parse_embeddings

FINGERPRINT = f"offgridd-{__version__}"
_MARK = "\0offgridd-text\0"  # stands for a token's text in a pre-built event


async def read_json(request: web.Request) -> dict:
    raw = await request.read()  # raises 413 past client_max_size
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    return body


def _admit(rt: Runtime, model: str) -> str:
    """The model to serve; refused (as Overloaded, so a peer may take it) while starting, stopping, or while the
    default model cannot be served and the request asks for it."""
    if rt.ready or (rt.phase == "unavailable" and model != rt.settings.model):
        return model
    raise Overloaded(f"the appliance is {rt.phase}: {rt.reason or 'no model is ready yet'}", retry_after=5)


async def list_models(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    manifests = await request.app.loop.run_in_executor(None, rt.store.list)
    return web.json_response({"object": "list", "data": [_model_card(m) for m in manifests]})


async def get_model(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    manifest = await request.app.loop.run_in_executor(None, rt.store.get, request.match_info["name"])
    return web.json_response(_model_card(manifest))


def _model_card(m) -> dict:
    return {"id": m.name, "object": "model", "created": int(m.added), "owned_by": "offgridd",
            "quantization": m.quantization, "architecture": m.architecture, "context_length": m.context_length,
            "size": m.size}


@routable
async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, parse_chat(await read_json(request)), chat=True)


@routable
async def completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, parse_completion(await read_json(request)), chat=False)


@routable
async def embeddings(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    model, inputs, as_base64 = parse_embeddings(await read_json(request))
    name = _admit(rt, model or rt.settings.model)
    async with rt.admission.ticket():
        worker = await rt.pool.worker_for(name)
        name = worker.config.name
        rt.begin_request()
        try:
            async with contextlib.aclosing(worker.request({"op": "embed", "input": inputs})) as frames:
                frame = await anext(frames)
        finally:
            rt.end_request()
    n = frame["prompt_tokens"]
    rt.metrics.prompt_tokens.labels(name).inc(n)
    return web.json_response({
        "object": "list", "model": name, "usage": {"prompt_tokens": n, "total_tokens": n},
        "data": [{"object": "embedding", "index": i, "embedding": _b64(v) if as_base64 else v}
                 for i, v in enumerate(frame["data"])],
    })


def _b64(vector: list[float]) -> str:
    """OpenAI's base64 encoding: the float32 little-endian bytes of the vector."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()


async def _tracked(rt: Runtime, name: str, frames: AsyncIterator[dict]) -> AsyncIterator[dict]:
    """Pass a request's frames through, recording time to first token, speed and token counts."""
    arrived = time.monotonic()
    first = None
    rt.begin_request()
    try:
        async with contextlib.aclosing(frames):
            async for frame in frames:
                if frame["op"] == "token" and first is None:
                    first = time.monotonic()
                    rt.metrics.ttft.labels(name).observe(first - arrived)
                elif frame["op"] == "done":
                    m = rt.metrics
                    m.prompt_tokens.labels(name).inc(frame["prompt_tokens"])
                    m.completion_tokens.labels(name).inc(frame["completion_tokens"])
                    n = frame["completion_tokens"]
                    if first is not None and n > 1 and (spent := time.monotonic() - first) > 0:
                        rt.last_tokens_per_second = (n - 1) / spent
                        m.speed.labels(name).observe(rt.last_tokens_per_second)
                    rt.served += 1
                yield frame
    finally:
        rt.end_request()


async def _generate(request: web.Request, req: GenerationRequest, chat: bool) -> web.StreamResponse:
    rt = request.app[RUNTIME]
    name = _admit(rt, req.model or rt.settings.model)
    async with rt.admission.ticket():
        worker = await rt.pool.worker_for(name)
        return await _answer(request, req, chat, worker)


async def _answer(request: web.Request, req: GenerationRequest, chat: bool, worker) -> web.StreamResponse:
    rt = request.app[RUNTIME]
    name = worker.config.name  # the model that answers: it may stand in for one that does not fit
    frame = {"op": "generate", "prompt": req.prompt, "messages": req.messages, "params": req.params}
    shape = _Shape(name, chat, req.params.get("n") or 1)
    async with contextlib.aclosing(_tracked(rt, name, worker.request(frame))) as frames:
        await anext(frames)  # the worker started on it: errors before this point get a plain HTTP status
        if req.stream:
            return await _stream(request, frames, shape, req.include_usage)
        texts: list[list[str]] = [[] for _ in range(shape.n)]
        done = None
        async for f in frames:
            if f["op"] == "token":
                texts[f.get("index", 0)].append(f["text"])
            elif f["op"] == "done":
                done = f
        if done is None:
            raise ApiError(500, "the worker ended the request without finishing it")
        return web.json_response(shape.whole(["".join(t) for t in texts], done))


async def _stream(request: web.Request, frames: AsyncIterator[dict], shape: _Shape, include_usage: bool):
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
        async for f in frames:
            if f["op"] == "token":
                head, tail = events[f.get("index", 0)]
                await resp.write(head + json.dumps(f["text"]).encode() + tail)
            elif f["op"] == "done":
                for index, reason in enumerate(f.get("finish_reasons") or [f["finish_reason"]]):
                    await send({**shape.chunk({} if shape.chat else "", reason, index), **usage_field})
                if include_usage:
                    await send({**shape.chunk(None, None), "choices": [], "usage": _usage(f)})
    except (ApiError, InferenceError) as e:
        err = as_api_error(e)
        await send(error_body(err.status, err.message, err.param, err.code))
        return resp
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp


def _usage(done: dict) -> dict:
    p, c = done["prompt_tokens"], done["completion_tokens"]
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

    def whole(self, texts: list[str], done: dict) -> dict:
        reasons = done.get("finish_reasons") or [done["finish_reason"]]
        if self.chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None,
                        "finish_reason": reason} for i, (text, reason) in enumerate(zip(texts, reasons, strict=True))]
            return {**self._head("chat.completion"), "choices": choices, "usage": _usage(done)}
        choices = [{"index": i, "text": text, "logprobs": None, "finish_reason": reason}
                   for i, (text, reason) in enumerate(zip(texts, reasons, strict=True))]
        return {**self._head("text_completion"), "choices": choices, "usage": _usage(done)}
