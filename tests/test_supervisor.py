"""The worker's supervisor never dies: spawn errors are retried, a hung worker is killed, any signal is described.

These run the real worker on the built-in model, without the daemon: the supervisor is what is under test.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
import socket
import time

import pytest

from offgridd.inference import client as client_module
from offgridd.inference.client import (
    InferenceError,
    InferenceWorker,
    Overloaded,
    WorkerConfig,
    WorkerCrashed,
    describe_exit,
)
from offgridd.store import ModelStore

LONG = {"op": "generate", "prompt": "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,",
        "params": {"max_tokens": 2000, "temperature": 0}}
SHORT = {"op": "generate", "prompt": "The sea is", "params": {"max_tokens": 4, "temperature": 0}}


class Watched:
    """A worker with its callbacks recorded."""

    def __init__(self, path, **config):
        self.failed: list[str] = []
        self.restarted = 0
        cfg = {"name": "gemma3-270m", "path": path, "threads": 2, "ctx": 512, "batch": 128, "start_timeout": 120,
               **config}
        self.worker = InferenceWorker(WorkerConfig(**cfg), on_restart=self._restart,
                                      on_failed=lambda name, why: self.failed.append(why))

    def _restart(self, name: str) -> None:
        self.restarted += 1


@pytest.fixture
def model_path(model_state):
    store = ModelStore(model_state / "models")
    return store.path_of(store.get("gemma3-270m"))


async def answer(worker: InferenceWorker, frame: dict) -> str:
    return "".join([f.get("text", "") async for f in worker.request(frame)])


async def interrupted(worker: InferenceWorker, hurt) -> tuple[WorkerCrashed, float]:
    """Run a long generation, call hurt(pid) after its third token; the error it ends with, and how long after."""
    tokens, hurt_at = 0, None
    with pytest.raises(WorkerCrashed) as e:
        async for frame in worker.request(LONG):
            if frame["op"] == "token":
                tokens += 1
                if tokens == 3:
                    hurt(worker.pid)
                    hurt_at = time.monotonic()
    assert hurt_at is not None, "the generation ended before it could be interrupted"
    return e.value, time.monotonic() - hurt_at


async def until_ready(worker: InferenceWorker) -> None:
    """Wait out the spawn retries (each answered with Overloaded at once) until the worker is ready."""
    async with asyncio.timeout(60):
        while True:
            try:
                return await worker.wait_ready(60)
            except Overloaded:
                await asyncio.sleep(0.1)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_signals_are_described_in_words_and_real_time_ones_never_raise():
    assert describe_exit(-signal.SIGSEGV) == "signal SIGSEGV"
    assert describe_exit(-signal.SIGRTMIN) == f"signal {int(signal.SIGRTMIN)} (SIGRTMIN+0)"
    assert describe_exit(-(signal.SIGRTMIN + 1)) == f"signal {signal.SIGRTMIN + 1} (SIGRTMIN+1)"
    assert describe_exit(-signal.SIGRTMAX).endswith(f"(SIGRTMIN+{signal.SIGRTMAX - signal.SIGRTMIN})")
    assert describe_exit(-200) == "signal 200"
    assert describe_exit(3) == "exit code 3" and describe_exit(None) == "an unknown status"


async def test_a_worker_that_cannot_be_spawned_for_lack_of_fds_is_retried_and_the_model_is_not_marked_bad(
        model_path, monkeypatch):
    real = socket.socketpair
    refusals = []

    def out_of_fds(*args, **kwargs):
        if len(refusals) < 3:  # the first three spawns: 0.5 + 1 + 2 s of backoff
            refusals.append(time.monotonic())
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
        return real(*args, **kwargs)

    monkeypatch.setattr(client_module.socket, "socketpair", out_of_fds)
    fds = open_fds()
    w = Watched(model_path)
    started = time.monotonic()
    await w.worker.start()  # returns at the first refusal, without raising: the pool must not mark the model bad
    assert time.monotonic() - started < 5 and w.worker.state == "restarting"
    asked = time.monotonic()
    with pytest.raises(Overloaded) as e:  # a request meanwhile gets a 503 at once, naming why
        await answer(w.worker, SHORT)
    assert time.monotonic() - asked < 1
    assert e.value.status == 503 and "Too many open files" in str(e.value) and e.value.retry_after >= 1
    await until_ready(w.worker)
    assert len(refusals) == 3
    assert await answer(w.worker, SHORT)
    assert w.failed == [] and w.restarted == 0
    await w.worker.stop()
    assert open_fds() <= fds, "a spawn that failed left a file descriptor open"


async def test_a_worker_that_fails_to_fork_is_retried_and_both_socket_ends_are_closed(model_path, monkeypatch):
    real, real_pair = asyncio.create_subprocess_exec, socket.socketpair
    made, failed = [], []

    def counting_socketpair(*args, **kwargs):
        pair = real_pair(*args, **kwargs)
        made.append(pair)
        return pair

    async def no_processes(*args, **kwargs):
        if not failed:
            failed.append(1)
            raise BlockingIOError(errno.EAGAIN, os.strerror(errno.EAGAIN))
        return await real(*args, **kwargs)

    monkeypatch.setattr(client_module.socket, "socketpair", counting_socketpair)
    monkeypatch.setattr(client_module.asyncio, "create_subprocess_exec", no_processes)
    w = Watched(model_path)
    await w.worker.start()
    await until_ready(w.worker)
    assert w.failed == []
    assert [s.fileno() for s in made[0]] == [-1, -1], "the failed spawn left its socketpair open"
    await w.worker.stop()


async def test_a_hung_worker_is_killed_the_request_gets_a_503_and_the_next_request_succeeds(model_path):
    w = Watched(model_path, stall_timeout=5)  # 3 s was once reached by a healthy step on 2 loaded cores
    await w.worker.start()
    pid = w.worker.pid
    try:
        error, after = await interrupted(w.worker, lambda p: os.kill(p, signal.SIGSTOP))
        assert error.status == 503 and "sent nothing for" in str(error)
        assert 5 <= after < 12, f"the hung worker was noticed after {after:.1f}s"
        await w.worker.wait_ready(60)
        assert w.worker.pid != pid and w.restarted == 1 and w.failed == []
        assert await answer(w.worker, SHORT)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        await w.worker.stop()


async def test_an_idle_worker_is_never_killed_for_silence(model_path):
    w = Watched(model_path, stall_timeout=1)
    await w.worker.start()
    pid = w.worker.pid
    await asyncio.sleep(3)  # silent, owing nothing (a request with a 1 s bound could be starved on 2 loaded cores)
    assert w.worker.state == "ready" and w.worker.pid == pid and w.restarted == 0
    await w.worker.stop()


async def test_a_long_prompt_evaluated_in_silence_is_not_taken_for_a_hang(model_path):
    """The worker sends nothing while it evaluates a prompt alone (measured: 3,691 tokens, 27.7 s on 2 loaded cores)."""
    stall = 8  # above the few seconds a loaded machine was seen to starve the worker between frames
    w = Watched(model_path, threads=1, ctx=4096, batch=512, stall_timeout=stall)
    await w.worker.start()
    pid = w.worker.pid
    prompt = " ".join(f"word{i}" for i in range(950))  # about 3,700 tokens
    silence, last = 0.0, time.monotonic()
    async for _frame in w.worker.request({"op": "generate", "prompt": prompt,
                                          "params": {"max_tokens": 2, "temperature": 0}}):
        silence, last = max(silence, time.monotonic() - last), time.monotonic()
    assert w.worker.pid == pid and w.restarted == 0
    await w.worker.stop()
    if silence <= stall:
        pytest.skip(f"this machine evaluated the prompt with at most {silence:.1f}s between frames: nothing to test")


async def test_a_worker_killed_by_a_real_time_signal_is_described_and_restarted(model_path):
    w = Watched(model_path)
    await w.worker.start()
    pid = w.worker.pid
    rt = signal.SIGRTMIN + 1
    error, _ = await interrupted(w.worker, lambda p: os.kill(p, rt))
    assert error.status == 503 and f"signal {rt} (SIGRTMIN+1)" in str(error)
    await w.worker.wait_ready(60)
    assert w.worker.pid != pid and w.restarted == 1 and w.failed == []
    assert await answer(w.worker, SHORT)
    await w.worker.stop()


async def restarted(worker: InferenceWorker, pid: int) -> None:
    """Wait for a new worker process (not `pid`) to be ready."""
    async with asyncio.timeout(60):
        while True:
            if worker.pid != pid and worker.state == "ready":
                return
            await asyncio.sleep(0.05)


async def test_crashes_while_idle_never_mark_the_model_bad_but_three_during_its_requests_do(model_path, monkeypatch):
    monkeypatch.setattr(client_module, "BACKOFF_FIRST_S", 0.05)
    w = Watched(model_path)
    await w.worker.start()
    for _ in range(3):  # the OOM killer taking an idle worker is not the model's fault
        pid = w.worker.pid
        os.kill(pid, signal.SIGKILL)
        await restarted(w.worker, pid)
    assert w.failed == [] and w.restarted == 3
    for crash in range(3):
        pid = w.worker.pid
        await interrupted(w.worker, lambda p: os.kill(p, signal.SIGSEGV))
        if crash < 2:
            await restarted(w.worker, pid)
    with pytest.raises(InferenceError, match="crashed 3 times during requests"):
        await w.worker.wait_ready(30)
    assert w.worker.state == "failed" and len(w.failed) == 1 and "signal SIGSEGV" in w.failed[0]
    await w.worker.stop()
