"""`offgridd serve` runs the daemon; `offgridd status` asks the running one how it is."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from .common import add_setting_flags, ask_daemon, board_settings


def cmd_serve(args: argparse.Namespace) -> int:
    from ..daemon import serve
    from ..logs import setup_logging

    settings, detection = board_settings(args)
    setup_logging(settings.log_level)
    asyncio.run(serve(settings, detection))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    if (answer := ask_daemon(args, "/api/v1/status")) is None:
        return 3
    code, body = answer
    if args.json or args.settings:
        print(json.dumps(body.get("settings") if args.settings else body, indent=2))
        return 0
    if "error" in body:
        print(f"error {code}: {body['error']['message']}", file=sys.stderr)
        return 1
    print(body["line"])
    print(f"  version {body['version']}, up {body['uptime_s']:.0f}s, model {body['model']['name']} "
          f"({body['model']['state']})")
    return 0 if body["status"] == "ready" else 1


def add_commands(sub, common: argparse.ArgumentParser) -> None:
    serve = sub.add_parser("serve", parents=[common], help="run the daemon")
    add_setting_flags(serve)
    serve.set_defaults(func=cmd_serve)

    status = sub.add_parser("status", parents=[common], help="ask the running daemon how it is")
    status.add_argument("--url", help="daemon URL (default from settings)")
    status.add_argument("--json", action="store_true")
    status.add_argument("--settings", action="store_true", help="print the daemon's effective settings")
    status.set_defaults(func=cmd_status)
