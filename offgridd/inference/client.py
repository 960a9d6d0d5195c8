"""The daemon's side of an inference worker: spawn it, stream frames to requests, restart it when it dies.

The supervisor never dies: a worker that cannot be spawned (EMFILE, ENOMEM, EAGAIN) is retried with backoff and
requests get a 503 meanwhile; a worker that sends no frame for `stall_timeout` while it owes a request one is killed
and restarted; a model is marked bad only for faults of its own: a failed load, or crashes during its requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import signal
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
STOP_GRACE_S = 10.0  # a worker asked to stop that is still there after this is killed
STALL_S = 60.0  # a worker silent this long while it owes a request a frame is stuck (native code, a looping template)
# The worker sends nothing while it evaluates a prompt alone (one llama_decode per n_batch tokens): 3,691 tokens took
# 27.7 s on gemma3-270m here, and larger models on a Pi are much slower. Until it reports progress, a prompt being
# evaluated (or inputs being embedded) extends the silence allowed by its tokens at this assumed slowest rate.
PREFILL_FLOOR_TPS = 2.0
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
    stall_timeout: float = STALL_S  # seconds without a frame, while a request is open in the worker, before a kill


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
        except (FrameError, KeyError, TypeError, ValueError) as e:  # a frame of the wrong shape is a broken worker
            log.error("an inference worker sent a bad frame: %s", e or type(e).__name__)
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
        self._stopped = asyncio.Event()  # wakes the supervisor from a backoff wait
        self._setback = asyncio.Event()  # the last spawn failed: requests get a 503 now instead of waiting
        self._retry_after = BACKOFF_FIRST_S
        self._open: set[int] = set()  # requests the worker owes a frame: sent, their last frame not received
        self._allowance: dict[int, float] = {}  # request -> extra silence allowed while its prompt is evaluated
        self._heard = time.monotonic()  # the worker's last frame, or the moment it started owing one
        self._stalled = ""

    async def start(self) -> None:
        """Spawn the worker and keep it alive; returns once the first load succeeded or failed, or once a spawn
        failed (the supervisor retries it; requests meanwhile get a 503 naming why)."""
        self._supervisor = asyncio.create_task(self._supervise(), name=f"worker:{self.config.name}")
        await self._wait(self.config.start_timeout)
        if self._setback.is_set() and not self._ready.is_set() and not self._failed.is_set():
            log.warning("model %s: %s", self.config.name, self.reason)
            return
        await self.wait_ready(0)

    async def _wait(self, limit_s: float) -> None:
        events = (self._ready, self._failed, self._setback)
        if limit_s > 0 and not any(e.is_set() for e in events):
            waits = [asyncio.create_task(e.wait()) for e in events]
            try:
                await asyncio.wait(waits, timeout=limit_s, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waits:
                    w.cancel()

    async def wait_ready(self, limit_s: float) -> None:
        await self._wait(limit_s)
        if self._setback.is_set() and not self._ready.is_set() and not self._failed.is_set():
            raise Overloaded(f"model {self.config.name!r} cannot start its worker now: {self.reason}",
                             retry_after=max(1.0, self._retry_after))
        if self._failed.is_set():
            raise InferenceError(503, f"model {self.config.name!r} failed to load: {self.reason}", retry_after=30)
        if not self._ready.is_set():
            raise InferenceError(503, f"model {self.config.name!r} is {self.state}: {self.reason or 'not ready'}",
                                 retry_after=5)

    async def _supervise(self) -> None:
        backoff = spawn_backoff = BACKOFF_FIRST_S
        crashes: list[float] = []
        while not self._stopping:
            born = time.monotonic()
            try:
                outcome = await self._run_once()
            except Exception as e:  # a bug here must not leave the model "loading" forever: retry as a spawn error
                log.exception("supervising the worker for %s failed", self.config.name)
                self.kill()  # never two workers for one model
                self.reason, outcome = f"the supervisor failed: {type(e).__name__}: {e}", "spawn-failed"
            if self._stopping:
                break
            if outcome == "spawn-failed":
                # the machine's fault (no fds, memory or processes now), not the model's: never counted as a crash
                self._retry_after = spawn_backoff
                self.reason = f"{self.reason}; retrying in {spawn_backoff:.1f}s"
                self.state = "restarting"
                self._setback.set()
                log.error("cannot start the inference worker for %s: %s", self.config.name, self.reason)
                await self._pause(spawn_backoff)
                spawn_backoff = min(spawn_backoff * 2, BACKOFF_MAX_S)
                continue
            spawn_backoff = BACKOFF_FIRST_S
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
            crashes = [t for t in crashes if now - t < CRASH_WINDOW_S]
            if outcome == "crashed":  # died while serving requests: the model's fault if it keeps happening
                crashes.append(now)
            if outcome in ("load-failed", "engine-failed") or len(crashes) >= CRASH_LIMIT:
                if outcome == "crashed":
                    self.reason = (f"the worker crashed {len(crashes)} times during requests in "
                                   f"{CRASH_WINDOW_S:.0f}s ({self.reason})")
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
            await self._pause(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX_S)

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._stopped.wait()

    def _spawn_args(self, fd: int) -> list[str]:
        cfg = self.config
        return [sys.executable, "-m", "offgridd.inference.worker", "--fd", str(fd),
                "--model-path", str(cfg.path), "--model-name", cfg.name, "--threads", str(cfg.threads),
                "--ctx", str(cfg.ctx), "--batch", str(cfg.batch), "--sequences", str(cfg.sequences),
                "--gpu-layers", str(cfg.gpu_layers), "--flash-attn", str(int(cfg.flash_attn)),
                "--threads-now", str(self.threads), "--memory-limit", str(cfg.memory_limit),
                "--safe", str(int(self.safe))]

    async def _spawn(self) -> bool:
        """Start a worker process connected to a new link; False (with the reason) when the machine cannot now."""
        ours = theirs = None
        self._proc = self._link = None
        try:
            ours, theirs = socket.socketpair()
            self._proc = await asyncio.create_subprocess_exec(
                *self._spawn_args(theirs.fileno()), pass_fds=(theirs.fileno(),), stdin=asyncio.subprocess.DEVNULL,
                env=_worker_env())
            theirs.close()
            _, self._link = await asyncio.get_running_loop().create_unix_connection(
                lambda: _Link(self._on_frame), sock=ours)
        except OSError as e:  # EMFILE, ENFILE, ENOMEM, EAGAIN: the machine is short of something, not the model
            for sock in (ours, theirs):
                if sock is not None:
                    sock.close()
            if self._proc is not None and self._proc.returncode is None:
                self._proc.kill()
                await self._proc.wait()
            self._proc = None
            self.reason = f"could not start the worker: {e.strerror or e}"
            return False
        self.pid = self._proc.pid
        self._setback.clear()
        return True

    async def _run_once(self) -> str:
        """Run one worker process to its end: 'exited' (idle) or 'crashed' (during requests) after serving, else
        'load-failed', 'engine-failed', or 'spawn-failed' when no process could be started."""
        self.state = "loading"
        self._engine_up = self._loaded = False
        self._load_error = self._stalled = ""
        if not await self._spawn():
            return "spawn-failed"
        watch = asyncio.create_task(self._watch(time.monotonic()), name=f"watch:{self.config.name}")
        owed = False
        try:
            await self._link.closed
        finally:
            watch.cancel()
            owed = bool(self._open)
            self._open.clear()
            self._allowance.clear()
            self._ready.clear()
            try:
                self._link.transport.close()
                code = await self._reap()
                self.reason = ((not self._loaded and self._load_error) or self._stalled
                               or f"worker exited with {describe_exit(code)}")
            finally:  # whatever happened above, no request may wait for a worker that is gone
                for q in self._pending.values():
                    q.put_nowait(_CLOSED)
        if self._loaded:
            return "crashed" if owed else "exited"
        return "engine-failed" if self._engine_up else "load-failed"

    async def _watch(self, spawned: float) -> None:
        """Kill a worker that hangs: silent too long while it owes a request a frame, or never ready."""
        stall = self.config.stall_timeout
        while True:
            await asyncio.sleep(min(1.0, stall / 4))
            now = time.monotonic()
            limit = stall + sum(self._allowance.values())
            if self._loaded and self._open and now - self._heard > limit:
                self._stalled = (f"the worker sent nothing for {now - self._heard:.0f}s while serving "
                                 f"{len(self._open)} request(s): stuck in native code or in a chat template; killed")
            elif not self._loaded and now - spawned > self.config.start_timeout:
                self._stalled = f"the worker was not ready after {self.config.start_timeout:.0f}s; killed"
            else:
                continue
            log.error("inference worker for %s (pid %s): %s", self.config.name, self.pid, self._stalled)
            self.kill()
            return

    def _on_frame(self, frame: dict) -> None:
        self._heard = time.monotonic()
        if frame["op"] == "start" and frame.get("id") in self._open:  # its prompt is evaluated now, silently
            self._allowance[frame["id"]] = frame.get("prompt_tokens", 0) / PREFILL_FLOOR_TPS
        elif frame["op"] in ("token", "done", "error", "embedding"):
            self._allowance.pop(frame.get("id"), None)
        if frame["op"] in ("done", "error", "embedding"):
            self._open.discard(frame.get("id"))
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
                if not self._open:  # the worker was idle: its silence counts from now
                    self._heard = time.monotonic()
                self._send({**frame, "id": rid})
                self._open.add(rid)
                if frame.get("op") == "embed":  # no frame until all are embedded, after a first load of the embedder
                    chars = sum(len(s) for s in frame.get("input") or () if isinstance(s, str))
                    self._allowance[rid] = self.config.start_timeout + chars / PREFILL_FLOOR_TPS
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
        self._stopped.set()
        self.state = "stopped"
        if self._proc and self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.terminate()
        if self._supervisor:
            try:  # a worker stopped by SIGSTOP, or stuck in native code, never acts on SIGTERM
                async with asyncio.timeout(STOP_GRACE_S):
                    await asyncio.shield(self._supervisor)
            except TimeoutError:
                self.kill()
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
            with contextlib.suppress(ProcessLookupError):  # it died a moment ago
                self._proc.kill()


def _worker_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("NOTIFY_SOCKET", None)  # only the daemon talks to systemd
    return env


def describe_exit(code: int | None) -> str:
    """A process's return code in words: "signal SIGSEGV", "signal 35 (SIGRTMIN+1)", "exit code 3"; never raises."""
    if code is None:
        return "an unknown status"
    if code >= 0:
        return f"exit code {code}"
    number = -code
    if signal.SIGRTMIN <= number <= signal.SIGRTMAX:  # real-time signals have no names of their own
        return f"signal {number} (SIGRTMIN+{number - signal.SIGRTMIN})"
    try:
        return f"signal {signal.Signals(number).name}"
    except ValueError:
        return f"signal {number}"
