"""HTTP: the USB watch's state, and importing a mounted directory on request (`offgridd usb import`)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from aiohttp import web

from ..web import ApiError, read_json
from .watcher import UsbWatcher

USB = web.AppKey("usb", UsbWatcher)


def _watcher(request: web.Request) -> UsbWatcher:
    if (watcher := request.app.get(USB)) is None:
        raise ApiError(503, "USB import is off on this box (usb.enabled = false)", code="usb_disabled")
    return watcher


async def usb_status(request: web.Request) -> web.Response:
    return web.json_response(_watcher(request).describe())


async def usb_import(request: web.Request) -> web.Response:
    """Import a directory on this box in the stick format; waits for the result. An admin action (web.authorize):
    with no admin key, only from the box itself."""
    path = (await read_json(request)).get("path")
    if not isinstance(path, str) or not path.startswith("/") or "\0" in path:
        raise ApiError(400, "'path' must be an absolute path to a mounted directory", param="path")
    watcher = _watcher(request)
    if not await asyncio.get_running_loop().run_in_executor(None, Path(path).is_dir):
        raise ApiError(400, f"{path} is not a directory the daemon can see", param="path", code="not_a_directory")
    report = await watcher.import_path(Path(path))
    return web.json_response(report.to_dict())


def setup_routes(app: web.Application, watcher: UsbWatcher | None) -> None:
    if watcher is not None:
        app[USB] = watcher
    app.router.add_get("/api/v1/usb", usb_status)
    app.router.add_post("/api/v1/usb/import", usb_import)
