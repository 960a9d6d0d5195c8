"""HTTP surfaces of the peers subsystem: /api/v1/peers for people, /fleet/v1/* for peers (signed with the fleet key)."""

from __future__ import annotations

from aiohttp import web

from ..api.errors import ApiError
from ..api.keys import RUNTIME
from ..runtime import Runtime
from ..store.store import SHA256_RE
from .fleet import FLEET_HEADER, FleetKeyError, verify_request
from .protocol import inventory_digest
from .service import BLOB_PATH, INVENTORY_PATH, PeerService

NODE_HEADER = "X-Offgrid-Node"  # the node that served a response: routing keeps the peer's
SEND_BLOCK = 1 << 20


def peer_service(rt: Runtime) -> PeerService | None:
    return next((s for s in rt.services if isinstance(s, PeerService)), None)


async def list_peers(request: web.Request) -> web.Response:
    service = peer_service(request.app[RUNTIME])
    if service is None:
        return web.json_response({"enabled": False, "node": None, "peers": []})
    return web.json_response({"enabled": True, "node": service.describe(),
                              "peers": [p.to_dict() for p in service.peers_by_load()]})


def _member(request: web.Request) -> PeerService:
    service = peer_service(request.app[RUNTIME])
    if service is None or service.identity is None:
        raise ApiError(404, "peers are disabled on this node", code="peers_disabled")
    try:
        verify_request(service.identity.fleet_key, request.headers.get(FLEET_HEADER, ""), request.method,
                       request.path, service.http_guard)
    except FleetKeyError as e:
        raise ApiError(403, f"not a member of this fleet: {e}", code="fleet_key_mismatch") from None
    return service


async def inventory(request: web.Request) -> web.Response:
    service = _member(request)
    rt = service.rt
    manifests = await request.app.loop.run_in_executor(None, rt.store.list)
    return web.json_response({
        "node": service.identity.node_id, "name": service.identity.name,
        "inventory": inventory_digest((m.name, m.sha256) for m in manifests),
        "models": [{"name": m.name, "sha256": m.sha256, "size": m.size, "architecture": m.architecture,
                    "quantization": m.quantization, "context_length": m.context_length, "license": m.license}
                   for m in manifests],
        "load": rt.active, "queue": rt.pool.waiting,
    })


async def blob(request: web.Request) -> web.StreamResponse:
    """A committed model's bytes, with HTTP Range for resuming; only digests a manifest names are served."""
    service = _member(request)
    sha = request.match_info["sha256"]
    manifests = await request.app.loop.run_in_executor(None, service.rt.store.list) if SHA256_RE.fullmatch(sha) else []
    if not any(m.sha256 == sha for m in manifests):
        raise ApiError(404, f"no model with sha256 {sha[:64]!r} on this node", code="blob_not_found")
    return web.FileResponse(service.rt.store.blob_path(sha), chunk_size=SEND_BLOCK)


async def _tag_response(request: web.Request, response: web.StreamResponse) -> None:
    service = peer_service(request.app[RUNTIME])
    if service is not None and service.identity is not None and NODE_HEADER not in response.headers:
        response.headers[NODE_HEADER] = service.identity.node_id


def setup_routes(app: web.Application) -> None:
    app.router.add_get("/api/v1/peers", list_peers)
    app.router.add_get(INVENTORY_PATH, inventory)
    app.router.add_get(BLOB_PATH + "{sha256}", blob)
    app.on_response_prepare.append(_tag_response)
