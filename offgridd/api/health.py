"""/health and /metrics: the status model rendered for monitors."""

from __future__ import annotations

import asyncio

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from .. import status
from .keys import RUNTIME


async def health(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    memory = await asyncio.get_running_loop().run_in_executor(None, status.memory, rt)
    report = status.report(rt, memory, await status.database(rt))
    return web.json_response(report, status=200 if rt.ready else 503)


async def metrics(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    rt.metrics.queue_depth.set(rt.inference.waiting)
    return web.Response(body=rt.metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})
