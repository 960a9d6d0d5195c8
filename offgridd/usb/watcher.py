"""`UsbWatcher`: udev events wake it, a debounced rescan of the mounts under the stick roots tells it what changed.

The daemon never mounts anything: the udev rule in usb/ mounts sticks read-only with systemd-mount. A udev event
comes before that mount does, so after each event the mounts are read again every second for a while.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
import threading
import time
from pathlib import Path

from ..events import EventBus
from ..inference import ModelPool
from ..jobs import JobBoard
from ..settings import UsbSettings
from ..store import ModelStore
from .documents import AddDocument, import_documents
from .importer import DOCUMENTS_OFF, StickReport, import_stick
from .mounts import Mount, mounted_sticks

log = logging.getLogger(__name__)

UDEV_CONTROL = Path("/run/udev/control")  # exists while systemd-udevd runs
DEBOUNCE_S = 0.5
SETTLE_S = 15.0
SETTLE_EVERY_S = 1.0
STOP_WAIT_S = 10.0
SAFETY_RESCAN_S = 60.0


def udev_running(control: Path = UDEV_CONTROL) -> bool:
    """Whether systemd-udevd listens (its socket file outlives it; an unprivileged daemon may not connect)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        try:
            s.connect(str(control))
        except PermissionError:
            return True
        except OSError:
            return False
    return True


def open_udev_monitor():
    """A pyudev monitor on block devices, or None where there is no udev (no pyudev, no udevd running)."""
    if not udev_running():
        return None
    try:
        import pyudev

        monitor = pyudev.Monitor.from_netlink(pyudev.Context(), source="udev")
        monitor.filter_by("block")
        monitor.start()
        return monitor
    except (ImportError, OSError) as e:
        log.warning("udev is not usable (%s); polling the mounts instead", e)
        return None


class UsbWatcher:
    name = "usb"

    def __init__(self, settings: UsbSettings, store: ModelStore, jobs: JobBoard, bus: EventBus, pool: ModelPool, *,
                 add_document: AddDocument | None = None, max_document_bytes: int = 32 << 20):
        self.settings = settings
        self.store, self.jobs, self.bus, self.pool = store, jobs, bus, pool
        self.add_document = add_document  # the document store's add; None where documents are off
        self.max_document_bytes = max_document_bytes
        self.mode = "stopped"  # udev | poll
        self.udev_events = 0
        self.rescans = 0
        self.sticks: dict[Path, Mount] = {}
        self.importing: str | None = None
        self.last: dict | None = None
        self._monitor = None
        self._woken = asyncio.Event()
        self._settle_until = 0.0
        self._queue: asyncio.Queue[Mount] = asyncio.Queue()
        self._lock = asyncio.Lock()
        self._cancel = threading.Event()
        self._running: asyncio.Future | None = None
        self._tasks: list[asyncio.Task] = []
        self._imports: set[asyncio.Future] = set()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._monitor = await loop.run_in_executor(None, open_udev_monitor)
        if self._monitor is not None:
            loop.add_reader(self._monitor.fileno(), self._on_udev)
            self.mode = "udev"
        else:
            self.mode = "poll"
        log.info("watching for USB sticks under %s (%s)", ", ".join(self.settings.roots), self.mode)
        self._tasks = [asyncio.create_task(self._watch(), name="usb-watch"),
                       asyncio.create_task(self._import_mounted(), name="usb-import")]
        self._woken.set()  # a stick already present at start-up

    async def stop(self) -> None:
        self._cancel.set()
        if self._monitor is not None:
            asyncio.get_running_loop().remove_reader(self._monitor.fileno())
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._running is not None and not self._running.done():  # let the copy thread clean up its staging file
            with contextlib.suppress(TimeoutError, Exception):
                await asyncio.wait_for(asyncio.shield(self._running), STOP_WAIT_S)
        if self._imports:  # a document being embedded ends its job, the rest are failed at once (self._cancel)
            _, late = await asyncio.wait(list(self._imports), timeout=STOP_WAIT_S)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        self.mode = "stopped"

    def describe(self) -> dict:
        return {"mode": self.mode, "roots": list(self.settings.roots), "sticks": [str(p) for p in self.sticks],
                "importing": self.importing, "udev_events": self.udev_events, "rescans": self.rescans,
                "last": self.last}

    def _on_udev(self) -> None:
        """The monitor's socket is readable: take every pending event, and treat them as one wake-up."""
        while True:
            try:
                device = self._monitor.poll(timeout=0)
            except OSError as e:
                log.warning("reading a udev event failed: %s", e)
                break
            if device is None:
                break
            self.udev_events += 1
            log.debug("udev: %s %s", device.action, device.device_node)
        self._settle_until = time.monotonic() + SETTLE_S
        self._woken.set()

    async def _watch(self) -> None:
        while True:
            timeout = None
            if time.monotonic() < self._settle_until:
                timeout = SETTLE_EVERY_S
            elif self.mode == "poll":
                timeout = self.settings.poll_seconds
            else:  # udev: a slow look now and then, for a stick mounted by hand with no event
                timeout = max(self.settings.poll_seconds, SAFETY_RESCAN_S)
            try:
                async with asyncio.timeout(timeout):
                    await self._woken.wait()
                await asyncio.sleep(DEBOUNCE_S)  # a burst of events is one rescan
            except TimeoutError:
                pass
            self._woken.clear()
            try:
                await self.rescan()
            except OSError as e:
                log.warning("reading the mounts failed: %s", e)

    async def rescan(self) -> None:
        loop = asyncio.get_running_loop()
        mounts = await loop.run_in_executor(None, mounted_sticks, list(self.settings.roots))
        self.rescans += 1
        current = {m.path: m for m in mounts}
        for path, mount in current.items():
            old = self.sticks.get(path)
            if old is None or old.mount_id != mount.mount_id:
                log.info("stick mounted at %s (%s from %s)", path, mount.fstype, mount.source)
                self._queue.put_nowait(mount)
        for path in self.sticks.keys() - current.keys():
            log.info("stick at %s is gone", path)
        self.sticks = current

    async def _import_mounted(self) -> None:
        while True:
            mount = await self._queue.get()
            if self.sticks.get(mount.path) != mount:
                continue  # removed before its turn
            try:
                await self.import_path(mount.path)
            except Exception:  # one bad stick must not end the watch
                log.exception("importing from %s failed", mount.path)

    async def import_path(self, path: Path) -> StickReport:
        """Import a mounted stick (or any directory in the stick format); one stick at a time. A caller that goes
        away (an HTTP client that disconnects) stops waiting, but the import runs on, holding the lock, to its end."""
        task = asyncio.ensure_future(self._import_path(path))
        self._imports.add(task)
        task.add_done_callback(self._imports.discard)
        return await asyncio.shield(task)

    async def _import_path(self, path: Path) -> StickReport:
        loop = asyncio.get_running_loop()
        async with self._lock:
            self.importing = str(path)
            self.bus.publish("usb", {"state": "importing", "path": str(path)})
            report = None
            try:
                self._running = loop.run_in_executor(None, functools.partial(
                    import_stick, Path(path), store=self.store, jobs=self.jobs,
                    allow_unverified=self.settings.allow_unverified, cancel=self._cancel,
                    documents_off=None if self.add_document is not None else DOCUMENTS_OFF))
                report = await asyncio.shield(self._running)
                if report.pending_documents:  # after the models: embedding takes about a second a page
                    report.results += await import_documents(
                        Path(path), report.pending_documents, add=self.add_document,
                        max_bytes=self.max_document_bytes, jobs=self.jobs, cancel=self._cancel)
            finally:
                self.importing = None
                summary = report.to_dict() if report is not None else {"root": str(path), "ok": False}
                self.last = {k: summary.get(k) for k in ("root", "ok", "refused")} | {
                    "imported": report.imported if report else [],
                    "documents": report.documents_imported if report else [],
                    "failed": sum(r.state == "failed" for r in report.results) if report else 0}
                self.bus.publish("usb", {"state": "idle", **self.last})
        if report.refused and not report.results:
            log.info("usb: %s", report.refused)
        if report.imported:
            self.bus.publish("models", {"imported": report.imported})
            if self.settings.load_after_import:
                await self._load(report.imported[0])
        return report

    async def _load(self, name: str) -> None:
        try:
            await self.pool.worker_for(name)
            log.info("loaded %s after importing it from a stick", name)
        except Exception as e:  # the model is in the store either way; loading is a convenience
            log.warning("could not load %s after importing it: %s", name, e)

