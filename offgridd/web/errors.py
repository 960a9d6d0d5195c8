"""Errors in OpenAI's JSON shape, rendered in one place, and reading a JSON body without being fooled by it."""

from __future__ import annotations

import json
import logging
import re

from aiohttp import web

from ..inference import InferenceError
from ..store import UnknownModel

log = logging.getLogger(__name__)


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
    if (err := mapped_error(e)) is not None:
        return err
    log.exception("unhandled error", exc_info=e)
    return ApiError(500, "internal error; the daemon log has the details")


def mapped_error(e: Exception) -> ApiError | None:
    """The HTTP error for what the layers below are known to raise; None for anything else (a bug)."""
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
