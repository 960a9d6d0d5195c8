"""The HTTP application: the API's routes, the routes each subsystem contributes, and the middlewares every request
passes through."""

from __future__ import annotations

from aiohttp import web

from .. import ui, upstreams
from ..documents import routes as documents
from ..history import routes as history
from ..peers import routes as peers
from ..runtime import Runtime
from ..usb import routes as usb
from ..voice import routes as voice
from ..web import AUDIT, HOSTS, KEYS, SETTINGS, Cors, HostNames, authorize, check_host, error_middleware
from . import admin, health, native, openai, responses
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


def setup_routes(app: web.Application) -> None:
    app.router.add_get("/health", health.health)
    app.router.add_get("/metrics", health.metrics)
    app.router.add_get("/api/v1/status", native.status)
    app.router.add_get("/api/v1/models", native.list_models)
    app.router.add_delete("/api/v1/models/{name}", native.delete_model)
    app.router.add_get("/api/v1/jobs", native.list_jobs)
    app.router.add_get("/api/v1/events", native.events)
    app.router.add_get("/api/v1/keys", admin.list_keys)
    app.router.add_post("/api/v1/keys", admin.add_key)
    app.router.add_delete("/api/v1/keys/{name}", admin.revoke_key)
    app.router.add_get("/api/v1/audit", admin.audit)
    app.router.add_get("/v1/models", openai.list_models)
    app.router.add_get("/v1/models/{name}", openai.get_model)
    app.router.add_post("/v1/chat/completions", openai.chat_completions)
    app.router.add_post("/v1/completions", openai.completions)
    app.router.add_post("/v1/embeddings", openai.embeddings)
    app.router.add_post("/v1/responses", responses.create_response)


def init_app(rt: Runtime) -> web.Application:
    middlewares = [count_requests, error_middleware, check_host, authorize]
    if rt.settings.cors_origins:
        cors = Cors(rt.settings.cors_origins)
        middlewares.insert(3, cors.preflight)
    app = web.Application(client_max_size=rt.settings.max_body_bytes, middlewares=middlewares)
    if rt.settings.cors_origins:
        app.on_response_prepare.append(cors.mark)
    app[RUNTIME] = rt
    app[SETTINGS] = rt.settings
    app[KEYS] = rt.keys
    app[HOSTS] = HostNames(rt.settings.allowed_hosts)
    app[AUDIT] = rt.audit
    setup_routes(app)
    usb.setup_routes(app, rt.usb)
    history.setup_routes(app, rt.history)
    peers.setup_routes(app, rt.peers, rt.metrics, read_timeout=rt.settings.worker_start_timeout)
    upstreams.setup_routes(app, rt.settings.upstreams, rt.metrics, read_timeout=rt.settings.worker_start_timeout)
    voice.setup_routes(app, rt.voice)
    documents.setup_routes(app, rt.documents, rt.jobs)
    ui.setup_routes(app)
    return app
