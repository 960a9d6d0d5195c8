"""Inference's one entry: admit a request, find its model's worker, run it, and count it.

The HTTP layer (or anything else) asks `Inference.generate(...)` for a started `Generation` and reads typed events
from it; it never sees worker frames. The counts every report reads (requests active, waiting, served, the last
speed) have this one owner.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from ..metrics import Metrics
from .admission import Admission
from .pool import ModelPool


@dataclass(frozen=True, slots=True)
class Token:
    """Text of one choice, as the worker batched it (one token or several)."""

    text: str
    index: int = 0  # the choice it belongs to
    logprobs: list | None = None  # per token, when the request asked for them


@dataclass(frozen=True, slots=True)
class Done:
    prompt_tokens: int
    completion_tokens: int
    finish_reasons: list[str]  # one per choice: "stop" | "length"


@dataclass(frozen=True, slots=True)
class Embeddings:
    model: str
    vectors: list[list[float]]
    prompt_tokens: int


def _done(frame: dict) -> Done:
    return Done(frame["prompt_tokens"], frame["completion_tokens"],
                frame.get("finish_reasons") or [frame["finish_reason"]])


class Generation:
    """A request the worker has started. Iterate it for Token events and one Done; close it (async with) when
    finished with it, which cancels it in the worker if it was not done."""

    def __init__(self, model: str, frames: AsyncIterator[dict], owner: Inference, stack: contextlib.AsyncExitStack):
        self.model = model  # the model answering: it may stand in for one that does not fit
        self.done: Done | None = None
        self._frames, self._owner, self._stack = frames, owner, stack
        self._arrived = time.monotonic()
        self._first: float | None = None

    async def __aenter__(self) -> Generation:
        return self

    async def __aexit__(self, *exc) -> None:
        await self._stack.aclose()

    async def __aiter__(self) -> AsyncIterator[Token | Done]:
        async for frame in self._frames:
            op = frame["op"]
            if op == "token":
                if self._first is None:
                    self._first = time.monotonic()
                    self._owner.metrics.ttft.labels(self.model).observe(self._first - self._arrived)
                yield Token(frame["text"], frame.get("index", 0), frame.get("logprobs"))
            elif op == "done":
                self.done = _done(frame)
                self._owner._finished(self.model, self.done, self._first)
                yield self.done


class Inference:
    def __init__(self, pool: ModelPool, admission: Admission, metrics: Metrics,
                 gate: Callable[[str | None], str] | None = None):
        self.pool = pool
        self.admission = admission
        self.metrics = metrics
        # the model to serve for a request's `model` (None: the default), or Overloaded while none can be served;
        # the runtime sets it, as it knows whether the appliance is ready
        self.gate = gate or (lambda model: model or pool.settings.model)
        self.active = 0  # requests admitted and started or loading
        self.served = 0  # requests completed
        self.last_tokens_per_second = 0.0
        self.idle = asyncio.Event()  # set while no request is in progress
        self.idle.set()

    @property
    def waiting(self) -> int:
        """Requests not started yet: queued for a slot, or handed to a worker that has not begun them. /health,
        /metrics, the STATUS line and peer announcements (which route by it) all read this one number."""
        return self.admission.waiting + self.pool.waiting

    async def generate(self, model: str | None, *, prompt: str | None = None, messages: list[dict] | None = None,
                       params: dict) -> Generation:
        """Admit and start a request. Raises before it starts (UnknownModel, Overloaded, InferenceError), so the
        caller can still answer with a plain status or route it elsewhere."""
        frame = {"op": "generate", "prompt": prompt, "messages": messages, "params": params}
        stack = contextlib.AsyncExitStack()
        try:
            worker = await self._enter(stack, model)
            frames = await stack.enter_async_context(contextlib.aclosing(worker.request(frame)))
            await anext(frames)  # "start": the worker took it
        except BaseException:
            await stack.aclose()
            raise
        return Generation(worker.config.name, frames, self, stack)

    async def embed(self, model: str | None, inputs: list[str]) -> Embeddings:
        async with contextlib.AsyncExitStack() as stack:
            worker = await self._enter(stack, model)
            frames = await stack.enter_async_context(
                contextlib.aclosing(worker.request({"op": "embed", "input": inputs})))
            frame = await anext(frames)
        name = worker.config.name
        self.metrics.prompt_tokens.labels(name).inc(frame["prompt_tokens"])
        return Embeddings(name, frame["data"], frame["prompt_tokens"])

    async def _enter(self, stack: contextlib.AsyncExitStack, model: str | None):
        name = self.gate(model)
        await stack.enter_async_context(self.admission.ticket())
        worker = await self.pool.worker_for(name)
        self._begin()
        stack.callback(self._end)
        return worker

    def _begin(self) -> None:
        self.active += 1
        self.metrics.in_flight.set(self.active)
        self.idle.clear()

    def _end(self) -> None:
        self.active -= 1
        self.metrics.in_flight.set(self.active)
        if not self.active:
            self.idle.set()

    def _finished(self, name: str, done: Done, first: float | None) -> None:
        m = self.metrics
        m.prompt_tokens.labels(name).inc(done.prompt_tokens)
        m.completion_tokens.labels(name).inc(done.completion_tokens)
        n = done.completion_tokens
        if first is not None and n > 1 and (spent := time.monotonic() - first) > 0:
            self.last_tokens_per_second = (n - 1) / spent
            m.speed.labels(name).observe(self.last_tokens_per_second)
        self.served += 1

