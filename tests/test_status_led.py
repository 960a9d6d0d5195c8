"""The status LED and the button through gpiozero's MockFactory, on the same code path as on a Pi."""

from __future__ import annotations

import threading
import time

import pytest
from conftest import running_daemon
from gpiozero.pins.mock import MockFactory

from offgridd.hardware.led import PATTERNS, open_gpio


@pytest.fixture
def factory():
    f = MockFactory()
    yield f
    f.close()


def half_periods(pin, pattern_led, pattern: str, seconds: float) -> list[float]:
    """Show `pattern` for a while; MockPin records each change with the time since the previous one."""
    pin.clear_states()
    pattern_led.set(pattern)
    time.sleep(seconds)
    return [s.timestamp for s in pin.states[2:]]  # skip the reset entry and the first, partial period


def test_each_state_has_its_own_pattern_on_the_pin(factory):
    assert len(set(PATTERNS.values())) == len(PATTERNS)
    led, _, note = open_gpio(17, None, 3.0, lambda: None, pin_factory=factory)
    assert note is None
    pin = factory.pin(17)
    try:
        led.set("ready")
        time.sleep(0.3)
        assert pin.state is True  # steady on
        fast = half_periods(pin, led, "generating", 1.0)
        slow = half_periods(pin, led, "starting", 2.2)
        # gpiozero's blink thread may run late on a busy machine: bounds wide enough for that, still far apart
        assert len(fast) >= 4 and all(0.05 < t < 0.3 for t in fast)  # 0.1 s on, 0.1 s off
        assert len(slow) >= 2 and all(0.4 < t < 0.8 for t in slow)  # 0.5 s on, 0.5 s off
        importing = half_periods(pin, led, "importing", 2.2)
        on, off = sorted(importing[:2])
        assert 0.15 < on < 0.5 and 0.6 < off < 1.0  # 0.25 s on, 0.75 s off
        led.set("starting")  # the same pattern again must not restart the blink
        assert led.pattern == "starting"
    finally:
        led.close()


def test_a_long_press_runs_the_action_and_a_short_one_does_not(factory):
    pressed = threading.Event()
    _, button, _ = open_gpio(None, 27, 0.3, pressed.set, pin_factory=factory)
    pin = factory.pin(27)
    try:
        pin.drive_low()  # pressed (the button pulls the pin down)
        time.sleep(0.1)
        pin.drive_high()
        time.sleep(0.2)
        assert not pressed.is_set()
        pin.drive_low()
        assert pressed.wait(2)
        pin.drive_high()
    finally:
        button.close()


def test_without_gpio_the_daemon_runs_and_says_so(model_state, tmp_path):
    with running_daemon(model_state, tmp_path / "daemon.log",
                        env={"OFFGRID_HARDWARE_LED_PIN": "17", "GPIOZERO_PIN_FACTORY": "nosuchfactory"}) as daemon:
        hardware = daemon.health()[1]["services"]["hardware"]
        assert hardware["led"] is None and "no usable GPIO" in hardware["gpio"]
    assert daemon.log.read_text().count("no usable GPIO") == 1


def test_the_daemon_drives_the_led_through_the_mock_pin_factory(model_state, tmp_path):
    with running_daemon(model_state, tmp_path / "daemon.log",
                        env={"OFFGRID_HARDWARE_LED_PIN": "17", "OFFGRID_HARDWARE_BUTTON_PIN": "27",
                             "GPIOZERO_PIN_FACTORY": "mock"}) as daemon:
        time.sleep(0.5)
        hardware = daemon.health()[1]["services"]["hardware"]
        assert hardware["gpio"] == "ok" and hardware["led"] == "ready"
