"""The running appliance: its core parts, its services by name and type, and its phase. Built by the daemon, read by
the HTTP layer and the status model."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Protocol

from .audit import Audit
from .db import Database
from .documents import DocumentStore
from .events import EventBus
from .hardware.profiles import Detection
from .hardware.service import HardwareService
from .history import ConversationStore
from .inference import Inference, Overloaded
from .jobs import JobBoard
from .keys import KeyRing
from .metrics import Metrics
from .peers import PeerService
from .settings import Settings
from .store import ModelStore
from .usb.watcher import UsbWatcher
from .voice import VoiceService


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
    inference: Inference
    metrics: Metrics
    db: Database
    bus: EventBus
    jobs: JobBoard
    keys: KeyRing
    audit: Audit
    detection: Detection | None = None  # the board profile and why it was chosen
    hardware: HardwareService | None = None  # None where disabled (no board profile) ...
    usb: UsbWatcher | None = None
    peers: PeerService | None = None
    history: ConversationStore | None = None
    voice: VoiceService | None = None
    documents: DocumentStore | None = None  # uploads searched and chats grounded in them
    running: list[Service] = field(default_factory=list)  # ... or not running: it failed to start
    started_at: float = field(default_factory=time.time)
    phase: str = "starting"  # starting | loading | ready | unavailable (no model can be served) | stopping
    reason: str = ""  # why the phase is not ready, in words a person can act on
    stop_requested: asyncio.Event = field(default_factory=asyncio.Event)  # SIGTERM, or a long button press

    def __post_init__(self) -> None:
        self.inference.gate = self.admit

    @property
    def services(self) -> list[Service]:
        """The services this box is configured to run, started or not, in start order."""
        return [s for s in (self.hardware, self.usb, self.peers, self.voice) if s is not None]

    def admit(self, model: str | None) -> str:
        """The model to serve for a request; refused (as Overloaded, so a peer may take it) while starting,
        stopping, or while the default model cannot be served and the request asks for it."""
        model = model or self.settings.model
        if self.ready or (self.phase == "unavailable" and model != self.settings.model):
            return model
        raise Overloaded(f"the appliance is {self.phase}: {self.reason or 'no model is ready yet'}", retry_after=5)

    @property
    def ready(self) -> bool:
        return self.phase == "ready"

    def degraded(self) -> list[dict]:
        """Everything that is not as configured, each with its reason: /health, STATUS and the UI list these."""
        pool = self.inference.pool
        out = [{"step": "model-substituted", "model": name, "reason": note} for name, note in pool.notes.items()]
        out += [{"step": "model-bad", "model": name, "reason": why} for name, why in pool.bad.items()]
        out += [{"step": "engine-safe-mode", "model": name, "reason": why} for name, why in pool.safe_path.items()]
        for service in self.running:
            out += service.describe().get("degraded", [])
        return out

    def uptime(self) -> float:
        return time.time() - self.started_at
