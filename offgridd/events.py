"""The daemon's event bus: subsystems publish what changed, /api/v1/events streams it to the UI."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Event:
    kind: str  # "status", "job", "models", "peers", "degraded", ...
    data: dict
    at: float


class EventBus:
    """Fan-out to subscribers with bounded queues: a slow reader loses its oldest events, never blocks the daemon."""

    def __init__(self, backlog: int = 256):
        self.backlog = backlog
        self._subscribers: set[asyncio.Queue[Event]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def publish(self, kind: str, data: dict) -> None:
        """Publish from the event loop."""
        event = Event(kind, data, time.time())
        for q in self._subscribers:
            if q.full():
                q.get_nowait()
            q.put_nowait(event)

    def publish_threadsafe(self, kind: str, data: dict) -> None:
        """Publish from an executor thread (hashing, copying)."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self.publish, kind, data)

    @contextlib.contextmanager
    def subscribe(self) -> Iterator[asyncio.Queue[Event]]:
        q: asyncio.Queue[Event] = asyncio.Queue(self.backlog)
        self._subscribers.add(q)
        try:
            yield q
        finally:
            self._subscribers.discard(q)
