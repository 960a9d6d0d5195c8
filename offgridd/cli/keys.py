"""`offgridd keys add|list|revoke` and `offgridd audit`: who may use the box, and what was done on it. They work on
the box's database directly, so they work with the daemon stopped too; a running daemon sees a change within
a second."""

from __future__ import annotations

import argparse
import getpass
import json
import re
import sys
import time

from .. import audit, keys
from ..db import Database
from .common import settings

SINCE = re.compile(r"(\d+(?:\.\d+)?)([smhd])")


def _database(args: argparse.Namespace) -> Database:
    return Database(settings(args).state / "offgridd.db")


def _who() -> str:
    try:
        return f"{getpass.getuser()} (command line)"
    except (KeyError, OSError):
        return "(command line)"


def record(args: argparse.Namespace, action: str, outcome: str, detail: str = "") -> None:
    """Write an audit entry from the command line (fleet and key changes)."""
    db = _database(args)
    try:
        db.run_sync(lambda d: audit.record_now(d, action, outcome, key=_who(), client="localhost", detail=detail))
    finally:
        db.close()


def cmd_add(args: argparse.Namespace) -> int:
    db = _database(args)
    try:
        secret = db.run_sync(lambda d: keys.add_key(d, args.name, args.scope, args.rpm, args.tpm))
        db.run_sync(lambda d: audit.record_now(d, f"keys add {args.name}", "done", key=_who(), client="localhost",
                                               detail=f"scope {args.scope}, rpm {args.rpm}, tpm {args.tpm}"))
    except keys.KeyRefused as e:
        print(f"not added: {e}", file=sys.stderr)
        return 1
    finally:
        db.close()
    print(secret)
    print(f"key {args.name!r} ({args.scope}) made; it is shown this once: clients send "
          "'Authorization: Bearer <key>'", file=sys.stderr)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    db = _database(args)
    try:
        rows = db.run_sync(keys.list_keys)
    finally:
        db.close()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no keys: the API is open to the LAN and admin actions are taken from this box only; "
              "add one with 'offgridd keys add NAME --scope admin'")
    for r in rows:
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(r["last_used"])) if r["last_used"] else "never"
        print(f"{r['name']:24} {r['scope']:6} rpm {r['rpm'] or '-':>6} tpm {r['tpm'] or '-':>8}  last used {used}")
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    db = _database(args)
    try:
        db.run_sync(lambda d: keys.revoke_key(d, args.name))
        db.run_sync(lambda d: audit.record_now(d, f"keys revoke {args.name}", "done", key=_who(), client="localhost"))
    except keys.KeyRefused as e:
        print(e, file=sys.stderr)
        return 1
    finally:
        db.close()
    print(f"revoked {args.name}")
    return 0


def since(text: str) -> float:
    """'90s', '15m', '2h', '7d' ago, or a Unix time."""
    if m := SINCE.fullmatch(text):
        return time.time() - float(m[1]) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m[2]]
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a duration like 15m, 2h, 7d, or a Unix time, got {text!r}") \
            from None


def cmd_audit(args: argparse.Namespace) -> int:
    db = _database(args)
    try:
        rows = db.run_sync(lambda d: audit.entries(d, args.since, args.limit))
    finally:
        db.close()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for r in reversed(rows):
        at = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["time"]))
        detail = f"  {r['detail']}" if r["detail"] else ""
        print(f"{at}  {r['client'] or '-':16} {r['key'] or '-':20} {r['action']:40} {r['outcome']}{detail}")
    return 0


def add_commands(sub, common: argparse.ArgumentParser) -> None:
    group = sub.add_parser("keys", help="API keys: who may use this box").add_subparsers(dest="keys_command",
                                                                                     required=True)
    add = group.add_parser("add", parents=[common], help="make a key and print it (once)")
    add.add_argument("name")
    add.add_argument("--scope", choices=keys.SCOPES, default="chat",
                     help="chat: the API; admin: also deleting and importing models, USB, keys (default chat)")
    add.add_argument("--rpm", type=int, default=0, help="requests per minute (default: no bound)")
    add.add_argument("--tpm", type=int, default=0, help="tokens per minute, prompt and answer (default: no bound)")
    add.set_defaults(func=cmd_add)
    ls = group.add_parser("list", parents=[common], help="the keys, their scopes, limits and last use")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_list)
    revoke = group.add_parser("revoke", parents=[common], help="stop accepting a key")
    revoke.add_argument("name")
    revoke.set_defaults(func=cmd_revoke)

    log = sub.add_parser("audit", parents=[common], help="admin actions, refused keys, fleet changes")
    log.add_argument("--since", type=since, default=0.0, help="how far back: 15m, 2h, 7d, or a Unix time")
    log.add_argument("--limit", type=int, default=200)
    log.add_argument("--json", action="store_true")
    log.set_defaults(func=cmd_audit)
