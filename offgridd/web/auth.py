"""Keys and scopes on every request (offgridd.keys), with refusals and admin actions in the audit log."""

from __future__ import annotations

from aiohttp import web

from ..audit import Audit
from ..keys import ApiKey, KeyRing
from .errors import ApiError, mapped_error

KEYS = web.AppKey("keys", KeyRing)
AUDIT = web.AppKey("audit", Audit)
KEY = web.RequestKey("key", ApiKey)  # the key a request came with, when it came with one
LOOPBACK = ("127.0.0.1", "::1", "::ffff:127.0.0.1")
ADMIN_READS = ("/api/v1/audit", "/api/v1/keys")  # reading these needs an admin key too
CHAT_WRITES = ("/api/v1/conversations",)  # a chat key's own data: it may change it


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
        outcome = str(err.status) if (err := mapped_error(e)) is not None else "error"
        raise
    finally:
        audit.record(action, outcome, key.name if key else "(this box)", client)


def charge(request: web.Request, tokens: int) -> None:
    """Count a finished request's tokens against the minute of the key it came with."""
    if (key := request.get(KEY)) is not None:
        request.app[KEYS].charge(key, tokens)
