"""Fallback upstreams (`[[upstreams]]`): an OpenAI-compatible server that may answer a request neither this box nor a
peer can serve. Off unless configured: the box is offline by design, and with no entry nothing here ever opens a
socket. Registered after the peers under web.ELSEWHERE, so the LAN is always asked first."""

from __future__ import annotations

import fnmatch
import logging

import aiohttp
import yarl
from aiohttp import web

from .metrics import Metrics
from .settings import UpstreamSettings
from .web import ELSEWHERE, relay

log = logging.getLogger(__name__)

UPSTREAM_HEADER = "X-Offgrid-Upstream"  # on a response an upstream gave: which one


def may_serve(upstream: UpstreamSettings, model: str) -> bool:
    return any(fnmatch.fnmatchcase(model, pattern) for pattern in upstream.models)


class Upstreams:
    def __init__(self, entries: list[UpstreamSettings], metrics: Metrics, read_timeout: float):
        self.entries, self.metrics = entries, metrics
        self.timeout = aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=read_timeout)
        self._session: aiohttp.ClientSession | None = None

    async def route(self, request: web.Request, model: str) -> web.StreamResponse | None:
        """The first upstream that may serve `model` and answers; None when none does."""
        if not request.path.startswith("/v1/"):
            return None
        body = await request.read()  # aiohttp keeps the body the handler already read
        for upstream in (u for u in self.entries if may_serve(u, model)):
            url = yarl.URL(upstream.url.rstrip("/") + request.raw_path.removeprefix("/v1"), encoded=True)
            headers = {"Content-Type": "application/json", "Accept": request.headers.get("Accept", "*/*")}
            if upstream.key:
                headers["Authorization"] = f"Bearer {upstream.key}"
            self._session = self._session or aiohttp.ClientSession()
            try:
                answer = await self._session.post(url, data=body, headers=headers, timeout=self.timeout)
            except (aiohttp.ClientError, TimeoutError) as e:
                log.warning("upstream %s did not answer for %s: %s", upstream.url, model, e or type(e).__name__)
                continue
            try:
                self.metrics.routed.labels(f"upstream {url.host}").inc()
                log.info("a request for %s went to upstream %s (HTTP %s)", model, upstream.url, answer.status)
                return await relay(request, answer, {UPSTREAM_HEADER: upstream.url}, f"upstream {upstream.url}")
            finally:
                answer.release()
        return None

    async def close(self, _app: web.Application | None = None) -> None:
        if self._session is not None:
            await self._session.close()


def setup_routes(app: web.Application, entries: list[UpstreamSettings], metrics: Metrics, read_timeout: float) -> None:
    if entries:
        upstreams = Upstreams(entries, metrics, read_timeout)
        app.setdefault(ELSEWHERE, []).append(upstreams.route)
        app.on_cleanup.append(upstreams.close)
