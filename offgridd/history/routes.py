"""HTTP: conversations on the box under /api/v1/conversations, for the UI and any client with a key. Each key sees
its own conversations (no key: the box's shared ones); the command line on the box sees all of them."""

from __future__ import annotations

import functools

from aiohttp import web

from ..web import KEY, ApiError, read_json
from . import ConversationNotFound, ConversationStore, HistoryError, HistoryFull, parse_page, render_export

HISTORY = web.AppKey("history", ConversationStore)
CONVERSATION_HEADER = "X-Offgrid-Conversation"  # a chat request that sends it ("new" or an id) is kept


def owner_of(request: web.Request) -> str | None:
    key = request.get(KEY)
    return key.name if key is not None else None


def _store(request: web.Request) -> ConversationStore:
    if (store := request.app.get(HISTORY)) is None:
        raise ApiError(503, "conversation history is off on this box (history.enabled = false)",
                       code="history_disabled")
    return store


def answers(handler):
    """History's errors as HTTP: not found (another key's conversation too) 404, bad input 400, the card's bound 507."""

    @functools.wraps(handler)
    async def handle(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request, _store(request), owner_of(request))
        except ConversationNotFound as e:
            raise ApiError(404, str(e), code="conversation_not_found") from None
        except HistoryFull as e:
            raise ApiError(507, str(e), code="history_full") from None
        except HistoryError as e:
            raise ApiError(400, str(e), code="invalid_history") from None

    return handle


def _text(body: dict, name: str, required: bool = True) -> str | None:
    value = body.get(name)
    if (value is None and required) or (value is not None and not isinstance(value, str)):
        raise ApiError(400, f"'{name}' must be a string", param=name)
    return value


@answers
async def list_conversations(request: web.Request, store: ConversationStore, owner) -> web.Response:
    limit, offset = parse_page(request.query.get("limit"), request.query.get("offset"))
    return web.json_response((await store.list(owner=owner, limit=limit, offset=offset)).to_dict())


@answers
async def create(request: web.Request, store: ConversationStore, owner) -> web.Response:
    body = await read_json(request)
    title, model = _text(body, "title", False), _text(body, "model", False)
    conversation = await store.create(owner=owner, model=model or "", source="ui",
                                      **({"title": title} if title else {}))
    return web.json_response(conversation.to_dict(), status=201)


@answers
async def show(request: web.Request, store: ConversationStore, owner) -> web.Response:
    return web.json_response((await store.get(request.match_info["id"], owner=owner)).to_dict())


@answers
async def rename(request: web.Request, store: ConversationStore, owner) -> web.Response:
    title = _text(await read_json(request), "title")
    return web.json_response((await store.rename(request.match_info["id"], title, owner=owner)).to_dict())


@answers
async def delete(request: web.Request, store: ConversationStore, owner) -> web.Response:
    removed = await store.delete(request.match_info["id"], owner=owner)
    return web.json_response({"deleted": request.match_info["id"], "messages": removed})


@answers
async def append(request: web.Request, store: ConversationStore, owner) -> web.Response:
    body = await read_json(request)
    tokens = {k: body[k] for k in ("prompt_tokens", "completion_tokens") if isinstance(body.get(k), int)}
    message = await store.append(request.match_info["id"], owner=owner, role=_text(body, "role"),
                                 content=_text(body, "content"), model=_text(body, "model", False) or "",
                                 finish_reason=_text(body, "finish_reason", False), **tokens)
    return web.json_response(message.to_dict(), status=201)


@answers
async def export(request: web.Request, store: ConversationStore, owner) -> web.Response:
    transcript = await store.get(request.match_info["id"], owner=owner)
    body, content_type, name = render_export(transcript, request.query.get("format", "json"))
    return web.Response(body=body, content_type=content_type.split(";")[0], charset="utf-8",
                        headers={"Content-Disposition": f'attachment; filename="{name}"'})


@answers
async def search(request: web.Request, store: ConversationStore, owner) -> web.Response:
    limit, _ = parse_page(request.query.get("limit"), None, default_limit=20)
    hits = await store.search(request.query.get("q", ""), owner=owner, limit=limit)
    return web.json_response({"hits": [h.to_dict() for h in hits]})


@answers
async def import_browser(request: web.Request, store: ConversationStore, owner) -> web.Response:
    """What the UI kept in localStorage before history lived on the box: imported once, by each conversation's id."""
    report = await store.import_browser((await read_json(request)).get("saved"), owner=owner)
    return web.json_response(report.to_dict())


def setup_routes(app: web.Application, store: ConversationStore | None) -> None:
    if store is not None:
        app[HISTORY] = store
    base = "/api/v1/conversations"
    app.router.add_get(base, list_conversations)
    app.router.add_post(base, create)
    app.router.add_get(f"{base}/search", search)
    app.router.add_post(f"{base}/import", import_browser)
    app.router.add_get(base + "/{id}", show)
    app.router.add_patch(base + "/{id}", rename)
    app.router.add_delete(base + "/{id}", delete)
    app.router.add_post(base + "/{id}/messages", append)
    app.router.add_get(base + "/{id}/export", export)
