"""The degradation ladder: which load-shedding steps are on, decided from resource samples with hysteresis."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ..settings import HardwareSettings
from .probe import ResourceSample

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Limits:
    """What the daemon runs with while the active steps hold."""

    slots: int
    queue_depth: int
    threads: int
    paused: str | None  # reason no new work is admitted


class DegradationLadder:
    """Steps turn on past a threshold and off only once clear of it by a margin, so a reading that hovers at the
    threshold does not flap."""

    STEPS = ("memory-pressure", "hot", "critical-temperature", "power")

    def __init__(self, hw: HardwareSettings, slots: int, queue_depth: int, threads: int):
        self.hw = hw
        self.normal = Limits(slots, queue_depth, threads, None)
        self.active: dict[str, str] = {}  # step -> reason a person can read

    def _set(self, step: str, on: bool, reason: str) -> None:
        if on and self.active.get(step) != reason:
            if step not in self.active:
                log.warning("degraded: %s (%s)", step, reason)
            self.active[step] = reason
        elif not on and step in self.active:
            log.info("recovered from %s", step)
            del self.active[step]

    def update(self, s: ResourceSample) -> Limits:
        hw = self.hw
        fraction = s.mem_available_fraction
        pressure = fraction < hw.low_memory or ("memory-pressure" in self.active and fraction < hw.memory_ok)
        self._set("memory-pressure", pressure,
                  f"{fraction:.0%} of memory available (below {hw.low_memory:.0%}): idle models unloaded, "
                  "one request at a time")
        t = s.temperature_c
        hot = t is not None and (t >= hw.throttle_c or ("hot" in self.active and t > hw.throttle_c - hw.cool_margin_c))
        self._set("hot", hot, f"SoC at {t:.0f}°C (throttle at {hw.throttle_c:.0f}°C): fewer threads and requests"
                  if t is not None else "")
        critical = t is not None and (t >= hw.critical_c or (
            "critical-temperature" in self.active and t > hw.critical_c - hw.cool_margin_c))
        self._set("critical-temperature", critical,
                  f"SoC at {t:.0f}°C (critical at {hw.critical_c:.0f}°C): no new work until it cools"
                  if t is not None else "")
        self._set("power", bool(s.throttled), f"firmware reports {', '.join(s.throttled)}")
        return self.limits()

    def limits(self) -> Limits:
        n = self.normal
        slots, depth, threads, paused = n.slots, n.queue_depth, n.threads, None
        if "memory-pressure" in self.active:
            slots, depth = 1, max(1, depth // 2)
        if "hot" in self.active:
            slots, threads = 1, max(1, threads // 2)
        if "critical-temperature" in self.active:
            paused = self.active["critical-temperature"]
        return Limits(slots, depth, threads, paused)

    def describe(self) -> list[dict]:
        return [{"step": step, "reason": reason} for step, reason in self.active.items()]
