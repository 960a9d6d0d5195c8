"""Serve a request this node cannot take from the least busy peer that has the model, streaming as it comes."""

from __future__ import annotations

import logging

import aiohttp
import yarl
from aiohttp import web

from ..metrics import Metrics
from ..web import relay
from .exchange import ExchangeRefused
from .http import NODE_HEADER, fleet_call
from .protocol import DatagramRejected
from .service import PeerService

log = logging.getLogger(__name__)

HOP_HEADER = "X-Offgrid-Hop"  # set on a routed request: its receiver serves it or refuses it, never routes it on
VIA_HEADER = "X-Offgrid-Routed-Via"


async def route_to_peer(request: web.Request, model: str, *, service: PeerService, metrics: Metrics,
                        read_timeout: float) -> web.StreamResponse | None:
    """The peer's response, already sent to the client; None when no peer can take the request (web.ELSEWHERE)."""
    if service.identity is None or HOP_HEADER in request.headers:
        return None
    candidates = service.route_candidates(model)
    if not candidates:
        return None
    body = await request.read()  # aiohttp keeps the body it already read for the handler
    path = request.raw_path
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=3, sock_read=read_timeout)
    for i, peer in enumerate(candidates):
        try:
            # the client's Authorization goes only to a node that proved just now, at this address, that it is a member
            peer = await service.prove(peer)
        except (ExchangeRefused, DatagramRejected, aiohttp.ClientError, TimeoutError, OSError, ValueError) as e:
            log.warning("not routing %s to peer %s: it did not prove itself (%s)", model, peer.name,
                        e or type(e).__name__)
            continue
        headers, nonce = service.sign_call(peer, "POST", path, body)
        headers.update({"Content-Type": request.headers.get("Content-Type", "application/json"),
                        HOP_HEADER: service.identity.node_id})
        if "Authorization" in request.headers:  # a fleet behind an api_key shares that key
            headers["Authorization"] = request.headers["Authorization"]
        try:
            upstream = await service.session.post(yarl.URL(peer.url + path, encoded=True), data=body,
                                                   headers=headers, timeout=timeout)
        except (aiohttp.ClientError, TimeoutError) as e:
            log.warning("routing %s to peer %s failed: %s", model, peer.name, e or type(e).__name__)
            continue
        try:
            service.check_answer(upstream, node=peer.node, bound_to=nonce, dialed=peer.endpoint)
        except ExchangeRefused:
            upstream.release()
            continue
        try:
            if upstream.status in (404, 503) and i + 1 < len(candidates):
                continue  # it lost the model or is full too: the next peer may do
            metrics.routed.labels(peer.name).inc()
            log.info("routed a request for %s to peer %s (HTTP %s)", model, peer.name, upstream.status)
            headers = {NODE_HEADER: upstream.headers.get(NODE_HEADER, peer.node), VIA_HEADER: service.identity.node_id}
            return await relay(request, upstream, headers, f"peer {peer.name}")
        finally:
            upstream.release()
    return None


@web.middleware
async def verify_hop(request: web.Request, handler) -> web.StreamResponse:
    """A request another node routed here is served only when a member signed it for this start of this node, once."""
    if HOP_HEADER in request.headers and request.path.startswith("/v1/"):
        await fleet_call(request)
    return await handler(request)
