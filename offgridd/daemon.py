"""`offgridd serve`: bring the appliance up, keep systemd informed, drain and stop on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal

import aiohttp
from aiohttp import web

from . import status
from .api.app import init_app
from .audit import Audit
from .db import Database
from .documents import DocumentStore, Limits
from .events import EventBus
from .hardware.profiles import Detection
from .hardware.service import HardwareService
from .history import ConversationStore, vacuum_periodically
from .inference import Admission, Inference, InferenceError, ModelPool
from .jobs import JobBoard
from .keys import KeyRing
from .metrics import Metrics
from .notify import SystemdNotifier
from .peers import PeerService
from .runtime import Runtime
from .settings import Settings, loopback_for
from .store import ModelStore, StoreError, register_builtin
from .usb.watcher import UsbWatcher
from .voice import VoiceService
from .web import limit_connections

log = logging.getLogger(__name__)

STATUS_EVERY_S = 5.0
KEEPALIVE_S = 15.0  # an idle connection is closed after this long (aiohttp's handler would keep it an hour)
MAX_CONNECTIONS = 512  # in all: well under the unit's LimitNOFILE, with room for models, workers and the database
MAX_CONNECTIONS_PER_CLIENT = 64


def documents(settings: Settings, db: Database, inference: Inference, bus: EventBus) -> DocumentStore:
    """Documents embedded by the configured embedding model (the default model unless one is named), through the
    worker, under the same admission as chat; each document added or deleted is a `documents` event."""
    model = settings.documents.embedding_model or settings.model
    d = settings.documents

    async def embed(texts: list[str]) -> list[list[float]]:
        return (await inference.embed(model, texts)).vectors

    return DocumentStore(db, embed, model=model, limits=Limits(
        max_upload_bytes=d.max_upload_bytes, max_total_bytes=d.max_total_bytes, chunk_words=d.chunk_words,
        overlap_words=d.overlap_words, top_k=d.top_k, max_db_bytes=settings.history.max_db_bytes),
        changed=lambda what, document: bus.publish("documents", {what: document.to_dict()}))


def build_runtime(settings: Settings, detection: Detection | None = None) -> Runtime:
    """Compose the appliance: the core parts, then each enabled service given only the parts it uses."""
    store = ModelStore(settings.state / "models")
    metrics = Metrics()
    bus = EventBus()
    db = Database(settings.state / "offgridd.db")
    admission = Admission(settings.parallel, settings.queue_depth, settings.queue_timeout,
                          on_reject=lambda reason: metrics.rejected.labels(reason).inc())
    inference = Inference(ModelPool(store, settings, metrics), admission, metrics)
    rt = Runtime(settings=settings, store=store, inference=inference, metrics=metrics, db=db, bus=bus,
                 jobs=JobBoard(db, bus), keys=KeyRing(db, settings.api_key, settings.admin_key), audit=Audit(db),
                 detection=detection)
    if detection is not None:
        rt.hardware = HardwareService(settings, detection, inference, metrics, bus,
                                      on_long_press=rt.stop_requested.set,
                                      led_pattern=functools.partial(status.led_pattern, rt))
    if settings.history.enabled:
        rt.history = ConversationStore(db, max_bytes=settings.history.max_db_bytes)
    if settings.documents.enabled:  # before the USB watch and the peers, which bring documents into it
        rt.documents = documents(settings, db, inference, bus)
    if settings.usb.enabled:
        rt.usb = UsbWatcher(settings.usb, store, rt.jobs, bus, inference.pool,
                            add_document=rt.documents.add if rt.documents else None,
                            max_document_bytes=settings.documents.max_upload_bytes)
    if settings.peers.enabled:
        rt.peers = PeerService(settings, store, rt.jobs, metrics, bus,
                               load=lambda: (inference.active, inference.waiting), documents=rt.documents)
    if settings.voice.enabled:  # speech takes its turn in the same queue as chat
        rt.voice = VoiceService(settings.voice, store, admission.ticket, inference.idle,
                                wait_limit=settings.queue_timeout, chat=inference.generate)
    return rt


async def start_services(rt: Runtime) -> None:
    for service in rt.services:
        try:
            await service.start()
        except Exception:  # one subsystem failing must not take the API down
            log.exception("service %s failed to start; serving without it", service.name)
            continue
        rt.running.append(service)


async def stop_services(rt: Runtime) -> None:
    for service in reversed(rt.running):
        try:
            await service.stop()
        except Exception:
            log.exception("service %s failed to stop cleanly", service.name)


async def bring_up(rt: Runtime, base_url: str) -> None:
    """Prepare the store, register the built-in model, load the default model, then check the API answers."""
    loop = asyncio.get_running_loop()
    settings = rt.settings
    rt.phase, rt.reason = "starting", "preparing the model store"
    await loop.run_in_executor(None, lambda: rt.store.open(collect_garbage=True))
    if rt.history is not None:
        try:
            await rt.history.prepare()
        except Exception:  # conversations are a convenience: the API serves without them
            log.exception("conversation history could not be opened; /api/v1/conversations will answer errors")
    await start_services(rt)
    rt.reason = "registering the built-in model"
    try:
        await loop.run_in_executor(None, register_builtin, rt.store)
    except (StoreError, OSError) as e:
        log.error("the built-in model could not be registered: %s", e)
    rt.phase, rt.reason = "loading", f"loading {settings.model}"
    try:
        await rt.inference.pool.worker_for(settings.model)
    except (StoreError, InferenceError) as e:
        rt.phase = "unavailable"
        rt.reason = f"{e}; import a model with 'offgridd models import FILE' or set 'model' in the config"
        log.error("serving without a model: %s", rt.reason)
        return
    rt.phase, rt.reason = "ready", ""
    async with aiohttp.ClientSession() as session, session.get(f"{base_url}/health") as resp:
        if resp.status != 200:
            raise RuntimeError(f"self-check of {base_url}/health answered {resp.status}")
    log.info("ready: serving %s at %s", settings.model, base_url)


async def keep_status(rt: Runtime, notifier: SystemdNotifier) -> None:
    loop = asyncio.get_running_loop()
    while True:
        memory = await loop.run_in_executor(None, status.memory, rt)
        notifier.status(status.line(rt, memory))
        await asyncio.sleep(STATUS_EVERY_S)


async def drain(rt: Runtime, bound: float) -> None:
    """Let in-flight requests finish, up to `bound` seconds."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(bound):
            await rt.inference.idle.wait()
    if rt.inference.active:
        log.warning("ending %d requests still running after %.0fs of draining", rt.inference.active, bound)


async def serve(settings: Settings, detection: Detection | None = None) -> None:
    rt = build_runtime(settings, detection)
    notifier = SystemdNotifier()
    stop = rt.stop_requested
    loop = asyncio.get_running_loop()
    rt.bus.bind(loop)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    runner = web.AppRunner(init_app(rt), handler_cancellation=True, shutdown_timeout=1.0, access_log=None,
                           keepalive_timeout=KEEPALIVE_S)
    await runner.setup()
    limit_connections(runner.server, MAX_CONNECTIONS_PER_CLIENT, MAX_CONNECTIONS)
    site = web.TCPSite(runner, settings.host, settings.port, reuse_address=True)
    await site.start()
    port = runner.addresses[0][1] if runner.addresses else settings.port
    host = loopback_for(settings.host)
    log.info("listening on %s:%s (state %s)", settings.host, port, settings.state)
    if detection is not None:
        log.info("board profile %s: %s (%s)", detection.profile.id, detection.reason, "; ".join(detection.evidence))
    background = []
    if (interval := notifier.watchdog_interval()) is not None:
        background.append(asyncio.create_task(notifier.watchdog_loop(interval), name="watchdog"))
    if rt.history is not None and settings.history.vacuum_seconds:
        background.append(asyncio.create_task(vacuum_periodically(rt.history, settings.history.vacuum_seconds),
                                              name="history-vacuum"))

    async def start() -> None:
        await bring_up(rt, f"http://{host}:{port}")
        memory = await loop.run_in_executor(None, status.memory, rt)
        notifier.ready(status.line(rt, memory))
        background.append(asyncio.create_task(keep_status(rt, notifier), name="status"))

    starting = asyncio.create_task(start(), name="bring-up")
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait([starting, stopped], return_when=asyncio.FIRST_COMPLETED)
    if starting.done() and starting.exception():
        log.error("start-up failed: %s", starting.exception())
        stop.set()
    await stop.wait()

    log.info("stopping: draining in-flight requests (at most %.0fs)", settings.drain_seconds)
    rt.phase, rt.reason = "stopping", "shutting down"
    notifier.stopping("stopping: draining requests")
    starting.cancel()
    await drain(rt, settings.drain_seconds)
    for task in background:
        task.cancel()
    await runner.cleanup()
    await stop_services(rt)
    await rt.inference.pool.stop()
    rt.db.close()
    log.info("stopped")
    if starting.done() and not starting.cancelled() and starting.exception():
        raise SystemExit(1)
