"""ModelPuller: fetch models this node lacks from peers, one at a time, resumable, through the store's import path."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import shutil
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import aiohttp

from ..events import EventBus
from ..jobs import JobBoard
from ..metrics import Metrics
from ..settings import Settings
from ..store import ModelManifest, ModelStore, StoreError
from .exchange import BLOB_PATH, ExchangeRefused
from .peer import Peer

# a signed GET to a member, its answer checked as that member's own: PeerService.call
Call = Callable[..., AbstractAsyncContextManager[aiohttp.ClientResponse]]

log = logging.getLogger(__name__)

BLOCK = 1 << 20
PIPE_DEPTH = 16  # blocks between the network and the import thread
SYNC_EVERY = 16 << 20
RETRY_FIRST_S, RETRY_MAX_S = 2.0, 60.0
BAD_PEER_BACKOFF_S = 600.0  # a peer whose bytes failed the hash is not asked for that model again for this long
RECHECK_S = 2.0
PARTIAL_MAX_AGE_S = 7 * 86400  # a partial pull nothing was added to for this long is abandoned
SWEEP_EVERY_S = 3600.0
_END = object()


def sweep_partials(partials: Path, have: set[str], now: float, keep: bool = True) -> list[str]:
    """Blocking: delete partial pulls that can no longer help: their model arrived another way (a USB stick, an
    import), nothing was added to them for PARTIAL_MAX_AGE_S (the peer left for good), or pulling is off (keep=False).
    Returns the names deleted."""
    gone = []
    for part in partials.glob("sha256-*.part") if partials.is_dir() else ():
        sha = part.name.removeprefix("sha256-").removesuffix(".part")
        with contextlib.suppress(FileNotFoundError):
            if not keep or sha in have or now - part.stat().st_mtime > PARTIAL_MAX_AGE_S:
                part.unlink()
                gone.append(part.name)
    return gone


class PullInterrupted(Exception):
    """The transfer stopped before the end; the partial file is kept for a Range resume."""


class _ChunkPipe:
    """Carries blocks from the event loop to the import thread, with back-pressure instead of buffering."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._room = asyncio.Semaphore(PIPE_DEPTH)
        self.closed = False

    async def put(self, block: bytes) -> None:
        await self._room.acquire()
        if self.closed:
            self._room.release()
            raise PullInterrupted("the import stopped reading")
        self._queue.put(block)

    def end(self, error: BaseException | None = None) -> None:
        self._queue.put(error if error is not None else _END)

    def get(self) -> bytes | None:
        """From the import thread: the next block, None at the end; raises what end() was given."""
        item = self._queue.get()
        if item is _END:
            return None
        if isinstance(item, BaseException):
            raise item
        self._loop.call_soon_threadsafe(self._room.release)
        return item

    def close_from_thread(self) -> None:
        self.closed = True
        self._loop.call_soon_threadsafe(self._room.release)


class ModelPuller:
    def __init__(self, store: ModelStore, jobs: JobBoard, bus: EventBus, metrics: Metrics, settings: Settings, *,
                 peers: Callable[[], list[Peer]], changed: Callable[[], None], call: Call):
        self.store, self.jobs, self.bus, self.metrics = store, jobs, bus, metrics
        self.settings = settings.peers
        self.max_model_bytes = settings.max_model_bytes
        # speech models are pulled only where voice is on: on a Pi Zero they are 140 MB of a small card for nothing
        self.kinds = {"llm", "stt", "tts"} if settings.voice.enabled else {"llm"}
        self.peers = peers  # live peers, least busy first
        self.changed = changed  # this node's inventory changed: announce it
        self.call = call
        self.partials = store.root / ".partial"  # the store's filesystem: committing is a rename
        self.current: dict | None = None
        self._wake = asyncio.Event()
        self._retry_at: dict[tuple[str, str], float] = {}
        self._failures: dict[str, int] = {}
        self._told: set[str] = set()

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        if self.settings.sync != "pull":
            await self._sweep(keep=False)
            return
        await loop.run_in_executor(None, lambda: self.partials.mkdir(parents=True, exist_ok=True))
        swept = -SWEEP_EVERY_S
        while True:
            try:
                if loop.time() - swept >= SWEEP_EVERY_S:
                    swept = loop.time()
                    await self._sweep()
                while (choice := self._next(await loop.run_in_executor(None, self.store.list))) is not None:
                    await self._pull(*choice)
            except Exception:  # a fault here (the store's disk, a bug) costs this round of pulling, never the loop
                log.exception("pulling from peers failed; trying again in %d s", RECHECK_S)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(RECHECK_S):
                    await self._wake.wait()
            self._wake.clear()

    async def _sweep(self, keep: bool = True) -> None:
        def sweep() -> list[str]:
            have = {m.sha256 for m in self.store.list()}
            return sweep_partials(self.partials, have, time.time(), keep)

        for name in await asyncio.get_running_loop().run_in_executor(None, sweep):
            log.info("deleted the partial pull %s: %s", name,
                     "pulling is off" if not keep else "its model is here already, or it was abandoned")

    def _next(self, local: list[ModelManifest]) -> tuple[Peer, dict] | None:
        """The first model some peer has and this node lacks, from the least busy peer that has it."""
        names = {m.name for m in local}
        limit = self.max_model_bytes
        now = time.monotonic()
        for peer in self.peers():
            for name, model in sorted(peer.models.items()):
                if name in names or self._retry_at.get((peer.node, model["sha256"]), 0) > now:
                    continue
                if model.get("kind", "llm") not in self.kinds:
                    if name not in self._told:
                        self._told.add(name)
                        log.info("not pulling the speech model %s from %s: voice is off on this box", name, peer.name)
                    continue
                if limit and model["size"] > limit:
                    if name not in self._told:
                        self._told.add(name)
                        log.info("not pulling %s from %s: %d bytes is over this board's limit of %d",
                                 name, peer.name, model["size"], limit)
                    continue
                return peer, model
        return None

    def _prepare(self, partial: Path, size: int) -> int:
        """Blocking: how many bytes of the model are already here, after checking there is room for the rest."""
        offset = partial.stat().st_size if partial.exists() else 0
        if offset > size:
            partial.unlink()
            offset = 0
        free = shutil.disk_usage(self.partials).free
        if free < size - offset:
            raise StoreError(f"not enough space: pulling needs {size - offset} more bytes, {free} are free")
        return offset

    async def _pull(self, peer: Peer, model: dict) -> None:
        loop = asyncio.get_running_loop()
        name, sha, size = model["name"], model["sha256"], model["size"]
        partial = self.partials / f"sha256-{sha}.part"
        job = self.jobs.start("peer-pull", f"peer {peer.name} ({peer.address})", name, size)
        self.current = {"model": name, "peer": peer.name, "job": job.id}
        key = (peer.node, sha)
        try:
            offset = await loop.run_in_executor(None, self._prepare, partial, size)
            manifest = await self._transfer(peer, model, partial, offset, job)
        except StoreError as e:
            await loop.run_in_executor(None, lambda: partial.unlink(missing_ok=True))
            self._retry_at[key] = time.monotonic() + BAD_PEER_BACKOFF_S
            log.warning("pull of %s from %s refused: %s; partial file discarded", name, peer.name, e)
            self.jobs.finish(job, "failed", str(e))
        except (PullInterrupted, aiohttp.ClientError, TimeoutError, OSError) as e:
            failures = self._failures[sha] = self._failures.get(sha, 0) + 1
            self._retry_at[key] = time.monotonic() + min(RETRY_MAX_S, RETRY_FIRST_S * 2 ** (failures - 1))
            reason = f"interrupted: {e or type(e).__name__}; the bytes received are kept and the pull resumes"
            log.warning("pull of %s from %s %s", name, peer.name, reason)
            self.jobs.finish(job, "failed", reason)
        except Exception as e:  # a blob that trips a bug costs this pull, never the sync task
            log.exception("pull of %s from %s failed unexpectedly", name, peer.name)
            with contextlib.suppress(OSError):
                await loop.run_in_executor(None, lambda: partial.unlink(missing_ok=True))
            self._retry_at[key] = time.monotonic() + BAD_PEER_BACKOFF_S
            self.jobs.finish(job, "failed", f"{type(e).__name__}: {e}; partial file discarded")
        except asyncio.CancelledError:
            self.jobs.finish(job, "failed", "the daemon stopped; the pull resumes at the next start")
            raise
        else:
            await loop.run_in_executor(None, lambda: partial.unlink(missing_ok=True))
            self._failures.pop(sha, None)
            log.info("pulled %s (%d bytes) from peer %s", manifest.name, manifest.size, peer.name)
            self.jobs.finish(job, "done")
            self.bus.publish("models", {"added": manifest.name, "source": f"peer {peer.name}"})
            self.changed()
        finally:
            self.current = None

    async def _transfer(self, peer: Peer, model: dict, partial: Path, offset: int, job) -> ModelManifest:
        loop = asyncio.get_running_loop()
        size = model["size"]
        path = f"{BLOB_PATH}{model['sha256']}"
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=30)
        async with contextlib.AsyncExitStack() as stack:
            try:  # status and Content-Range are the peer's own, for this request: the bytes are then hashed
                resp = await stack.enter_async_context(self.call(peer, path, headers, timeout))
            except ExchangeRefused as e:
                raise PullInterrupted(f"the answer did not come from peer {peer.name}: {e}") from None
            if resp.status == 200 and offset:
                log.info("peer %s sent the whole file instead of a range; starting %s again", peer.name, model["name"])
                await loop.run_in_executor(None, lambda: partial.unlink(missing_ok=True))
                offset = 0
            elif resp.status == 206:
                if resp.headers.get("Content-Range") != f"bytes {offset}-{size - 1}/{size}":
                    raise PullInterrupted(f"peer answered the range with {resp.headers.get('Content-Range')!r}")
                log.info("resuming %s from peer %s at byte %d of %d", model["name"], peer.name, offset, size)
            elif resp.status != 200:
                raise PullInterrupted(f"peer answered HTTP {resp.status}")
            pipe = _ChunkPipe(loop)
            importing = loop.run_in_executor(None, self._import, pipe, partial, offset, peer, model, job)
            try:
                await self._receive(resp, pipe, size - offset)
                pipe.end()
            except BaseException as e:
                pipe.end(PullInterrupted(str(e) or type(e).__name__))
                with contextlib.suppress(Exception):
                    await asyncio.shield(importing)
                raise
            return await importing

    async def _receive(self, resp: aiohttp.ClientResponse, pipe: _ChunkPipe, want: int) -> None:
        loop = asyncio.get_running_loop()
        limit = self.settings.bandwidth_limit
        counter = self.metrics.peer_pull_bytes.labels("network")
        started, got, buf = loop.time(), 0, bytearray()
        try:
            async for data in resp.content.iter_chunked(BLOCK):
                got += len(data)
                if got > want:
                    raise StoreError(f"the peer sent more than the model's {want} bytes")
                buf += data
                counter.inc(len(data))
                if len(buf) >= BLOCK:
                    await pipe.put(bytes(buf))
                    buf.clear()
                if limit and (ahead := got / limit - (loop.time() - started)) > 0:
                    await asyncio.sleep(ahead)
        finally:
            if buf and got <= want:  # what arrived before an interruption still goes to the partial file
                with contextlib.suppress(PullInterrupted):
                    await pipe.put(bytes(buf))
        if got < want:
            raise PullInterrupted(f"the peer closed the transfer after {got} of {want} bytes")

    def _import(self, pipe: _ChunkPipe, partial: Path, offset: int, peer: Peer, model: dict, job) -> ModelManifest:
        """Blocking: the network's bytes into the store's verified import, appended to the partial file, which the
        store keeps if the stream breaks off."""
        self.metrics.peer_pull_bytes.labels("partial").inc(offset)

        def chunks():
            fd, unsynced = None, 0
            try:
                while (block := pipe.get()) is not None:
                    yield block
                    unsynced += len(block)
                    if unsynced >= SYNC_EVERY:  # flush as we go: the store's final fsync then has little left
                        fd = os.open(partial, os.O_RDONLY) if fd is None else fd
                        os.fdatasync(fd)
                        unsynced = 0
            finally:
                if fd is not None:
                    os.close(fd)

        try:
            return self.store.import_chunks(
                chunks(), name=model["name"], source=f"peer:{peer.name}/{peer.node}", expected_sha256=model["sha256"],
                expected_size=model["size"], license=model.get("license") if isinstance(model.get("license"), str)
                else None, on_progress=lambda n: self.jobs.progress(job, n), partial=partial)
        finally:
            pipe.close_from_thread()
