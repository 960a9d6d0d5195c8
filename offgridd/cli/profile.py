"""`offgridd profile`: which board profile applies here, and why."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .common import board_settings


def cmd_profile(args: argparse.Namespace) -> int:
    from ..hardware import ProfileError

    try:
        settings, detection = board_settings(args, root=Path(args.root) if args.root else None)
    except ProfileError as e:
        print(f"offgridd: {e}", file=sys.stderr)
        return 2
    effective = settings.public()
    if args.json:
        print(json.dumps({**detection.to_dict(), "settings": effective}, indent=2))
        return 0
    print(f"profile: {detection.profile.id} ({detection.profile.name})")
    print(f"why:     {detection.reason}")
    for line in detection.evidence:
        print(f"  - {line}")
    print("effective settings:")
    for key in ("threads", "ctx", "batch", "gpu_layers", "max_model_bytes", "quantizations", "parallel",
                "queue_depth", "keep_alive"):
        print(f"  {key:16} {effective[key]}")
    for key in ("throttle_c", "critical_c", "led_pin", "button_pin"):
        print(f"  {key:16} {effective['hardware'][key]}")
    return 0


def add_commands(sub, common: argparse.ArgumentParser) -> None:
    profile = sub.add_parser("profile", parents=[common], help="which board profile applies here, and why")
    profile.add_argument("--root", help="read /proc, /sys and /etc under this directory (default /)")
    profile.add_argument("--json", action="store_true")
    profile.set_defaults(func=cmd_profile)
