"""The one status model: what /health, /api/v1/status, the systemd STATUS line, the UI and the status LED render.

Memory comes from one place: the hardware watch's latest sample where there is one (the figure load decisions use
too), else psutil.
"""

from __future__ import annotations

import psutil

from . import __version__
from .runtime import Runtime


def memory(rt: Runtime) -> dict:
    """Blocking (reads /proc): call from an executor."""
    sample = rt.hardware.sample if rt.hardware else None
    if sample is not None and sample.mem_total:
        total, available = sample.mem_total, sample.mem_available
    else:
        vm = psutil.virtual_memory()
        total, available = vm.total, vm.available
    rss = 0
    for pid in [None] + [w.pid for w in rt.inference.pool.workers.values() if w.pid]:
        try:
            rss += psutil.Process(pid).memory_info().rss
        except psutil.Error:
            pass
    return {"total_bytes": total, "available_bytes": available,
            "used_percent": round(100 * (total - available) / total, 1) if total else 0.0, "daemon_rss_bytes": rss}


async def database(rt: Runtime) -> dict | None:
    """offgridd.db's size on the card and its bound (the conversation store measures it)."""
    if rt.history is None:
        return None
    try:
        size = await rt.history.size()
    except Exception as e:  # a report must not fail on it
        return {"error": str(e)}
    return {**size.to_dict(), "max_bytes": rt.settings.history.max_db_bytes}


def report(rt: Runtime, memory: dict, database: dict | None = None) -> dict:
    """/health's body, and the heart of /api/v1/status and the UI's status events."""
    name = rt.settings.model
    inference, pool, admission = rt.inference, rt.inference.pool, rt.inference.admission
    worker = pool.workers.get(name)
    model = {"name": name, "state": worker.state if worker else "not loaded"}
    if worker:
        model.update(n_ctx=worker.n_ctx, sequences=worker.sequences, restarts=worker.restarts, pid=worker.pid,
                     self_test=worker.self_test, engine_path="safe" if worker.safe else "normal")
    return {
        "status": rt.phase, "reason": rt.reason or None, "version": __version__, "uptime_s": round(rt.uptime(), 1),
        "model": model, "memory": memory, "database": database,
        "requests": {"served": inference.served, "active": inference.active, "waiting": inference.waiting},
        "tokens_per_second": round(inference.last_tokens_per_second, 1),
        "loaded": {n: w.state for n, w in pool.workers.items()},
        "services": {s.name: s.describe() for s in rt.running},
        "degraded": rt.degraded(),
        "queue": {"running": admission.active, "waiting": admission.waiting, "slots": admission.slots,
                  "depth": admission.depth, "paused": admission.paused},
        "profile": rt.detection.to_dict() if rt.detection else None,
        "upstreams": [{"url": u.url, "models": list(u.models)} for u in rt.settings.upstreams],
    }


def line(rt: Runtime, memory: dict) -> str:
    """One human line for `systemctl status`: what is served, how much, how fast, how full."""
    if rt.phase != "ready":
        return f"{rt.phase}: {rt.reason}" if rt.reason else rt.phase
    inference = rt.inference
    parts = [f"serving {rt.settings.model}", f"{inference.served} requests"]
    if rt.peers is not None and (peers := rt.peers.peer_count):
        parts.append(f"{peers} peer{'s' if peers != 1 else ''}")
    if upstreams := len(rt.settings.upstreams):
        parts.append(f"{upstreams} fallback upstream{'s' if upstreams != 1 else ''}")
    if inference.last_tokens_per_second:
        parts.append(f"{inference.last_tokens_per_second:.0f} tok/s")
    parts.append(f"{memory['used_percent']:.0f}% RAM")
    if rt.hardware and rt.hardware.sample and rt.hardware.sample.temperature_c is not None:
        parts.append(f"{rt.hardware.sample.temperature_c:.0f}°C")
    if degraded := rt.degraded():
        parts.append("degraded: " + ", ".join(sorted({d["step"] for d in degraded})))
    return " · ".join(parts)


def led_pattern(rt: Runtime) -> str:
    """What the status LED shows, most urgent first."""
    if rt.phase == "unavailable":
        return "error"
    if rt.phase in ("starting", "loading", "stopping"):
        return "starting"
    if rt.jobs.running():
        return "importing"
    if rt.inference.active:
        return "generating"
    if (rt.hardware and rt.hardware.ladder.active) or rt.inference.pool.bad or rt.inference.pool.notes:
        return "degraded"
    return "ready"
