"""`offgridd peers`: the other boxes this one sees on the LAN."""

from __future__ import annotations

import argparse
import json
import sys

from .common import ask_daemon


def cmd_peers(args: argparse.Namespace) -> int:
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


def add_commands(sub, common: argparse.ArgumentParser) -> None:
    peers = sub.add_parser("peers", parents=[common], help="the other boxes this one sees on the LAN")
    peers.add_argument("--url", help="daemon URL (default from settings)")
    peers.add_argument("--json", action="store_true")
    peers.set_defaults(func=cmd_peers)
