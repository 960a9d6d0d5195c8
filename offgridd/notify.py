"""The sd_notify protocol: READY, STATUS, WATCHDOG and STOPPING, through systemd-python."""

from __future__ import annotations

import asyncio
import logging
import os

log = logging.getLogger(__name__)


class SystemdNotifier:
    """Talks to systemd when NOTIFY_SOCKET says it is listening; does nothing otherwise."""

    def __init__(self) -> None:
        self.enabled = bool(os.environ.get("NOTIFY_SOCKET"))
        self._status = ""
        self._notify = None
        if self.enabled:
            from systemd import daemon

            self._notify = daemon.notify

    def send(self, *fields: str) -> None:
        if self._notify is not None and not self._notify("\n".join(fields)):
            log.debug("sd_notify failed: %s", fields)

    def ready(self, status: str) -> None:
        self._status = status
        self.send("READY=1", f"STATUS={status}")

    def status(self, line: str) -> None:
        if line != self._status:
            self._status = line
            self.send(f"STATUS={line}")

    def stopping(self, status: str) -> None:
        self.send("STOPPING=1", f"STATUS={status}")

    def watchdog_interval(self) -> float | None:
        """Half of WATCHDOG_USEC, when systemd asked this process for watchdog pings."""
        usec, pid = os.environ.get("WATCHDOG_USEC"), os.environ.get("WATCHDOG_PID")
        if not self.enabled or not usec or (pid and pid != str(os.getpid())):
            return None
        try:
            return int(usec) / 2e6
        except ValueError:
            return None

    async def watchdog_loop(self, interval: float) -> None:
        """Ping from the event loop itself, so a blocked loop stops the pings and systemd restarts us."""
        while True:
            self.send("WATCHDOG=1")
            await asyncio.sleep(interval)
