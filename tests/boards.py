"""Fixture trees of /proc, /sys and /etc holding the strings real boards report, for board detection."""

from __future__ import annotations

from pathlib import Path

PI_CPUINFO = """processor\t: 0
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x4
CPU part\t: 0xd0b
CPU revision\t: 1

Revision\t: d04170
Serial\t\t: 2c1ef4a3d5e71b8f
Model\t\t: Raspberry Pi 5 Model B Rev 1.0
"""
PI4_CPUINFO = """processor\t: 0
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm crc32 cpuid
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x0
CPU part\t: 0xd08
CPU revision\t: 3

Revision\t: b03114
Model\t\t: Raspberry Pi 4 Model B Rev 1.4
"""
X86_CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model name\t: Intel(R) Core(TM) i5-8250U CPU @ 1.60GHz
flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr sse sse2 ssse3 sse4_1 sse4_2 avx avx2 fma
"""

BOARDS = {
    "pi5-8gb": {"model": "Raspberry Pi 5 Model B Rev 1.0", "mem_kb": 8245408, "cpuinfo": PI_CPUINFO},
    "pi5-4gb": {"model": "Raspberry Pi 5 Model B Rev 1.0", "mem_kb": 4139296, "cpuinfo": PI_CPUINFO},
    "pi5-16gb": {"model": "Raspberry Pi 5 Model B Rev 1.1", "mem_kb": 16608880, "cpuinfo": PI_CPUINFO},
    "pi4-2gb": {"model": "Raspberry Pi 4 Model B Rev 1.4", "mem_kb": 1891692, "cpuinfo": PI4_CPUINFO},
    "pi4-4gb": {"model": "Raspberry Pi 4 Model B Rev 1.5", "mem_kb": 3885396, "cpuinfo": PI4_CPUINFO},
    "pi4-8gb": {"model": "Raspberry Pi 4 Model B Rev 1.4", "mem_kb": 7998116, "cpuinfo": PI4_CPUINFO},
    "pi-zero-2w": {"model": "Raspberry Pi Zero 2 W Rev 1.0", "mem_kb": 439592,
                   "cpuinfo": PI4_CPUINFO.replace("0xd08", "0xd03")},
    "jetson-orin-nano-8gb": {
        "model": "NVIDIA Jetson Orin Nano Developer Kit", "mem_kb": 7799288, "cpuinfo": PI_CPUINFO,
        "tegra": "# R36 (release), REVISION: 4.0, GCID: 37537400, BOARD: generic, EABI: aarch64, "
                 "DATE: Fri Sep 13 04:36:44 UTC 2024\n# KERNEL_VARIANT: oot\nTARGET_USERSPACE_LIB_DIR=nvidia\n"},
    "jetson-nano-4gb": {
        "model": "NVIDIA Jetson Nano Developer Kit", "mem_kb": 4051520, "cpuinfo": PI4_CPUINFO,
        "tegra": "# R32 (release), REVISION: 7.1, GCID: 29818004, BOARD: t210ref, EABI: aarch64, "
                 "DATE: Sat Feb 19 17:05:08 UTC 2022\n"},
    "rock-5b": {"model": "Radxa ROCK 5B", "mem_kb": 16146300, "cpuinfo": PI_CPUINFO},
    "pc": {"model": None, "mem_kb": 16318480, "cpuinfo": X86_CPUINFO},
}


def _replace(path: Path, text: str) -> None:
    """Write whole or not at all: the daemon samples these files while tests change them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.rename(path)


def write_meminfo(root: Path, total_kb: int, available_kb: int) -> None:
    _replace(root / "proc/meminfo",
             f"MemTotal:       {total_kb} kB\nMemFree:        {available_kb // 2} kB\n"
             f"MemAvailable:   {available_kb} kB\nBuffers:           41232 kB\n"
             f"Cached:          {available_kb // 3} kB\n"
             "SwapTotal:        204796 kB\nSwapFree:         204796 kB\n")


def set_temperature(root: Path, celsius: float, zone: int = 0) -> None:
    _replace(root / f"sys/class/thermal/thermal_zone{zone}/temp", f"{int(celsius * 1000)}\n")


def board_tree(root: Path, board: str, available_fraction: float = 0.8, temperature: float | None = 48.3) -> Path:
    spec = BOARDS[board]
    (root / "proc/device-tree").mkdir(parents=True, exist_ok=True)
    (root / "etc").mkdir(parents=True, exist_ok=True)
    if spec["model"]:
        (root / "proc/device-tree/model").write_bytes(spec["model"].encode() + b"\0")
    if "tegra" in spec:
        (root / "etc/nv_tegra_release").write_text(spec["tegra"])
    (root / "proc/cpuinfo").write_text(spec["cpuinfo"])
    (root / "proc/loadavg").write_text("0.52 0.58 0.59 1/389 12345\n")
    write_meminfo(root, spec["mem_kb"], int(spec["mem_kb"] * available_fraction))
    if temperature is not None:
        set_temperature(root, temperature)
    return root
