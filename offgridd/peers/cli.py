"""`offgridd peers` and `offgridd fleet key|join`."""

from __future__ import annotations

import argparse
import json
import sys


def cmd_peers(args: argparse.Namespace) -> int:
    from ..cli import ask_daemon

    if (answer := ask_daemon(args, "/api/v1/peers")) is None:
        return 3
    code, body = answer
    if "error" in body:
        print(f"error {code}: {body['error']['message']}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(body, indent=2))
        return 0
    if not body["enabled"]:
        print("peers are disabled on this node ([peers] enabled = false)")
        return 0
    me = body["node"]
    print(f"this node: {me['name']} ({me['node']}), fleet {me['fleet']}, "
          f"multicast {me['multicast'] or 'off'}, sync {me['sync']}")
    if not body["peers"]:
        print("no peers seen; boxes join with the same fleet key ('offgridd fleet key' on one, "
              "'offgridd fleet join KEY' on the others)")
    for p in body["peers"]:
        print(f"{p['name']:20} {p['url']:28} load {p['load']} queue {p['queue']}  clock {clock_offset(p)}  "
              f"{len(p['models'])} models: {', '.join(p['models'])}")
    return 0


def clock_offset(peer: dict) -> str:
    """How far the peer's clock is from this node's, for people: nothing in the fleet depends on it."""
    offset = peer.get("clock_offset_s", 0.0)
    if abs(offset) < 2:
        return "in step"
    seconds = round(abs(offset))
    days, rest = divmod(seconds, 86400)
    text = f"{days}d{rest // 3600:02d}h" if days else f"{rest // 3600}h{rest % 3600 // 60:02d}m" if rest >= 3600 \
        else f"{rest // 60}m{rest % 60:02d}s"
    return f"{'+' if offset > 0 else '-'}{text}"


def cmd_fleet_key(args: argparse.Namespace) -> int:
    from ..cli import _settings
    from .fleet import FleetKeyError, load_identity

    try:
        identity = load_identity(_settings(args).state)
    except (FleetKeyError, OSError) as e:
        print(e, file=sys.stderr)
        return 1
    print(identity.fleet_key.hex())
    print(f"fleet {identity.key_fingerprint}; on the other boxes run: offgridd fleet join {identity.fleet_key.hex()}",
          file=sys.stderr)
    return 0


def cmd_fleet_join(args: argparse.Namespace) -> int:
    from ..cli import _settings
    from .fleet import FleetKeyError, join_fleet

    try:
        identity = join_fleet(_settings(args).state, args.key)
    except (FleetKeyError, OSError) as e:
        print(f"not joined: {e}", file=sys.stderr)
        return 1
    print(f"joined fleet {identity.key_fingerprint}; a running daemon picks the key up within one announcement "
          "interval")
    return 0


def cmd_fleet_rotate(args: argparse.Namespace) -> int:
    from ..cli import _settings
    from .fleet import FleetKeyError, rotate_fleet_key

    try:
        identity = rotate_fleet_key(_settings(args).state)
    except (FleetKeyError, OSError) as e:
        print(f"not rotated: {e}", file=sys.stderr)
        return 1
    print(identity.fleet_key.hex())
    print(f"new fleet {identity.key_fingerprint}: this box now accepts only the new key, and the others see it "
          f"again once they run: offgridd fleet join {identity.fleet_key.hex()}", file=sys.stderr)
    return 0


def add_peer_commands(sub, common: argparse.ArgumentParser) -> None:
    peers = sub.add_parser("peers", parents=[common], help="the other boxes this one sees on the LAN")
    peers.add_argument("--url", help="daemon URL (default from settings)")
    peers.add_argument("--json", action="store_true")
    peers.set_defaults(func=cmd_peers)
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
