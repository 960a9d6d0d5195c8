"""What every HTTP surface shares: errors in OpenAI's JSON shape, reading JSON bodies, the key checks, and the app
keys below the runtime. The routes of `api/` and of each subsystem (`usb.routes`, `peers.http`) are built on it."""

from __future__ import annotations

import ipaddress
import json
import logging
import re
import socket
from collections import Counter
from collections.abc import Awaitable, Callable

import aiohttp
from aiohttp import web

from .audit import Audit
from .inference import InferenceError
from .keys import ApiKey, KeyRing
from .settings import Settings
from .store import UnknownModel

log = logging.getLogger(__name__)

SETTINGS = web.AppKey("settings", Settings)
KEYS = web.AppKey("keys", KeyRing)
AUDIT = web.AppKey("audit", Audit)
KEY = web.RequestKey("key", ApiKey)  # the key a request came with, when it came with one
LOOPBACK = ("127.0.0.1", "::1", "::ffff:127.0.0.1")
ADMIN_READS = ("/api/v1/audit", "/api/v1/keys")  # reading these needs an admin key too
CHAT_WRITES = ("/api/v1/conversations",)  # a chat key's own data: it may change it
# Where a request this node cannot serve (no such model here, or too busy) may go instead: each is asked in turn
# with the already parsed model name, and answers with the response it sent, or None. Peers register one.
Elsewhere = Callable[[web.Request, str], Awaitable[web.StreamResponse | None]]
ELSEWHERE = web.AppKey("elsewhere", list[Elsewhere])


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 retry_after: float | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.retry_after = status, message, param, code, retry_after


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    kind = "server_error" if status >= 500 else "invalid_request_error"
    if status == 401:
        kind = "authentication_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(status: int, message: str, *, param: str | None = None, code: str | None = None,
                   retry_after: float | None = None) -> web.Response:
    headers = {"Retry-After": str(max(1, round(retry_after)))} if retry_after is not None else None
    return web.json_response(error_body(status, message, param, code), status=status, headers=headers)


def as_api_error(e: Exception) -> ApiError:
    """Map what the layers below raise to the HTTP error a client should see."""
    if (err := _known(e)) is not None:
        return err
    log.exception("unhandled error", exc_info=e)
    return ApiError(500, "internal error; the daemon log has the details")


def _known(e: Exception) -> ApiError | None:
    if isinstance(e, ApiError):
        return e
    if isinstance(e, UnknownModel):
        return ApiError(404, f"{e}; GET /v1/models lists the models in the store", param="model",
                        code="model_not_found")
    if isinstance(e, InferenceError):
        return ApiError(e.status, str(e), retry_after=e.retry_after)
    if isinstance(e, web.HTTPException):
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(e.status)
        message = e.text if e.text and not e.text.startswith(f"{e.status}:") else e.reason
        if e.status == 413:
            message = "request body is over the size limit"
        return ApiError(e.status, message, code=code)
    return None


@web.middleware
async def error_middleware(request: web.Request, handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        err = as_api_error(e)
    except Exception as e:
        err = as_api_error(e)
    return error_response(err.status, err.message, param=err.param, code=err.code, retry_after=err.retry_after)


MAX_JSON_VALUES = 20_000  # objects, arrays and the values in them, counted before a body is parsed
_STRINGS = re.compile(rb'"(?:[^"\\]|\\.)*"')


async def read_json(request: web.Request) -> dict:
    """The body as a JSON object, or a 4xx saying what is wrong with it: not declared as JSON (415; a browser's
    cross-site form post cannot declare it), over the size limit (413), too many values (413, counted on the raw
    bytes before any Python object is made), or not a JSON object (400)."""
    if request.content_type != "application/json":
        raise ApiError(415, f"send the body as JSON with 'Content-Type: application/json' (got "
                       f"{request.content_type!r})", code="unsupported_media_type")
    raw = await request.read()  # raises 413 past client_max_size
    bare = _STRINGS.sub(b'""', raw)
    if bare.count(b",") + bare.count(b"[") + bare.count(b"{") > MAX_JSON_VALUES:
        raise ApiError(413, f"the body holds more than {MAX_JSON_VALUES} JSON values", code="request_too_large")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise ApiError(400, f"request body is not valid JSON: {str(e)[:200]}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    return body


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


def bearer(request: web.Request) -> bytes:
    """The bearer token as bytes; a header that is not UTF-8 is compared as the bytes it was."""
    return request.headers.get("Authorization", "").removeprefix("Bearer ").strip().encode("utf-8", "surrogateescape")


def scope_needed(request: web.Request) -> str | None:
    """None for what anyone on the LAN may reach (/health, /metrics, the UI, /fleet/*, which peers sign), "chat" for
    the API and reading the native API, "admin" for every change and for the audit log and keys."""
    path = request.path
    if path.startswith("/v1/"):
        return "chat"
    if path.startswith(CHAT_WRITES):
        return "chat"
    if path.startswith("/api/"):
        return "chat" if request.method in ("GET", "HEAD") and not path.startswith(ADMIN_READS) else "admin"
    return None


@web.middleware
async def authorize(request: web.Request, handler) -> web.StreamResponse:
    """Keys and scopes (offgridd.keys): a wrong key is a 401, a missing scope a 403, a key over its limits a 429;
    each refusal and every admin action goes to the audit log. With no admin key anywhere, admin actions are taken
    from the box itself only."""
    needs = scope_needed(request)
    if needs is None:
        return await handler(request)
    keys, audit, client = request.app[KEYS], request.app[AUDIT], request.remote
    action = f"{request.method} {request.path[:200]}"
    given = bearer(request)
    key = await keys.lookup(given) if given else None
    open_chat = needs == "chat" and not await keys.chat_needs_key()
    if given and key is None and not open_chat:  # where the API is open, clients' placeholder keys are ignored
        audit.refused(action, "refused: unknown key", client)
        raise ApiError(401, "wrong API key: send 'Authorization: Bearer <key>' with a key this box knows",
                       code="invalid_api_key")
    if key is None and not given and needs == "chat" and not open_chat:
        audit.refused(action, "refused: no key", client)
        raise ApiError(401, "missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
    if needs == "admin" and not (key is not None and key.admin):
        if key is None and client in LOOPBACK and not await keys.has_admin():
            key = None  # the box itself, while no admin key exists
        else:
            audit.refused(action, "refused: needs an admin key", client, key.name if key else None)
            how = "" if await keys.has_admin() else (
                "; none exists yet: on the box run 'offgridd keys add NAME --scope admin', or act from the box itself")
            raise ApiError(403, f"this action needs an admin key: send 'Authorization: Bearer <admin key>'{how}",
                           code="admin_key_required")
    if key is not None and (wait := keys.admit(key)) > 0:
        audit.refused(action, "refused: over its limit", client, key.name)
        raise ApiError(429, f"key {key.name!r} is over its limit ({key.rpm or '-'} requests, {key.tpm or '-'} tokens "
                       "a minute); try again later", code="rate_limit_exceeded", retry_after=wait)
    if key is not None:
        request[KEY] = key
    if needs != "admin":
        return await handler(request)
    outcome = "error"
    try:
        response = await handler(request)
        outcome = str(response.status)
        return response
    except Exception as e:
        outcome = str(err.status) if (err := _known(e)) is not None else "error"
        raise
    finally:
        audit.record(action, outcome, key.name if key else "(this box)", client)


def charge(request: web.Request, tokens: int) -> None:
    """Count a finished request's tokens against the minute of the key it came with."""
    if (key := request.get(KEY)) is not None:
        request.app[KEYS].charge(key, tokens)


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
