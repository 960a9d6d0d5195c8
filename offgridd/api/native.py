"""The native API under /api/v1: store, jobs, status and the event stream the UI listens to."""

from __future__ import annotations

import asyncio
import contextlib
import json

from aiohttp import web

from .. import status as status_model
from ..web import ApiError
from .keys import RUNTIME

STATUS_EVERY_S = 2.0
MAX_EVENT_STREAMS = 32  # the UI holds one per open page


async def _snapshot(request: web.Request) -> dict:
    rt = request.app[RUNTIME]
    memory = await asyncio.get_running_loop().run_in_executor(None, status_model.memory, rt)
    return {**status_model.report(rt, memory, await status_model.database(rt)), "line": status_model.line(rt, memory)}


async def status(request: web.Request) -> web.Response:
    return web.json_response({**await _snapshot(request), "settings": request.app[RUNTIME].settings.public()})


async def list_models(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    manifests = await asyncio.get_running_loop().run_in_executor(None, rt.store.list)
    loaded = {n: w.state for n, w in rt.inference.pool.workers.items()}
    return web.json_response({"models": [{**m.to_dict(), "loaded": loaded.get(m.name, "no"),
                                          "default": m.name == rt.settings.model} for m in manifests]})


async def delete_model(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    name = request.match_info["name"]
    await rt.inference.pool.unload(name)
    manifest = await asyncio.get_running_loop().run_in_executor(None, rt.store.remove, name)
    rt.bus.publish("models", {"removed": manifest.name})
    return web.json_response({"removed": manifest.name})


async def list_jobs(request: web.Request) -> web.Response:
    return web.json_response({"jobs": await request.app[RUNTIME].jobs.recent()})


async def events(request: web.Request) -> web.StreamResponse:
    """Server-sent events: a status snapshot at once and every few seconds, and every bus event as it happens."""
    rt = request.app[RUNTIME]
    if rt.bus.subscribers >= MAX_EVENT_STREAMS:
        raise ApiError(503, f"{MAX_EVENT_STREAMS} event streams are open already; close a page and try again",
                       code="too_many_streams", retry_after=10)
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                       "X-Accel-Buffering": "no"})
    await resp.prepare(request)

    async def send(kind: str, data: dict) -> None:
        await resp.write(f"event: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode())

    with rt.bus.subscribe() as queue:
        await send("status", await _snapshot(request))
        while True:
            event = None
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(STATUS_EVERY_S):
                    event = await queue.get()
            if event is None:
                await send("status", await _snapshot(request))
            else:
                await send(event.kind, event.data)
