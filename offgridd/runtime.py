"""What the running daemon knows about itself, shared by the HTTP handlers and the health reporting."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Protocol

from .db import Database
from .events import EventBus
from .hardware.profiles import Detection
from .inference import ModelPool
from .inference.admission import Admission
from .jobs import JobBoard
from .metrics import Metrics
from .settings import Settings
from .store import ModelStore


class Service(Protocol):
    """A subsystem that runs beside the API (USB watch, peers, hardware watch)."""

    name: str

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def describe(self) -> dict:
        """What /health and the UI show about it."""
        ...


@dataclass(kw_only=True, eq=False)
class Runtime:
    settings: Settings
    store: ModelStore
    pool: ModelPool
    metrics: Metrics
    db: Database
    admission: Admission
    detection: Detection | None = None  # the board profile and why it was chosen
    bus: EventBus = field(default_factory=EventBus)
    jobs: JobBoard = field(init=False)
    services: list[Service] = field(default_factory=list)
    started_at: float = field(default_factory=time.time)
    phase: str = "starting"  # starting | loading | ready | unavailable (no model can be served) | stopping
    reason: str = ""  # why the phase is not ready, in words a person can act on
    served: int = 0  # inference requests completed
    active: int = 0  # inference requests in progress; change it through begin_request/end_request
    last_tokens_per_second: float = 0.0
    idle: asyncio.Event = field(default_factory=asyncio.Event)  # set while no inference request is in progress
    stop_requested: asyncio.Event = field(default_factory=asyncio.Event)  # SIGTERM, or a long button press

    def __post_init__(self) -> None:
        self.idle.set()
        self.jobs = JobBoard(self.db, self.bus)

    def begin_request(self) -> None:
        self.active += 1
        self.metrics.in_flight.set(self.active)
        self.idle.clear()

    def end_request(self) -> None:
        self.active -= 1
        self.metrics.in_flight.set(self.active)
        if not self.active:
            self.idle.set()

    @property
    def waiting(self) -> int:
        """Inference requests not started yet: queued for a slot, or handed to a worker that has not begun them.
        /health, /metrics and peer announcements (which route by it) all read this one number."""
        return self.admission.waiting + self.pool.waiting

    @property
    def ready(self) -> bool:
        return self.phase == "ready"

    def degraded(self) -> list[dict]:
        """Everything that is not as configured, each with its reason: /health, STATUS and the UI list these."""
        out = [{"step": "model-substituted", "model": name, "reason": note} for name, note in self.pool.notes.items()]
        out += [{"step": "model-bad", "model": name, "reason": why} for name, why in self.pool.bad.items()]
        out += [{"step": "engine-safe-mode", "model": name, "reason": why} for name, why in self.pool.safe_path.items()]
        for service in self.services:
            out += service.describe().get("degraded", [])
        return out

    def uptime(self) -> float:
        return time.time() - self.started_at
