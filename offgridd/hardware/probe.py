"""Reading the machine: board identity and resource figures from /proc, /sys and /etc under a root directory.

Everything reads below `root` so tests pass fixture trees holding the strings real boards report.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path

THROTTLE_FILE = "sys/devices/platform/soc/soc:firmware/get_throttled"
# Raspberry Pi firmware throttle bits (vcgencmd get_throttled), the ones happening now
THROTTLE_BITS = {0: "under-voltage", 1: "arm frequency capped", 2: "throttled", 3: "soft temperature limit"}


def read_text(root: Path, rel: str) -> str | None:
    try:
        return (root / rel).read_bytes().decode("utf-8", errors="replace")
    except OSError:
        return None


def meminfo(root: Path) -> dict[str, int]:
    """/proc/meminfo in bytes."""
    out = {}
    for line in (read_text(root, "proc/meminfo") or "").splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            out[key.strip()] = int(parts[0]) * (1024 if parts[1:2] == ["kB"] else 1)
    return out


@dataclass(frozen=True, slots=True, kw_only=True)
class BoardFacts:
    device_tree_model: str | None
    nv_tegra_release: str | None
    mem_total_mb: int
    arch: str
    cpu_flags: frozenset[str]


def _arch(cpuinfo: str, root: Path) -> str:
    """The CPU architecture as cpuinfo shows it (so fixture trees decide it), else this machine's."""
    if "vendor_id" in cpuinfo and "flags" in cpuinfo:
        return "x86_64"
    if "CPU implementer" in cpuinfo or "Features" in cpuinfo:
        return "aarch64"
    return platform.machine() if root == Path("/") else "unknown"


def board_facts(root: Path) -> BoardFacts:
    cpuinfo = read_text(root, "proc/cpuinfo") or ""
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    model = read_text(root, "proc/device-tree/model")
    tegra = read_text(root, "etc/nv_tegra_release")
    return BoardFacts(
        device_tree_model=model.rstrip("\0\n ") if model else None,
        nv_tegra_release=tegra.strip() if tegra else None,
        mem_total_mb=meminfo(root).get("MemTotal", 0) // (1 << 20),
        arch=_arch(cpuinfo, root),
        cpu_flags=frozenset(flags),
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class ResourceSample:
    mem_total: int
    mem_available: int
    swap_total: int
    swap_free: int
    load1: float
    cpus: int
    temperature_c: float | None  # the hottest thermal zone, None where there is none
    throttled: tuple[str, ...]  # Raspberry Pi firmware flags active now
    disk_free: int  # in the state directory

    @property
    def mem_available_fraction(self) -> float:
        return self.mem_available / self.mem_total if self.mem_total else 1.0

    def to_dict(self) -> dict:
        return {"mem_total_bytes": self.mem_total, "mem_available_bytes": self.mem_available,
                "swap_total_bytes": self.swap_total, "swap_free_bytes": self.swap_free, "load1": self.load1,
                "cpus": self.cpus, "temperature_c": self.temperature_c, "throttled": list(self.throttled),
                "disk_free_bytes": self.disk_free}


def temperatures(root: Path) -> list[float]:
    temps = []
    for zone in sorted((root / "sys/class/thermal").glob("thermal_zone*/temp")):
        try:
            temps.append(int(zone.read_text().strip()) / 1000)
        except (OSError, ValueError):
            continue
    return temps


def throttled(root: Path) -> tuple[str, ...]:
    raw = read_text(root, THROTTLE_FILE)
    try:
        value = int(raw.strip(), 16) if raw else 0
    except ValueError:
        return ()
    return tuple(name for bit, name in THROTTLE_BITS.items() if value & (1 << bit))


def sample(root: Path, state_dir: Path) -> ResourceSample:
    """Blocking: reads several files. Call from an executor."""
    mem = meminfo(root)
    load = (read_text(root, "proc/loadavg") or "0").split()
    temps = temperatures(root)
    try:
        st = os.statvfs(state_dir)
        disk_free = st.f_bavail * st.f_frsize
    except OSError:
        disk_free = 0
    return ResourceSample(
        mem_total=mem.get("MemTotal", 0), mem_available=mem.get("MemAvailable", mem.get("MemFree", 0)),
        swap_total=mem.get("SwapTotal", 0), swap_free=mem.get("SwapFree", 0),
        load1=float(load[0]) if load and load[0].replace(".", "", 1).isdigit() else 0.0,
        cpus=os.cpu_count() or 1, temperature_c=max(temps) if temps else None, throttled=throttled(root),
        disk_free=disk_free,
    )
