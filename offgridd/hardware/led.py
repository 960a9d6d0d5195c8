"""The status LED and the button, through gpiozero; the daemon runs without them where there is no GPIO."""

from __future__ import annotations

import logging
from collections.abc import Callable

log = logging.getLogger(__name__)

# pattern -> (seconds on, seconds off); (1, 0) is steady on. Each state looks different from across a room.
PATTERNS = {
    "starting": (0.5, 0.5),
    "ready": (1.0, 0.0),
    "generating": (0.1, 0.1),
    "importing": (0.25, 0.75),
    "degraded": (1.5, 0.5),
    "error": (0.05, 0.45),
}


def _gpio_error_types() -> tuple[type[BaseException], ...]:
    from gpiozero.exc import BadPinFactory, GPIOZeroError, PinFactoryFallback

    return (BadPinFactory, GPIOZeroError, PinFactoryFallback, OSError, RuntimeError, ImportError)


class StatusLed:
    """Shows one pattern at a time; set() is cheap when the pattern does not change."""

    def __init__(self, pin: int, pin_factory=None):
        from gpiozero import LED

        self.led = LED(pin, pin_factory=pin_factory)
        self.pattern: str | None = None

    def set(self, pattern: str) -> None:
        if pattern == self.pattern:
            return
        self.pattern = pattern
        on, off = PATTERNS[pattern]
        if off == 0:
            self.led.on()
        else:
            self.led.blink(on_time=on, off_time=off, background=True)

    def close(self) -> None:
        self.led.close()


class PowerButton:
    """A long press runs `on_long_press` (from gpiozero's thread: the callback must hand over to the loop)."""

    def __init__(self, pin: int, hold_seconds: float, on_long_press: Callable[[], None], pin_factory=None):
        from gpiozero import Button

        self.button = Button(pin, hold_time=hold_seconds, pin_factory=pin_factory)
        self.button.when_held = lambda: on_long_press()

    def close(self) -> None:
        self.button.close()


def open_gpio(led_pin: int | None, button_pin: int | None, hold_seconds: float, on_long_press: Callable[[], None],
              pin_factory=None) -> tuple[StatusLed | None, PowerButton | None, str | None]:
    """The LED and button where the pins exist; otherwise None and the reason, said once."""
    if led_pin is None and button_pin is None:
        return None, None, "no GPIO pins configured for this board"
    try:
        led = StatusLed(led_pin, pin_factory) if led_pin is not None else None
        button = PowerButton(button_pin, hold_seconds, on_long_press, pin_factory) if button_pin is not None else None
    except _gpio_error_types() as e:
        reason = f"no usable GPIO here ({type(e).__name__}: {e}); running without the status LED and button"
        log.info(reason)
        return None, None, reason
    return led, button, None
