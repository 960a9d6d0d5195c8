"""The hardware service: samples resources off the loop, turns the degradation ladder, drives the LED."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import warnings
from collections.abc import Callable

from ..events import EventBus
from ..inference import Inference
from ..metrics import Metrics
from ..settings import Settings
from .ladder import DegradationLadder, Limits
from .led import open_gpio
from .probe import ResourceSample, sample
from .profiles import Detection

log = logging.getLogger(__name__)

LED_EVERY_S = 0.2


class HardwareService:
    name = "hardware"

    def __init__(self, settings: Settings, detection: Detection, inference: Inference, metrics: Metrics,
                 bus: EventBus, on_long_press: Callable[[], None], led_pattern: Callable[[], str]):
        self.settings = settings
        self.detection = detection
        self.pool, self.admission = inference.pool, inference.admission
        self.metrics, self.bus = metrics, bus
        self.on_long_press = on_long_press  # the daemon stops
        self.led_pattern = led_pattern  # what the LED shows: the status model decides
        self.ladder = DegradationLadder(settings.hardware, self.admission.slots, self.admission.depth,
                                        self.pool.threads)
        self.sample: ResourceSample | None = None
        self.limits: Limits = self.ladder.limits()
        self.led = self.button = None
        self.gpio_note: str | None = None
        self._tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        await self._sample_once()  # before the first model load, so the fit sees this board's memory
        self.pool.set_memory_source(lambda: self.sample.mem_available if self.sample else 0)
        hw = self.settings.hardware
        loop = asyncio.get_running_loop()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # gpiozero warns per fallback factory; we say it once below
            self.led, self.button, self.gpio_note = await loop.run_in_executor(
                None, open_gpio, hw.led_pin, hw.button_pin, hw.button_hold_seconds,
                lambda: loop.call_soon_threadsafe(self._long_press))
        self._tasks = [asyncio.create_task(self._watch(), name="resource-watch")]
        if self.led is not None:  # no wake-ups five times a second on a board without one
            self._tasks.append(asyncio.create_task(self._drive_led(), name="status-led"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for part in (self.led, self.button):
            if part is not None:
                part.close()

    def _long_press(self) -> None:
        action = self.settings.hardware.button_action
        log.warning("button held: %s", action)
        if action == "shutdown":
            self.on_long_press()

    async def _sample_once(self) -> None:
        hw = self.settings.hardware
        self.sample = await asyncio.get_running_loop().run_in_executor(None, sample, hw.root, self.settings.state)
        before = set(self.ladder.active)
        self._apply(self.ladder.update(self.sample))
        self._record()  # in the same loop step as the ladder turned, so /health and /metrics agree
        if "memory-pressure" in set(self.ladder.active) - before and (unloaded := await self.pool.unload_idle()):
            log.warning("memory pressure: unloaded idle models %s", ", ".join(unloaded))

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.settings.hardware.sample_seconds)
            try:
                await self._sample_once()
                if (keep := self.settings.keep_alive) > 0:
                    for name in await self.pool.unload_idle(older_than=keep):
                        log.info("unloaded %s after %.0fs idle (keep_alive)", name, keep)
            except OSError as e:  # a vanished sensor must not stop the watch
                log.warning("resource sample failed: %s", e)

    def _apply(self, limits: Limits) -> None:
        if limits != self.limits:
            self.admission.apply(limits.slots, limits.queue_depth, limits.paused)
            if limits.threads != self.pool.threads:
                self.pool.set_threads(limits.threads)
            log.info("running with %d slots, queue %d, %d threads%s", limits.slots, limits.queue_depth,
                     limits.threads, f", paused: {limits.paused}" if limits.paused else "")
            self.limits = limits
            self.bus.publish("degraded", {"degraded": self.ladder.describe()})

    def _record(self) -> None:
        m, s = self.metrics, self.sample
        m.memory_available.set(s.mem_available)
        if s.temperature_c is not None:
            m.temperature.set(s.temperature_c)
        for step in self.ladder.STEPS:
            m.degraded.labels(step).set(1 if step in self.ladder.active else 0)
        m.admission_slots.set(self.limits.slots)
        m.threads.set(self.limits.threads)

    async def _drive_led(self) -> None:
        while True:
            self.led.set(self.led_pattern())
            await asyncio.sleep(LED_EVERY_S)

    def describe(self) -> dict:
        return {
            "profile": self.detection.to_dict(),
            "resources": self.sample.to_dict() if self.sample else None,
            "limits": {"slots": self.limits.slots, "queue_depth": self.limits.queue_depth,
                       "threads": self.limits.threads, "paused": self.limits.paused},
            "degraded": self.ladder.describe(),
            "led": self.led.pattern if self.led else None,
            "gpio": self.gpio_note or "ok",
        }
