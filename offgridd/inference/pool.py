"""Which models have a worker: loaded on first use, idle ones unloaded past the limit."""

from __future__ import annotations

import asyncio
import logging
import os

import psutil

from ..metrics import Metrics
from ..settings import Settings
from ..store import ModelStore
from .client import InferenceWorker, WorkerConfig

log = logging.getLogger(__name__)


def default_threads() -> int:
    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


class ModelPool:
    def __init__(self, store: ModelStore, settings: Settings, metrics: Metrics):
        self.store = store
        self.settings = settings
        self.metrics = metrics
        self.workers: dict[str, InferenceWorker] = {}

    async def worker_for(self, name: str) -> InferenceWorker:
        """The worker serving `name`, started if needed; raises UnknownModel for a name not in the store."""
        manifest = await asyncio.get_running_loop().run_in_executor(None, self.store.get, name)
        worker = self.workers.get(name)
        if worker is not None and worker.config.path == self.store.path_of(manifest):
            return worker
        if worker is not None:  # the name now points at other bytes: retire the old worker
            await self.unload(name)
        config = WorkerConfig(
            name=name, path=self.store.path_of(manifest), threads=self.settings.threads or default_threads(),
            ctx=min(self.settings.ctx, manifest.context_length), batch=self.settings.batch,
            start_timeout=self.settings.worker_start_timeout,
        )
        worker = self.workers[name] = InferenceWorker(config, on_restart=self._restarted, on_abandoned=self._abandoned)
        self.metrics.add_model(name)
        await self._evict_idle(keep=name)
        await worker.start()
        self.metrics.model_loaded.labels(name).set(1)
        return worker

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

    async def unload(self, name: str) -> None:
        worker = self.workers.pop(name, None)
        if worker is not None:
            log.info("unloading model %s", name)
            await worker.stop()
            self.metrics.model_loaded.labels(name).set(0)

    async def stop(self) -> None:
        for name in list(self.workers):
            await self.unload(name)

    @property
    def waiting(self) -> int:
        return sum(w.waiting for w in self.workers.values())
