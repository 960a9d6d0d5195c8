"""HTTP: upload, list, delete and search documents (`/api/v1/documents`). Uploads and deletes are admin actions
(web.scope_needed: every change under /api/ is); reading and searching need what reading the native API needs."""

from __future__ import annotations

from aiohttp import BodyPartReader, web

from ..jobs import JobBoard
from ..web import ApiError
from .records import DocumentError
from .search import METHODS
from .store import DocumentStore

DOCUMENTS = web.AppKey("documents", DocumentStore)
JOBS = web.AppKey("document_jobs", JobBoard)
KIND = "document-upload"  # a job per upload: its bytes advance as its chunks are embedded, so it has an ETA
CODES = {400: "invalid_document", 404: "document_not_found", 409: "document_exists", 413: "document_too_large",
         415: "unsupported_document", 507: "database_full"}
READ_CHUNK = 1 << 16


def _store(request: web.Request) -> DocumentStore:
    if (store := request.app.get(DOCUMENTS)) is None:
        raise ApiError(503, "documents are off on this box (documents.enabled = false)", code="documents_disabled")
    return store


def _api_error(e: DocumentError, param: str | None = None) -> ApiError:
    return ApiError(e.status, str(e), param=param, code=CODES.get(e.status))


async def _read_file(part: BodyPartReader, limit: int) -> bytes:
    data = bytearray()
    while chunk := await part.read_chunk(READ_CHUNK):
        data += chunk
        if len(data) > limit:
            what = repr(part.filename) if part.filename else f"part {part.name!r}"
            raise ApiError(413, f"{what} is over {limit:,} bytes, the most it may be (documents.max_upload_bytes for "
                           "a file)", param=part.name, code="document_too_large")
    return bytes(data)


async def upload(request: web.Request) -> web.Response:
    """multipart/form-data with `file` (the document) and `collection` (optional: "default")."""
    store = _store(request)
    limit = store.limits.max_upload_bytes
    if request.content_length is not None and request.content_length > limit + (64 << 10):
        raise ApiError(413, f"the upload is {request.content_length:,} bytes; one upload may be at most {limit:,} "
                       "(documents.max_upload_bytes)", param="file", code="document_too_large")
    if not request.content_type.startswith("multipart/"):
        raise ApiError(415, "send the document as multipart/form-data with a 'file' part and an optional "
                       "'collection' part", code="unsupported_media_type")
    collection: str | None = None
    filename, data = None, None
    reader = await request.multipart()
    while (part := await reader.next()) is not None:
        if not isinstance(part, BodyPartReader):
            raise ApiError(400, "nested multipart bodies are not read here", param="file")
        if part.name == "file" and data is None:
            filename, data = part.filename or "document.txt", await _read_file(part, limit)
        elif part.name == "collection":
            raw = await _read_file(part, 256)
            collection = raw.decode("utf-8", "replace").strip()
        else:
            await part.release()
    if data is None:
        raise ApiError(400, "the upload has no 'file' part", param="file")
    jobs = request.app[JOBS]
    job = jobs.start(KIND, f"upload from {request.remote}", filename, len(data))
    state, reason = "failed", "the upload ended before its document was kept"  # the client left, or the daemon stops
    try:
        document = await store.add(collection, filename, data,
                                   progress=lambda share: jobs.progress(job, int(share * len(data))))
        state, reason = "done", (f"into collection {document.collection!r} as document {document.id}: "
                                 f"{document.pages} page(s), {document.chunks} chunk(s)")
    except DocumentError as e:
        state, reason = ("skipped" if e.status == 409 else "failed"), str(e)
        raise _api_error(e, "file") from None
    except Exception as e:  # the embedding model busy or failing: the job says so, the client gets the error
        reason = f"{type(e).__name__}: {e}"
        raise
    finally:
        jobs.finish(job, state, reason)
    return web.json_response(document.to_dict(), status=201)


async def list_documents(request: web.Request) -> web.Response:
    store = _store(request)
    collection = request.query.get("collection") or None
    try:
        documents = await store.list(collection)
    except DocumentError as e:
        raise _api_error(e, "collection") from None
    return web.json_response({"documents": [d.to_dict() for d in documents],
                              "collections": await store.collections()})


def _document_id(request: web.Request) -> int:
    try:
        return int(request.match_info["id"])
    except ValueError:
        raise ApiError(404, "a document's id is a number", code="document_not_found") from None


async def get_document(request: web.Request) -> web.Response:
    try:
        return web.json_response((await _store(request).get(_document_id(request))).to_dict())
    except DocumentError as e:
        raise _api_error(e) from None


async def delete_document(request: web.Request) -> web.Response:
    try:
        document = await _store(request).delete(_document_id(request))
    except DocumentError as e:
        raise _api_error(e) from None
    return web.json_response({"deleted": document.to_dict()})


async def search(request: web.Request) -> web.Response:
    """?q=TEXT&collection=NAME[&top_k=N][&method=hybrid|vector|bm25]: the passages, best first."""
    store = _store(request)
    q = request.query.get("q", "")
    if not q.strip():
        raise ApiError(400, "say what to look for: ?q=TEXT", param="q")
    method = request.query.get("method", "hybrid")
    if method not in METHODS:
        raise ApiError(400, f"method is one of {', '.join(METHODS)}", param="method")
    try:
        top_k = int(request.query["top_k"]) if request.query.get("top_k") else None
    except ValueError:
        raise ApiError(400, "top_k is a whole number", param="top_k") from None
    if top_k is not None and not 1 <= top_k <= 50:
        raise ApiError(400, "top_k is from 1 to 50", param="top_k")
    try:
        passages = await store.search(q, request.query.get("collection") or None, top_k=top_k, method=method)
    except DocumentError as e:
        raise _api_error(e, "collection") from None
    return web.json_response({"passages": [p.to_dict() for p in passages]})


def setup_routes(app: web.Application, store: DocumentStore | None, jobs: JobBoard) -> None:
    if store is not None:
        app[DOCUMENTS] = store
    app[JOBS] = jobs
    app.router.add_post("/api/v1/documents", upload)
    app.router.add_get("/api/v1/documents", list_documents)
    app.router.add_get("/api/v1/documents/search", search)
    app.router.add_get("/api/v1/documents/{id}", get_document)
    app.router.add_delete("/api/v1/documents/{id}", delete_document)
