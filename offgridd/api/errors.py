"""Errors in OpenAI's JSON shape, rendered in one place."""

from __future__ import annotations

import logging

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
