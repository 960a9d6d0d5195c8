"""Which models have a worker: loaded on demand if they fit, unloaded when idle, replaced when they keep failing."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable

import psutil

from ..metrics import Metrics
from ..settings import Settings
from ..store import ModelStore
from .client import InferenceError, InferenceWorker, Overloaded, WorkerConfig
from .fit import LoadPlan, NoFit, plan_load

log = logging.getLogger(__name__)


def default_threads() -> int:
    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


def psutil_available() -> int:
    return psutil.virtual_memory().available


class ModelPool:
    def __init__(self, store: ModelStore, settings: Settings, metrics: Metrics,
                 available_memory: Callable[[], int] = psutil_available):
        self.store = store
        self.settings = settings
        self.metrics = metrics
        self.available_memory = available_memory  # the memory this board has free, in bytes
        self.workers: dict[str, InferenceWorker] = {}
        self.bad: dict[str, str] = {}  # model -> why it is not used any more
        self.notes: dict[str, str] = {}  # requested model -> what was changed to serve it
        self.safe_path: dict[str, str] = {}  # model -> why its engine runs without repacked weights
        metrics.degraded.labels("engine-safe-mode").set(0)
        self.threads = settings.threads or default_threads()
        self._loading = asyncio.Lock()

    async def worker_for(self, name: str) -> InferenceWorker:
        """The worker serving `name` (or the model chosen in its place), started if needed.

        Raises UnknownModel for a name not in the store, Overloaded (503, a peer may serve it) when nothing fits.
        """
        loop = asyncio.get_running_loop()
        requested = await loop.run_in_executor(None, self.store.get, name)
        if requested.kind != "llm":
            raise InferenceError(400, f"model {name!r} is a {requested.kind} model (speech); it serves "
                                 f"/v1/audio/*, not text generation or embeddings")
        worker = self.workers.get(name)
        if worker is not None and worker.state != "failed" and worker.config.path == self.store.path_of(requested):
            return worker
        async with self._loading:  # one load decision at a time: each sees the memory the previous one took
            while True:
                try:
                    plan = await loop.run_in_executor(None, self._plan, requested)
                except NoFit as e:
                    self.notes[name] = str(e)
                    raise Overloaded(str(e), retry_after=60) from None
                worker = self.workers.get(plan.manifest.name)
                if worker is not None and worker.state != "failed":
                    return worker
                try:
                    return await self._load(plan, requested.name)
                except InferenceError as e:
                    self.mark_bad(plan.manifest.name, str(e))

    def _plan(self, requested) -> LoadPlan:
        s = self.settings
        return plan_load(requested, self.store.list(), ctx=s.ctx, sequences=s.parallel,
                         available=self.available_memory(),
                         max_model_bytes=s.max_model_bytes, quantizations=s.quantizations, bad=set(self.bad))

    async def _load(self, plan: LoadPlan, requested: str) -> InferenceWorker:
        name = plan.manifest.name
        if plan.note:
            log.warning("loading %s for %s: %s", name, requested, plan.note)
            self.notes[requested] = plan.note
        else:
            self.notes.pop(requested, None)
        await self.unload(name)
        config = WorkerConfig(
            name=name, path=self.store.path_of(plan.manifest), threads=self.threads, ctx=plan.ctx,
            batch=self.settings.batch, sequences=self.settings.parallel, gpu_layers=self.settings.gpu_layers,
            flash_attn=self.settings.flash_attn,
            memory_limit=self.settings.worker_memory_limit, start_timeout=self.settings.worker_start_timeout,
            safe=name in self.safe_path,
        )
        worker = self.workers[name] = InferenceWorker(config, on_restart=self._restarted,
                                                      on_abandoned=self._abandoned, on_failed=self.mark_bad,
                                                      on_safe_path=self._on_safe_path)
        self.metrics.add_model(name)
        # read at each scrape: 0 while the worker loads, restarts after a crash, has failed or is unloaded
        self.metrics.model_loaded.labels(name).set_function(lambda: float(worker.state == "ready"))
        await self._evict_idle(keep=name)
        await worker.start()
        return worker

    def mark_bad(self, name: str, reason: str) -> None:
        if name not in self.bad:
            log.error("model %s marked bad: %s", name, reason)
            self.bad[name] = reason

    def _on_safe_path(self, name: str, reason: str) -> None:
        self.safe_path[name] = reason  # later loads of this model start on the safe path
        self.metrics.degraded.labels("engine-safe-mode").set(1)

    def _restarted(self, name: str) -> None:
        self.metrics.worker_restarts.labels(name).inc()

    def _abandoned(self, name: str, done: dict) -> None:
        """Count what a request whose client disconnected cost before the worker stopped it."""
        self.metrics.abandoned.labels(name).inc()
        self.metrics.completion_tokens.labels(name).inc(done["completion_tokens"])

    async def _evict_idle(self, keep: str) -> None:
        idle = sorted((w for n, w in self.workers.items() if n != keep and w.in_flight == 0),
                      key=lambda w: w.last_used)
        while len(self.workers) > self.settings.max_loaded_models and idle:
            await self.unload(idle.pop(0).config.name)

    async def unload_idle(self, older_than: float = 0.0) -> list[str]:
        """Unload models nobody has used for `older_than` seconds; returns their names."""
        now = time.monotonic()
        names = [n for n, w in self.workers.items()
                 if w.state == "ready" and w.in_flight == 0 and now - w.last_used >= older_than]
        for name in names:
            await self.unload(name)
        return names

    async def unload(self, name: str) -> None:
        worker = self.workers.pop(name, None)
        if worker is not None:
            log.info("unloading model %s", name)
            await worker.stop()

    def set_memory_source(self, available: Callable[[], int]) -> None:
        """Where load decisions read free memory (the hardware watch's latest sample, where there is one)."""
        self.available_memory = available

    def set_threads(self, threads: int) -> None:
        """Change llama.cpp's thread count in every worker, effective from the next decode step."""
        self.threads = threads
        for worker in self.workers.values():
            worker.set_threads(threads)

    async def stop(self) -> None:
        for name in list(self.workers):
            await self.unload(name)

    @property
    def waiting(self) -> int:
        return sum(w.waiting for w in self.workers.values())
