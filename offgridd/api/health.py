"""/health, /metrics and the native status endpoint, plus the one-line STATUS that systemd shows."""

from __future__ import annotations

import psutil
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from .. import __version__
from ..runtime import Runtime
from .keys import RUNTIME


def memory_snapshot(rt: Runtime) -> dict:
    """Blocking (reads /proc): call from an executor."""
    vm = psutil.virtual_memory()
    rss = 0
    for pid in [None] + [w.pid for w in rt.pool.workers.values() if w.pid]:
        try:
            rss += psutil.Process(pid).memory_info().rss
        except psutil.Error:
            pass
    return {"total_bytes": vm.total, "available_bytes": vm.available, "used_percent": vm.percent,
            "daemon_rss_bytes": rss}


def health_report(rt: Runtime, memory: dict) -> dict:
    name = rt.settings.model
    worker = rt.pool.workers.get(name)
    model = {"name": name, "state": worker.state if worker else "not loaded"}
    if worker:
        model.update(n_ctx=worker.n_ctx, sequences=worker.sequences, restarts=worker.restarts, pid=worker.pid,
                     self_test=worker.self_test, engine_path="safe" if worker.safe else "normal")
    return {
        "status": rt.phase, "reason": rt.reason or None, "version": __version__, "uptime_s": round(rt.uptime(), 1),
        "model": model, "memory": memory,
        "requests": {"served": rt.served, "active": rt.active, "waiting": rt.waiting},
        "tokens_per_second": round(rt.last_tokens_per_second, 1),
        "loaded": {n: w.state for n, w in rt.pool.workers.items()},
        "services": {s.name: s.describe() for s in rt.services},
        "degraded": rt.degraded(),
        "queue": {"running": rt.admission.active, "waiting": rt.admission.waiting, "slots": rt.admission.slots,
                  "depth": rt.admission.depth, "paused": rt.admission.paused},
        "profile": rt.detection.to_dict() if rt.detection else None,
    }


def status_line(rt: Runtime, memory: dict) -> str:
    """One human line for `systemctl status`: what is served, how much, how fast, how full."""
    if rt.phase != "ready":
        return f"{rt.phase}: {rt.reason}" if rt.reason else rt.phase
    parts = [f"serving {rt.settings.model}", f"{rt.served} requests"]
    if peers := sum(getattr(s, "peer_count", 0) for s in rt.services):
        parts.append(f"{peers} peer{'s' if peers != 1 else ''}")
    if rt.last_tokens_per_second:
        parts.append(f"{rt.last_tokens_per_second:.0f} tok/s")
    parts.append(f"{memory['used_percent']:.0f}% RAM")
    hardware = next((s for s in rt.services if s.name == "hardware"), None)
    if hardware and hardware.sample and hardware.sample.temperature_c is not None:
        parts.append(f"{hardware.sample.temperature_c:.0f}°C")
    if degraded := rt.degraded():
        parts.append("degraded: " + ", ".join(sorted({d["step"] for d in degraded})))
    return " · ".join(parts)


async def health(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    memory = await request.app.loop.run_in_executor(None, memory_snapshot, rt)
    return web.json_response(health_report(rt, memory), status=200 if rt.ready else 503)


async def metrics(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    rt.metrics.queue_depth.set(rt.waiting)
    return web.Response(body=rt.metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})
