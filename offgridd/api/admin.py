"""/api/v1/keys and /api/v1/audit: keys made, listed and revoked over HTTP (admin keys only, web.authorize), and the
audit log."""

from __future__ import annotations

from aiohttp import web

from .. import keys
from ..web import AUDIT, ApiError, read_json
from .keys import RUNTIME


def _limit(body: dict, name: str) -> int:
    value = body.get(name, 0)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 1 << 30:
        raise ApiError(400, f"'{name}' must be an integer from 0 (no limit) up", param=name)
    return value


async def list_keys(request: web.Request) -> web.Response:
    return web.json_response({"keys": await request.app[RUNTIME].db.run(keys.list_keys)})


async def add_key(request: web.Request) -> web.Response:
    """Make a key; its secret is in this answer and nowhere else."""
    body = await read_json(request)
    name, scope = body.get("name"), body.get("scope", "chat")
    if not isinstance(name, str) or not isinstance(scope, str):
        raise ApiError(400, "'name' (and 'scope', chat or admin) must be strings", param="name")
    rpm, tpm = _limit(body, "rpm"), _limit(body, "tpm")
    try:
        secret = await request.app[RUNTIME].db.run(lambda db: keys.add_key(db, name, scope, rpm, tpm))
    except keys.KeyRefused as e:
        raise ApiError(400, str(e), param="name") from None
    return web.json_response({"name": name, "scope": scope, "rpm": rpm, "tpm": tpm, "key": secret}, status=201)


async def revoke_key(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    try:
        await request.app[RUNTIME].db.run(lambda db: keys.revoke_key(db, name))
    except keys.KeyRefused as e:
        raise ApiError(404, str(e), code="key_not_found") from None
    return web.json_response({"revoked": name})


async def audit(request: web.Request) -> web.Response:
    try:
        since = float(request.query.get("since", 0))
        limit = min(5000, max(1, int(request.query.get("limit", 1000))))
    except ValueError:
        raise ApiError(400, "'since' is a Unix time and 'limit' a count", param="since") from None
    return web.json_response({"entries": await request.app[AUDIT].recent(since, limit)})
