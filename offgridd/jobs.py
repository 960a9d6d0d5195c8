"""Long jobs (USB imports, peer pulls): live progress on the event bus, results with reasons in sqlite."""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import asdict, dataclass, field

from .db import Database
from .events import EventBus

PUBLISH_EVERY_S = 0.25
KEEP_UNRECORDED = 50


@dataclass(slots=True, kw_only=True)
class Job:
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    kind: str  # "usb-import", "peer-pull", ...
    source: str  # where the bytes come from, in words a person recognises
    model: str = ""
    state: str = "running"  # running | done | skipped | failed
    bytes_done: int = 0
    bytes_total: int = 0
    started: float = field(default_factory=time.time)
    finished: float = 0.0
    reason: str = ""

    def to_dict(self) -> dict:
        out = asdict(self)
        spent = (self.finished or time.time()) - self.started
        rate = self.bytes_done / spent if spent > 0 else 0.0
        out["rate_bytes_per_s"] = round(rate)
        left = self.bytes_total - self.bytes_done
        out["eta_s"] = round(left / rate, 1) if self.state == "running" and rate > 0 and left > 0 else None
        return out


class JobBoard:
    """Thread-safe: jobs run in executor threads and report from there."""

    def __init__(self, db: Database, bus: EventBus):
        self.db = db
        self.bus = bus
        self._running: dict[str, Job] = {}
        self._published: dict[str, float] = {}
        self._unrecorded: dict[str, Job] = {}  # finished jobs whose row could not be written: still listed
        self._lock = threading.Lock()

    def start(self, kind: str, source: str, model: str = "", total: int = 0) -> Job:
        job = Job(kind=kind, source=source, model=model, bytes_total=total)
        with self._lock:
            self._running[job.id] = job
        self.bus.publish_threadsafe("job", job.to_dict())
        return job

    def progress(self, job: Job, done: int) -> None:
        job.bytes_done = done
        now = time.monotonic()
        if now - self._published.get(job.id, 0.0) >= PUBLISH_EVERY_S:
            self._published[job.id] = now
            self.bus.publish_threadsafe("job", job.to_dict())

    def finish(self, job: Job, state: str, reason: str = "") -> None:
        job.state, job.reason, job.finished = state, reason, time.time()
        with self._lock:
            self._running.pop(job.id, None)
            self._published.pop(job.id, None)
        record = {k: v for k, v in asdict(job).items()}
        written = self.db.submit(lambda db: db["jobs"].upsert(record, pk="id"), f"recording job {job.id} ({job.model})")
        written.add_done_callback(lambda f: self._keep_unrecorded(f, job))
        self.bus.publish_threadsafe("job", job.to_dict())

    def _keep_unrecorded(self, written, job: Job) -> None:
        if written.cancelled() or written.exception() is not None:
            with self._lock:
                self._unrecorded[job.id] = job
                while len(self._unrecorded) > KEEP_UNRECORDED:
                    self._unrecorded.pop(next(iter(self._unrecorded)))

    def running(self) -> list[dict]:
        with self._lock:
            return [j.to_dict() for j in self._running.values()]

    async def recent(self, limit: int = 50) -> list[dict]:
        """Running jobs first, then the latest finished ones.

        The running ones are taken before the database is read: a job finished in between is then found in one or
        the other (its row is queued to the same database thread ahead of this read), and its row wins if in both.
        """
        running = self.running()
        with self._lock:
            running += [j.to_dict() for j in self._unrecorded.values()]
        rows = await self.db.run(lambda db: list(db["jobs"].rows_where(order_by="started desc", limit=limit)))
        ended = [Job(**row).to_dict() for row in rows]
        done = {j["id"] for j in ended}
        return [j for j in running if j["id"] not in done] + ended
