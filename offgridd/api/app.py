"""The HTTP application: routes and the middlewares every request passes through."""

from __future__ import annotations

import hmac

from aiohttp import web

from ..peers import setup_routes as setup_peer_routes
from ..runtime import Runtime
from ..ui import setup_ui
from ..usb import routes as usb
from . import health, native, openai
from .errors import ApiError, error_middleware
from .keys import RUNTIME


@web.middleware
async def count_requests(request: web.Request, handler) -> web.StreamResponse:
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as e:
        status = e.status
        raise
    finally:
        route = request.match_info.route.resource
        label = route.canonical if route is not None else "unmatched"
        request.app[RUNTIME].metrics.requests.labels(label, str(status)).inc()


@web.middleware
async def require_api_key(request: web.Request, handler) -> web.StreamResponse:
    settings = request.app[RUNTIME].settings
    if settings.api_key and request.path.startswith(("/v1/", "/api/")):
        given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip().encode()
        keys = [k.encode() for k in (settings.api_key, settings.admin_key) if k]
        if not any(hmac.compare_digest(given, k) for k in keys):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")
    return await handler(request)


def setup_routes(app: web.Application) -> None:
    app.router.add_get("/health", health.health)
    app.router.add_get("/metrics", health.metrics)
    app.router.add_get("/api/v1/status", native.status)
    app.router.add_get("/api/v1/models", native.list_models)
    app.router.add_delete("/api/v1/models/{name}", native.delete_model)
    app.router.add_get("/api/v1/jobs", native.list_jobs)
    app.router.add_get("/api/v1/events", native.events)
    app.router.add_get("/api/v1/usb", usb.usb_status)
    app.router.add_post("/api/v1/usb/import", usb.usb_import)
    app.router.add_get("/v1/models", openai.list_models)
    app.router.add_get("/v1/models/{name}", openai.get_model)
    app.router.add_post("/v1/chat/completions", openai.chat_completions)
    app.router.add_post("/v1/completions", openai.completions)
    app.router.add_post("/v1/embeddings", openai.embeddings)
    setup_peer_routes(app)
    setup_ui(app)


def init_app(rt: Runtime) -> web.Application:
    app = web.Application(client_max_size=rt.settings.max_body_bytes,
                          middlewares=[count_requests, error_middleware, require_api_key])
    app[RUNTIME] = rt
    setup_routes(app)
    return app
