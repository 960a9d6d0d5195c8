"""What every HTTP surface shares: errors in OpenAI's JSON shape, reading JSON bodies, the key checks, and the app
keys below the runtime. The routes of `api/` and of each subsystem (`usb.routes`, `peers.http`) are built on it."""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from .inference import InferenceError
from .settings import Settings
from .store import UnknownModel

log = logging.getLogger(__name__)

SETTINGS = web.AppKey("settings", Settings)
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
    log.exception("unhandled error", exc_info=e)
    return ApiError(500, "internal error; the daemon log has the details")


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


async def read_json(request: web.Request) -> dict:
    """The body as a JSON object, or a 400 saying what is wrong with it."""
    raw = await request.read()  # raises 413 past client_max_size
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    return body


def bearer(request: web.Request) -> bytes:
    return request.headers.get("Authorization", "").removeprefix("Bearer ").strip().encode()


@web.middleware
async def require_api_key(request: web.Request, handler) -> web.StreamResponse:
    """With an api_key configured, /v1/* and /api/* need it (or the admin key)."""
    settings = request.app[SETTINGS]
    if settings.api_key and request.path.startswith(("/v1/", "/api/")):
        given = bearer(request)
        keys = [k.encode() for k in (settings.api_key, settings.admin_key) if k]
        if not any(hmac.compare_digest(given, k) for k in keys):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")
    return await handler(request)


def require_admin(request: web.Request) -> None:
    """State-changing calls need the admin key when one is configured."""
    key = request.app[SETTINGS].admin_key
    if key and not hmac.compare_digest(bearer(request), key.encode()):
        raise ApiError(403, "this action needs the admin key: send 'Authorization: Bearer <admin key>'",
                       code="admin_key_required")
