"""The HTTP surfaces the peers subsystem adds to the app: its endpoints, the check on routed requests, and routing
to peers as a place a request may go when this node cannot serve it."""

from __future__ import annotations

import functools

from aiohttp import web

from ..metrics import Metrics
from ..web import ELSEWHERE
from . import http
from .routing import route_to_peer, verify_hop
from .service import PeerService


def setup_routes(app: web.Application, service: PeerService | None, metrics: Metrics, read_timeout: float) -> None:
    http.setup_routes(app, service)
    if service is not None:
        app.middlewares.append(verify_hop)
        app.setdefault(ELSEWHERE, []).append(
            functools.partial(route_to_peer, service=service, metrics=metrics, read_timeout=read_timeout))
