"""The `offgridd` command: one module per command family, on the helpers of `common`."""

from __future__ import annotations

import argparse
import sys

from ..settings import SettingsError
from . import chat, doctor, fleet, history, keys, models, peers, profile, serve, usb
from .common import common_parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="offgridd", description="Offline LLM appliance daemon")
    common = common_parser()
    sub = parser.add_subparsers(dest="command", required=True)
    serve.add_commands(sub, common)
    usb.add_commands(sub, common, models.add_commands(sub, common))
    peers.add_commands(sub, common)
    fleet.add_commands(sub, common)
    keys.add_commands(sub, common)
    history.add_commands(sub, common)
    profile.add_commands(sub, common)
    doctor.add_commands(sub, common)
    chat.add_commands(sub, common)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except SettingsError as e:
        print(f"offgridd: bad configuration: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
