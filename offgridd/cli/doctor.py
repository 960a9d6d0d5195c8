"""`offgridd doctor`: the engine's build target, this CPU's features, a self-test and decode speed."""

from __future__ import annotations

import argparse
import json

from .common import board_settings


def cmd_doctor(args: argparse.Namespace) -> int:
    from ..doctor import print_report, report
    from ..inference import default_threads

    settings, _ = board_settings(args)
    r = report(settings, threads=settings.threads or default_threads(), seconds=args.seconds)
    if args.json:
        print(json.dumps(r, indent=2))
    else:
        print_report(r)
    return {"ok": 0, "safe-path": 1}.get(r["verdict"], 2)


def add_commands(sub, common: argparse.ArgumentParser) -> None:
    doctor = sub.add_parser("doctor", parents=[common],
                            help="the engine's build target, this CPU's features, a self-test and decode speed")
    doctor.add_argument("--json", action="store_true")
    doctor.add_argument("--seconds", type=float, default=3.0, help="how long to measure decode speed")
    doctor.set_defaults(func=cmd_doctor)
