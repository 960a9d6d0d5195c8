"""Admission control: a few requests at the worker, a bounded queue behind them, 503 + Retry-After past it."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator, Callable

from .client import Overloaded


class Admission:
    """Slots and queue bounds change at run time (the degradation ladder turns them); waiters are served in order."""

    def __init__(self, slots: int, depth: int, timeout: float, on_reject: Callable[[str], None] | None = None):
        self.slots = slots
        self.depth = depth
        self.timeout = timeout
        self.on_reject = on_reject
        self.active = 0
        self.paused: str | None = None  # why no new work is admitted (e.g. critical temperature)
        self._waiters: deque[asyncio.Future] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def _reject(self, reason: str, message: str, retry_after: float) -> Overloaded:
        if self.on_reject:
            self.on_reject(reason)
        return Overloaded(message, retry_after=retry_after)

    @contextlib.asynccontextmanager
    async def ticket(self) -> AsyncIterator[None]:
        """Hold a slot for the length of one request; waits in the queue, or raises Overloaded."""
        if self.paused:
            raise self._reject("paused", f"not accepting new work: {self.paused}", 30)
        if self.active < self.slots and not self._waiters:
            self.active += 1
        else:
            if len(self._waiters) >= self.depth:
                raise self._reject("queue_full", f"busy: {self.active} requests running and {len(self._waiters)} "
                                   "waiting; try again shortly", 5 + 2 * len(self._waiters))
            granted = asyncio.get_running_loop().create_future()
            self._waiters.append(granted)
            admitted = False
            try:
                async with asyncio.timeout(self.timeout):
                    await granted
                admitted = True
            except TimeoutError:
                raise self._reject("timeout", f"waited {self.timeout:.0f}s in the queue without a turn", 10) from None
            finally:
                if not admitted:  # timed out, or the client left
                    with contextlib.suppress(ValueError):
                        self._waiters.remove(granted)
                    if granted.done() and not granted.cancelled():
                        self._release()  # a slot was granted at the very moment we gave up: pass it on
                    granted.cancel()
        try:
            yield
        finally:
            self._release()

    def _release(self) -> None:
        self.active -= 1
        self._wake()

    def _wake(self) -> None:
        while self.active < self.slots and self._waiters:
            granted = self._waiters.popleft()
            if not granted.done():
                self.active += 1  # counted at grant time, so no other request can take it meanwhile
                granted.set_result(None)

    def apply(self, slots: int, depth: int, paused: str | None = None) -> None:
        """Take new limits (the degradation ladder turns them); waiters that now fit are admitted at once."""
        self.slots, self.depth, self.paused = max(1, slots), max(0, depth), paused
        self._wake()
