"""The daemon's side of an inference worker: spawn it, stream frames to requests, restart it when it dies."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

from .protocol import FrameBuffer, FrameError, encode

log = logging.getLogger(__name__)

BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 30.0
STABLE_S = 60.0  # a worker that lived this long resets the backoff
CRASH_LIMIT = 3  # this many crashes ...
CRASH_WINDOW_S = 120.0  # ... within this window mark the model bad
ENGINE_BUG = "ggml-org/llama.cpp#20824"  # repacked (AMX) kernels that crash llama_decode on some Xeons


class InferenceError(Exception):
    """A request could not be served; status is the HTTP status to answer with."""

    def __init__(self, status: int, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


class Overloaded(InferenceError):
    """This node cannot take the request now (queue full, too hot, no memory for the model, not ready); a peer
    that has the model may take it instead."""

    def __init__(self, message: str, retry_after: float = 5):
        super().__init__(503, message, retry_after=retry_after)


class WorkerCrashed(InferenceError):
    def __init__(self, message: str):
        super().__init__(503, message, retry_after=2)


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerConfig:
    name: str
    path: Path
    threads: int
    ctx: int  # per sequence
    batch: int
    start_timeout: float
    sequences: int = 1  # requests the worker decodes together
    gpu_layers: int = 0
    flash_attn: bool = True
    memory_limit: int = 0  # RLIMIT_AS for the worker process, 0 for none
    safe: bool = False  # load without repacked weights: the engine failed its self-test with them


_CLOSED = object()


class _Link(asyncio.Protocol):
    """The daemon's end of the socketpair. Frames are handed on in the loop step that read them."""

    def __init__(self, on_frame: Callable[[dict], None]):
        self.on_frame = on_frame
        self.frames = FrameBuffer()
        self.transport: asyncio.Transport | None = None
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            for frame in self.frames.feed(data):
                self.on_frame(frame)
        except FrameError as e:
            log.error("an inference worker sent a bad frame: %s", e)
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


class InferenceWorker:
    """One child process serving one model. Requests are multiplexed by id; the worker queues them."""

    def __init__(self, config: WorkerConfig, on_restart: Callable[[str], None] | None = None,
                 on_abandoned: Callable[[str, dict], None] | None = None,
                 on_failed: Callable[[str, str], None] | None = None,
                 on_safe_path: Callable[[str, str], None] | None = None):
        self.config = config
        self.on_restart = on_restart
        self.on_abandoned = on_abandoned
        self.on_failed = on_failed
        self.on_safe_path = on_safe_path
        self.safe = config.safe
        self.self_test: dict | None = None  # the engine's self-test in the ready worker
        self.state = "stopped"  # loading | ready | restarting | failed | stopped
        self.reason = ""
        self.n_ctx = 0  # per sequence
        self.sequences = config.sequences
        self.pid: int | None = None
        self.restarts = 0
        self.threads = config.threads  # may be lowered at run time (heat); a restarted worker keeps it
        self.in_flight = 0
        self.waiting = 0  # sent to the worker, not yet started there
        self.last_used = time.monotonic()
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Queue] = {}
        self._link: _Link | None = None
        self._engine_up = False  # the model loaded; the engine self-test runs
        self._loaded = False
        self._load_error = ""
        self._proc: asyncio.subprocess.Process | None = None
        self._ready = asyncio.Event()
        self._failed = asyncio.Event()
        self._supervisor: asyncio.Task | None = None
        self._stopping = False

    async def start(self) -> None:
        """Spawn the worker and keep it alive; returns once the first load succeeded or failed."""
        self._supervisor = asyncio.create_task(self._supervise(), name=f"worker:{self.config.name}")
        await self.wait_ready(self.config.start_timeout)

    async def wait_ready(self, limit_s: float) -> None:
        if not self._ready.is_set() and not self._failed.is_set():
            waits = [asyncio.create_task(e.wait()) for e in (self._ready, self._failed)]
            try:
                await asyncio.wait(waits, timeout=limit_s, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waits:
                    w.cancel()
        if self._failed.is_set():
            raise InferenceError(503, f"model {self.config.name!r} failed to load: {self.reason}", retry_after=30)
        if not self._ready.is_set():
            raise InferenceError(503, f"model {self.config.name!r} is {self.state}: {self.reason or 'not ready'}",
                                 retry_after=5)

    async def _supervise(self) -> None:
        backoff = BACKOFF_FIRST_S
        crashes: list[float] = []
        while not self._stopping:
            born = time.monotonic()
            outcome = await self._run_once()
            if self._stopping:
                break
            if outcome == "engine-failed" and not self.safe:
                # the kernels this CPU runs on repacked weights fail: the model itself is not at fault
                self.safe = True
                note = (f"the engine failed its self-test on this CPU ({self.reason}); serving without repacked "
                        f"weights, which is slower (a known llama.cpp fault: {ENGINE_BUG})")
                log.error("model %s: %s", self.config.name, note)
                if self.on_safe_path:
                    self.on_safe_path(self.config.name, note)
                continue
            if outcome == "engine-failed":
                self.reason = f"the engine failed its self-test on the safe path too ({self.reason})"
            now = time.monotonic()
            crashes = [t for t in crashes if now - t < CRASH_WINDOW_S] + [now]
            if outcome != "exited" or len(crashes) >= CRASH_LIMIT:
                if outcome == "exited":
                    self.reason = f"the worker crashed {len(crashes)} times in {CRASH_WINDOW_S:.0f}s ({self.reason})"
                self.state = "failed"
                self._failed.set()
                log.error("model %s failed: %s", self.config.name, self.reason)
                if self.on_failed:
                    self.on_failed(self.config.name, self.reason)
                return
            self.restarts += 1
            if self.on_restart:
                self.on_restart(self.config.name)
            if now - born > STABLE_S:
                backoff = BACKOFF_FIRST_S
            self.state = "restarting"
            log.warning("inference worker for %s died (%s); restarting in %.1fs", self.config.name, self.reason,
                        backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX_S)

    async def _run_once(self) -> str:
        """Run one worker process to its end: 'exited' after serving, else 'load-failed' or 'engine-failed'."""
        self.state = "loading"
        ours, theirs = socket.socketpair()
        cfg = self.config
        try:
            self._proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "offgridd.inference.worker", "--fd", str(theirs.fileno()),
                "--model-path", str(cfg.path), "--model-name", cfg.name, "--threads", str(cfg.threads),
                "--ctx", str(cfg.ctx), "--batch", str(cfg.batch), "--sequences", str(cfg.sequences),
                "--gpu-layers", str(cfg.gpu_layers),
                "--flash-attn", str(int(cfg.flash_attn)),
                "--threads-now", str(self.threads), "--memory-limit", str(cfg.memory_limit),
                "--safe", str(int(self.safe)),
                pass_fds=(theirs.fileno(),), stdin=asyncio.subprocess.DEVNULL, env=_worker_env(),
            )
        finally:
            theirs.close()
        self.pid = self._proc.pid
        self._engine_up = self._loaded = False
        self._load_error = ""
        _, self._link = await asyncio.get_running_loop().create_unix_connection(lambda: _Link(self._on_frame),
                                                                                sock=ours)
        try:
            await self._link.closed
        finally:
            self._ready.clear()
            self._link.transport.close()
            code = await self._reap()
            self.reason = (not self._loaded and self._load_error) or f"worker exited with {describe_exit(code)}"
            for q in self._pending.values():
                q.put_nowait(_CLOSED)
        if self._loaded:
            return "exited"
        return "engine-failed" if self._engine_up else "load-failed"

    def _on_frame(self, frame: dict) -> None:
        if frame["op"] == "loaded":
            self._engine_up = True
        elif frame["op"] == "ready":
            self._loaded = True
            self.n_ctx = frame["n_ctx"]
            self.sequences = frame.get("sequences", 1)
            self.self_test = frame.get("self_test")
            self.state, self.reason = "ready", ""
            self.last_used = time.monotonic()  # idle time counts from being ready, not from the spawn
            self._ready.set()
            log.info("model %s ready in worker pid %s (n_ctx %s)", self.config.name, self.pid, self.n_ctx)
        elif not self._loaded and frame["op"] == "error":
            self._load_error = frame.get("message", "unknown error")
        elif (q := self._pending.get(frame.get("id"))) is not None:
            q.put_nowait(frame)
        elif frame["op"] == "done" and self.on_abandoned:
            self.on_abandoned(self.config.name, frame)  # the end of a request whose client left

    async def _reap(self) -> int | None:
        proc = self._proc
        if proc is None:
            return None
        try:
            async with asyncio.timeout(5):
                return await proc.wait()
        except TimeoutError:
            proc.kill()
            return await proc.wait()

    async def request(self, frame: dict) -> AsyncIterator[dict]:
        """Send one request and yield its frames until it ends; cancels it in the worker if the caller stops early."""
        self.last_used = time.monotonic()
        self.in_flight += 1
        try:
            await self.wait_ready(self.config.start_timeout)
            rid = next(self._ids)
            q: asyncio.Queue = asyncio.Queue()
            self._pending[rid] = q
            finished = started = False
            self.waiting += 1
            try:
                self._send({**frame, "id": rid})
                while True:
                    msg = await q.get()
                    if msg is _CLOSED:
                        raise WorkerCrashed(f"the inference worker stopped during the request ({self.reason}); "
                                            "it is being restarted, try again")
                    if msg["op"] == "start" or (not started and msg["op"] in ("done", "error", "embedding")):
                        started = True
                        self.waiting -= 1
                    if msg["op"] == "error":
                        finished = True
                        raise InferenceError(msg.get("status", 500), msg.get("message", "inference failed"))
                    finished = msg["op"] in ("done", "embedding")
                    yield msg
                    if finished:
                        return
                    if msg["op"] == "token":  # the caller has passed it on: the worker may decode the next one
                        with contextlib.suppress(ConnectionError, RuntimeError, WorkerCrashed):
                            self._send({"op": "ack", "id": rid})
            finally:
                if not started:
                    self.waiting -= 1
                self._pending.pop(rid, None)
                if not finished and self.state == "ready":
                    with contextlib.suppress(ConnectionError, RuntimeError, WorkerCrashed):
                        self._send({"op": "cancel", "id": rid})
        finally:
            self.in_flight -= 1
            self.last_used = time.monotonic()

    def _send(self, frame: dict) -> None:
        if self._link is None or self._link.transport.is_closing():
            raise WorkerCrashed("the inference worker is not running")
        self._link.transport.write(encode(frame))

    async def stop(self) -> None:
        self._stopping = True
        self.state = "stopped"
        if self._proc and self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.terminate()
        if self._supervisor:
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor

    def set_threads(self, threads: int) -> None:
        self.threads = threads
        if self.state == "ready":
            with contextlib.suppress(ConnectionError, RuntimeError, WorkerCrashed):
                self._send({"op": "threads", "id": 0, "n": threads})

    def kill(self) -> None:
        """Kill the process as a crash would (used by tests and by the watchdog of a stuck worker)."""
        if self._proc and self._proc.returncode is None:
            self._proc.kill()


def _worker_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("NOTIFY_SOCKET", None)  # only the daemon talks to systemd
    return env


def describe_exit(code: int | None) -> str:
    """A process's return code in words: "signal SIGSEGV", "exit code 3"."""
    if code is None:
        return "an unknown status"
    if code < 0:
        import signal

        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:  # a real-time signal has no name
            return f"signal {-code}"
    return f"exit code {code}"
