"""What is mounted under the stick roots, read from /proc/self/mountinfo: the truth that udev events point at."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

MOUNTINFO = Path("/proc/self/mountinfo")
_ESCAPE = re.compile(r"\\([0-7]{3})")


@dataclass(frozen=True, slots=True, kw_only=True)
class Mount:
    mount_id: int  # new for every mount: a stick pulled and plugged again is a new mount
    path: Path
    fstype: str
    source: str
    options: str

    def to_dict(self) -> dict:
        return {"path": str(self.path), "fstype": self.fstype, "source": self.source, "options": self.options}


def _unescape(field: str) -> str:
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str) -> list[Mount]:
    mounts = []
    for line in text.splitlines():
        fields = line.split(" ")
        try:
            sep = fields.index("-")
            mounts.append(Mount(mount_id=int(fields[0]), path=Path(_unescape(fields[4])), options=fields[5],
                                fstype=fields[sep + 1], source=_unescape(fields[sep + 2])))
        except (ValueError, IndexError):
            continue
    return mounts


def mounted_sticks(roots: list[str], mountinfo: Path = MOUNTINFO) -> list[Mount]:
    """Filesystems mounted below one of the roots (not on a root itself). Blocks (reads /proc)."""
    bases = [Path(r) for r in roots]
    found = {}
    for m in parse_mountinfo(mountinfo.read_text()):
        if any(m.path != b and m.path.is_relative_to(b) for b in bases):
            found[m.path] = m  # a later mount on the same point hides the earlier one
    return sorted(found.values(), key=lambda m: str(m.path))
