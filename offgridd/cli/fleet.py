"""`offgridd fleet key|join|rotate`: the key that lets boxes on a LAN work as one."""

from __future__ import annotations

import argparse
import sys

from .common import settings
from .keys import record


def cmd_fleet_key(args: argparse.Namespace) -> int:
    from ..peers.fleet import FleetKeyError, load_identity

    try:
        identity = load_identity(settings(args).state)
    except (FleetKeyError, OSError) as e:
        print(e, file=sys.stderr)
        return 1
    print(identity.fleet_key.hex())
    print(f"fleet {identity.key_fingerprint}; on the other boxes run: offgridd fleet join {identity.fleet_key.hex()}",
          file=sys.stderr)
    return 0


def cmd_fleet_join(args: argparse.Namespace) -> int:
    from ..peers.fleet import FleetKeyError, join_fleet

    try:
        identity = join_fleet(settings(args).state, args.key)
    except (FleetKeyError, OSError) as e:
        record(args, "fleet join", f"refused: {e}")
        print(f"not joined: {e}", file=sys.stderr)
        return 1
    record(args, "fleet join", "done", f"fleet {identity.key_fingerprint}")
    print(f"joined fleet {identity.key_fingerprint}; a running daemon picks the key up within one announcement "
          "interval")
    return 0


def cmd_fleet_rotate(args: argparse.Namespace) -> int:
    from ..peers.fleet import FleetKeyError, rotate_fleet_key

    try:
        identity = rotate_fleet_key(settings(args).state)
    except (FleetKeyError, OSError) as e:
        record(args, "fleet rotate", f"refused: {e}")
        print(f"not rotated: {e}", file=sys.stderr)
        return 1
    record(args, "fleet rotate", "done", f"fleet {identity.key_fingerprint}")
    print(identity.fleet_key.hex())
    print(f"new fleet {identity.key_fingerprint}: this box now accepts only the new key, and the others see it "
          f"again once they run: offgridd fleet join {identity.fleet_key.hex()}", file=sys.stderr)
    return 0


def add_commands(sub, common: argparse.ArgumentParser) -> None:
    fleet = sub.add_parser("fleet", help="the key that lets boxes on a LAN work as one")
    fleet_sub = fleet.add_subparsers(dest="fleet_command", required=True)
    key = fleet_sub.add_parser("key", parents=[common], help="print this box's fleet key")
    key.set_defaults(func=cmd_fleet_key)
    join = fleet_sub.add_parser("join", parents=[common], help="use another box's fleet key")
    join.add_argument("key", help="64 hex digits from 'offgridd fleet key'")
    join.set_defaults(func=cmd_fleet_join)
    rotate = fleet_sub.add_parser("rotate", parents=[common],
                                  help="give this box a new fleet key, which the others then join")
    rotate.set_defaults(func=cmd_fleet_rotate)
