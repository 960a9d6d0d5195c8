"""Admission control and the degradation ladder on their own: bounded queues, order, hysteresis."""

from __future__ import annotations

import asyncio

import pytest

from offgridd.hardware.ladder import DegradationLadder
from offgridd.hardware.probe import ResourceSample
from offgridd.inference import Overloaded
from offgridd.inference.admission import Admission
from offgridd.settings import HardwareSettings


async def test_requests_past_the_slots_wait_in_order_and_past_the_queue_are_refused():
    rejected = []
    admission = Admission(slots=1, depth=2, timeout=10, on_reject=rejected.append)
    order, release = [], asyncio.Event()

    async def request(i):
        async with admission.ticket():
            order.append(i)
            await release.wait()

    first = asyncio.create_task(request(0))
    await asyncio.sleep(0)
    queued = [asyncio.create_task(request(i)) for i in (1, 2)]
    await asyncio.sleep(0)
    assert admission.waiting == 2
    with pytest.raises(Overloaded) as e:
        async with admission.ticket():
            pass
    assert e.value.status == 503 and e.value.retry_after >= 5
    assert rejected == ["queue_full"]
    release.set()
    await asyncio.gather(first, *queued)
    assert order == [0, 1, 2] and admission.active == 0


async def test_a_request_that_waits_too_long_gets_503_and_a_client_that_leaves_frees_its_place():
    admission = Admission(slots=1, depth=4, timeout=0.2)
    hold = asyncio.Event()

    async def holder():
        async with admission.ticket():
            await hold.wait()

    h = asyncio.create_task(holder())
    await asyncio.sleep(0)
    with pytest.raises(Overloaded, match="waited"):
        async with admission.ticket():
            pass
    leaver = asyncio.create_task(admission.ticket().__aenter__())
    await asyncio.sleep(0)
    assert admission.waiting == 1
    leaver.cancel()
    await asyncio.gather(leaver, return_exceptions=True)
    assert admission.waiting == 0
    hold.set()
    await h
    assert admission.active == 0
    async with admission.ticket():
        assert admission.active == 1


async def test_pausing_refuses_new_work_with_the_reason():
    admission = Admission(slots=2, depth=2, timeout=1)
    admission.paused = "SoC at 91°C"
    with pytest.raises(Overloaded, match="91°C") as e:
        async with admission.ticket():
            pass
    assert e.value.retry_after == 30


def _sample(available: float, temp: float | None = 50.0, throttled=()) -> ResourceSample:
    total = 2 << 30
    return ResourceSample(mem_total=total, mem_available=int(total * available), swap_total=0, swap_free=0,
                          load1=0.5, cpus=4, temperature_c=temp, throttled=throttled, disk_free=1 << 30)


def test_memory_pressure_steps_down_and_only_recovers_past_the_margin():
    ladder = DegradationLadder(HardwareSettings(low_memory=0.1, memory_ok=0.2), slots=2, queue_depth=8, threads=4)
    assert ladder.update(_sample(0.5)).slots == 2
    limits = ladder.update(_sample(0.05))
    assert "memory-pressure" in ladder.active and (limits.slots, limits.queue_depth) == (1, 4)
    assert ladder.update(_sample(0.15)).slots == 1  # above the trigger, below recovery: still down
    assert ladder.update(_sample(0.25)).slots == 2 and not ladder.active


def test_heat_lowers_threads_then_critical_heat_pauses_and_cooling_undoes_both():
    ladder = DegradationLadder(HardwareSettings(throttle_c=75, critical_c=85, cool_margin_c=5), slots=2,
                               queue_depth=8, threads=4)
    limits = ladder.update(_sample(0.5, temp=77))
    assert (limits.threads, limits.slots, limits.paused) == (2, 1, None)
    limits = ladder.update(_sample(0.5, temp=86))
    assert limits.paused and "86°C" in limits.paused
    assert ladder.update(_sample(0.5, temp=82)).paused  # hysteresis: 82 > 85 - 5
    limits = ladder.update(_sample(0.5, temp=79))
    assert limits.paused is None and limits.threads == 2
    limits = ladder.update(_sample(0.5, temp=69))
    assert (limits.threads, limits.slots) == (4, 2) and not ladder.active


def test_firmware_power_flags_are_listed_as_degraded():
    ladder = DegradationLadder(HardwareSettings(), slots=1, queue_depth=4, threads=4)
    ladder.update(_sample(0.5, throttled=("under-voltage",)))
    assert ladder.describe() == [{"step": "power", "reason": "firmware reports under-voltage"}]
