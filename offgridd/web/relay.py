"""Places a request this node cannot serve may go (web.ELSEWHERE), and relaying their answer to our client."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import aiohttp
from aiohttp import web

log = logging.getLogger(__name__)

# Where a request this node cannot serve (no such model here, or too busy) may go instead: each is asked in turn
# with the already parsed model name, and answers with the response it sent, or None. Peers register one.
Elsewhere = Callable[[web.Request, str], Awaitable[web.StreamResponse | None]]
ELSEWHERE = web.AppKey("elsewhere", list[Elsewhere])


RELAYED = ("Content-Type", "Cache-Control", "Retry-After", "X-Accel-Buffering")


async def relay(request: web.Request, answer: aiohttp.ClientResponse, headers: dict[str, str], source: str
                ) -> web.StreamResponse:
    """Stream another server's answer to our client as it comes (SSE included), with its status and the headers
    that matter; if that server stops in the middle, the client's stream ends there."""
    response = web.StreamResponse(status=answer.status, reason=answer.reason,
                                  headers={**{k: answer.headers[k] for k in RELAYED if k in answer.headers}, **headers})
    await response.prepare(request)
    try:
        async for chunk in answer.content.iter_any():
            await response.write(chunk)
    except (aiohttp.ClientError, TimeoutError) as e:
        log.warning("%s stopped in the middle of a response: %s", source, e or type(e).__name__)
        return response
    await response.write_eof()
    return response
