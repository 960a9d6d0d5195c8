"""The edge of the LAN: the names the box answers to, browser origins allowed to call it, and how many connections one
address may hold."""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections import Counter

from aiohttp import web

from .errors import ApiError

log = logging.getLogger(__name__)


class HostNames:
    """The names this box answers to: IP literals (which no DNS rebinding can borrow), localhost, its host name with
    and without .local, any *.local (mDNS stays on the LAN), and the configured `allowed_hosts`. A web page that
    rebinds a name of its own to the box's address sends that name, and is refused."""

    def __init__(self, allowed: list[str]):
        me = socket.gethostname().lower()
        self.names = {"localhost", me, f"{me}.local", *(h.lower().rstrip(".") for h in allowed)}

    def allows(self, host: str) -> bool:
        host = host.strip().lower()
        if not host:
            return True  # HTTP/1.0 without Host: nothing a browser sends
        name = host[1:host.find("]")] if host.startswith("[") else host.rpartition(":")[0] if host.count(":") == 1 \
            else host
        name = name.rstrip(".")
        try:
            ipaddress.ip_address(name)
            return True
        except ValueError:
            return name in self.names or name.endswith(".local")


HOSTS = web.AppKey("hosts", HostNames)


@web.middleware
async def check_host(request: web.Request, handler) -> web.StreamResponse:
    if not request.app[HOSTS].allows(request.headers.get("Host", "")):
        raise ApiError(421, "this box does not answer to that name; use its address or name.local, or add the name "
                       "to 'allowed_hosts' in its config", code="misdirected_request")
    return await handler(request)


class Cors:
    """Browser origins allowed to call the API (`cors_origins`; "*" for any): off unless configured. Preflights
    are answered before keys are asked for (browsers send none); every answer to an allowed origin, streamed or not,
    says so."""

    METHODS = "GET, POST, PATCH, DELETE, OPTIONS"

    def __init__(self, origins: list[str]):
        self.origins = {o.rstrip("/") for o in origins}

    def allows(self, origin: str | None) -> bool:
        return bool(origin) and ("*" in self.origins or origin in self.origins)

    @web.middleware
    async def preflight(self, request: web.Request, handler) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers and self.allows(origin):
            return web.Response(status=204, headers={
                "Access-Control-Allow-Methods": self.METHODS, "Access-Control-Max-Age": "600",
                "Access-Control-Allow-Headers": "Authorization, Content-Type"})
        return await handler(request)

    async def mark(self, request: web.Request, response: web.StreamResponse) -> None:
        """on_response_prepare: before the headers go, so streamed answers are marked too."""
        origin = request.headers.get("Origin")
        if self.allows(origin):
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Access-Control-Expose-Headers"] = "Retry-After, X-Offgrid-Node"
            response.headers.add("Vary", "Origin")


def limit_connections(server, per_client: int, total: int) -> None:
    """Bound the connections aiohttp's server keeps open, in all and from one address, so idle sockets from one host
    cannot take every file descriptor: a connection over a bound is closed as it arrives."""
    made, lost = server.connection_made, server.connection_lost
    clients: Counter[str] = Counter()
    address_of: dict[object, str] = {}

    def connection_made(handler, transport) -> None:
        peer = transport.get_extra_info("peername")
        address = peer[0] if isinstance(peer, tuple) else "local"
        if clients[address] >= per_client or len(address_of) >= total:
            log.warning("refused a connection from %s: %d open from there, %d in all", address, clients[address],
                        len(address_of))
            transport.abort()
            return
        clients[address] += 1
        address_of[handler] = address
        made(handler, transport)

    def connection_lost(handler, exc=None) -> None:
        if (address := address_of.pop(handler, None)) is not None:
            clients[address] -= 1
            if not clients[address]:
                del clients[address]
        lost(handler, exc)

    server.connection_made, server.connection_lost = connection_made, connection_lost
