"""HTTP surfaces of the peers subsystem: /api/v1/peers for people, /fleet/v2/* for peers (signed with the fleet key)."""

from __future__ import annotations

import asyncio

from aiohttp import web

from ..documents import DocumentError, DocumentNotFound
from ..documents.records import check_collection
from ..store import SHA256_RE
from ..web import ApiError, read_json
from .collections import COLLECTION_PATH, DOCUMENT_PATH, PullError, pull_collection
from .exchange import (
    ANSWER_HEADER,
    BLOB_PATH,
    CHALLENGE_HEADER,
    HELLO_PATH,
    INVENTORY_PATH,
    REQUEST_HEADER,
    ExchangeRefused,
    FleetCall,
    digest,
    endpoint,
    sign_answer,
    valid_challenge,
    verify_request,
)
from .service import PeerService

NODE_HEADER = "X-Offgrid-Node"  # the node that served a response: routing keeps the peer's
SEND_BLOCK = 1 << 20
# the nonce (or challenge) this request's answer is bound to, set once the request is known to be a fleet call
ANSWER_TO = web.RequestKey("offgridd_fleet_answer_to", str)
PEERS = web.AppKey("peers", PeerService)


def peer_service(app: web.Application) -> PeerService | None:
    return app.get(PEERS)


async def list_peers(request: web.Request) -> web.Response:
    service = peer_service(request.app)
    if service is None:
        return web.json_response({"enabled": False, "node": None, "peers": []})
    return web.json_response({"enabled": True, "node": service.describe(),
                              "peers": [p.to_dict() for p in service.peers_by_load()]})


def _local(request: web.Request) -> str:
    """The address and port this connection arrived at, which no relay can choose."""
    sockname = request.transport.get_extra_info("sockname") if request.transport is not None else None
    return endpoint(sockname[0], sockname[1]) if sockname else ""


async def fleet_call(request: web.Request) -> tuple[PeerService, FleetCall]:
    """The verified call of a fleet member, or 403 saying why it is refused (counted by reason)."""
    service = peer_service(request.app)
    if service is None or service.identity is None:
        raise ApiError(404, "peers are disabled on this node", code="peers_disabled")
    header = request.headers.get(REQUEST_HEADER, "")
    parts = header.split(" ")
    if len(parts) == 8 and len(parts[6]) == 24:
        request[ANSWER_TO] = parts[6]  # even a refusal is signed, so a member knows it is this node refusing
    body = await request.read() if request.can_read_body else b""
    try:
        call = verify_request(service.key(), header, me=service.identity.node_id, my_boot=service.boot,
                              method=request.method, path=request.raw_path, local=_local(request),
                              body_digest=digest(body), window=service.window)
    except ExchangeRefused as e:
        service.refusals.labels(e.reason).inc()
        raise ApiError(403, f"not a call from this fleet: {e}", code="fleet_key_mismatch") from None
    return service, call


async def hello(request: web.Request) -> web.Response:
    """Anyone may challenge this node; the answer proves, to members only, that this node holds the key here."""
    service = peer_service(request.app)
    challenge = request.headers.get(CHALLENGE_HEADER, "")
    if service is None or service.identity is None:
        raise ApiError(404, "peers are disabled on this node", code="peers_disabled")
    if not valid_challenge(challenge):
        raise ApiError(400, f"{CHALLENGE_HEADER} must be 32 hex digits", code="bad_challenge")
    request[ANSWER_TO] = challenge
    return web.json_response(service.announcement().body())


async def inventory(request: web.Request) -> web.Response:
    service, _ = await fleet_call(request)
    manifests, collections = await service.refresh()
    load, queue = service.load()
    return web.json_response({
        "node": service.identity.node_id, "name": service.identity.name,
        "inventory": service.digest,
        "models": [{"name": m.name, "kind": m.kind, "sha256": m.sha256, "size": m.size, "architecture": m.architecture,
                    "quantization": m.quantization, "context_length": m.context_length, "license": m.license}
                   for m in manifests],
        "collections": [{"name": c["name"], "documents": c["documents"]} for c in collections],
        "load": load, "queue": queue,
    })


def _documents(service: PeerService):
    if service.documents is None:
        raise ApiError(404, "documents are off on this node", code="documents_disabled")
    return service.documents


async def collection(request: web.Request) -> web.Response:
    """A collection's documents, for a member to pull: ids, file names, sizes and sha256s."""
    service, _ = await fleet_call(request)
    try:
        documents = await _documents(service).list(check_collection(request.match_info["name"]))
    except DocumentError as e:
        raise ApiError(e.status, str(e), code="invalid_collection") from None
    return web.json_response({"documents": [d.to_dict() for d in documents]})


async def document(request: web.Request) -> web.Response:
    """One document as share.py packs it: its chunks' pages, texts and vectors (the file itself is not kept)."""
    service, _ = await fleet_call(request)
    try:
        data = await _documents(service).export(int(request.match_info["id"]))
    except (ValueError, DocumentNotFound):
        raise ApiError(404, "no such document on this node", code="document_not_found") from None
    return web.Response(body=data, content_type="application/x-msgpack")


async def pull(request: web.Request) -> web.Response:
    """`POST /api/v1/documents/pull {"peer", "collection", "into"?}`: a peer's collection, verified, into this box's
    (the same name unless `into`); answers the report once every document is done, skipped or failed."""
    service = peer_service(request.app)
    if service is None or service.identity is None:
        raise ApiError(404, "peers are disabled on this node", code="peers_disabled")
    if service.documents is None:
        raise ApiError(503, "documents are off on this box (documents.enabled = false)", code="documents_disabled")
    body = await read_json(request)
    try:
        name, into = check_collection(body.get("collection")), body.get("into")
        into = check_collection(into) if into is not None else None
    except DocumentError as e:
        raise ApiError(400, str(e), param="collection") from None
    peer = service.find(body.get("peer")) if isinstance(body.get("peer"), str) else None
    if peer is None:
        raise ApiError(404, f"no live peer named {str(body.get('peer'))[:80]!r}; GET /api/v1/peers lists them",
                       param="peer", code="peer_not_found")
    try:
        report = await pull_collection(service.fetch, service.jobs, service.documents, peer, name, into)
    except PullError as e:
        raise ApiError(502, str(e), code="peer_refused") from None
    return web.json_response(report.to_dict())


async def blob(request: web.Request) -> web.StreamResponse:
    """A committed model's bytes, with HTTP Range for resuming; only digests a manifest names are served."""
    service, _ = await fleet_call(request)
    sha = request.match_info["sha256"]
    known = SHA256_RE.fullmatch(sha)
    manifests = await asyncio.get_running_loop().run_in_executor(None, service.store.list) if known else []
    if not any(m.sha256 == sha for m in manifests):
        raise ApiError(404, f"no model with sha256 {sha[:64]!r} on this node", code="blob_not_found")
    return web.FileResponse(service.store.blob_path(sha), chunk_size=SEND_BLOCK)


async def _sign_response(request: web.Request, response: web.StreamResponse) -> None:
    """Every response names its node; an answer to a fleet call or a challenge is signed, bound to that request."""
    service = peer_service(request.app)
    if service is None or service.identity is None:
        return
    response.headers.setdefault(NODE_HEADER, service.identity.node_id)
    bound_to = request.get(ANSWER_TO)
    if bound_to is None:
        return
    body = response.body if isinstance(response, web.Response) and isinstance(response.body, bytes) else None
    response.headers[ANSWER_HEADER] = sign_answer(
        service.key(), node=service.identity.node_id, bound_to=bound_to, local=_local(request),
        status=response.status, content_type=response.content_type,
        content_range=response.headers.get("Content-Range", ""), body_digest=digest(body) if body is not None else None)


def setup_routes(app: web.Application, service: PeerService | None) -> None:
    if service is not None:
        app[PEERS] = service
    app.router.add_get("/api/v1/peers", list_peers)
    app.router.add_get(HELLO_PATH, hello)
    app.router.add_get(INVENTORY_PATH, inventory)
    app.router.add_get(BLOB_PATH + "{sha256}", blob)
    app.router.add_get(COLLECTION_PATH + "{name}", collection)
    app.router.add_get(DOCUMENT_PATH + "{id}", document)
    app.router.add_post("/api/v1/documents/pull", pull)
    app.on_response_prepare.append(_sign_response)
