"""`offgridd models import|list|rm|verify`: the model store, without the daemon."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..store import StoreError, name_from_filename
from .common import open_store


def cmd_import(args: argparse.Namespace) -> int:
    store = open_store(args)
    path = Path(args.path)
    try:
        m = store.import_file(path, name=args.name or name_from_filename(path.name), expected_sha256=args.sha256,
                              source=f"file:{path.resolve()}")
    except (StoreError, OSError) as e:
        print(f"import refused: {e}", file=sys.stderr)
        return 1
    print(f"imported {m.name}: {m.architecture} {m.quantization}, {m.size} bytes, sha256 {m.sha256}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    store = open_store(args)
    models = store.list()
    if args.json:
        print(json.dumps([{**m.to_dict(), "path": str(store.path_of(m))} for m in models], indent=2))
        return 0
    if not models:
        print("no models in the store; import one with 'offgridd models import FILE'")
    for m in models:
        print(f"{m.name:32} {m.quantization:8} {m.size / 1e6:9.1f} MB  ctx {m.context_length:<7} {m.source}")
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    try:
        m = open_store(args).remove(args.name)
    except StoreError as e:
        print(e, file=sys.stderr)
        return 1
    print(f"removed {m.name}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    store = open_store(args)
    names = [args.name] if args.name else [m.name for m in store.list()]
    bad = 0
    for name in names:
        try:
            ok, actual = store.verify(name)
        except StoreError as e:
            print(e, file=sys.stderr)
            return 1
        bad += not ok
        print(f"{name}: {'ok' if ok else f'CORRUPT (got {actual})'}")
    return 1 if bad else 0


def add_commands(sub, common: argparse.ArgumentParser):
    """Returns the `models` subcommands, which `offgridd models export` (cli.usb) joins."""
    models = sub.add_parser("models", help="the model store").add_subparsers(dest="models_command", required=True)
    imp = models.add_parser("import", parents=[common], help="verify and add a GGUF file")
    imp.add_argument("path")
    imp.add_argument("--sha256", help="expected digest; the import is refused on mismatch")
    imp.add_argument("--name", help="model name (default: from the file name)")
    imp.set_defaults(func=cmd_import)
    ls = models.add_parser("list", parents=[common], help="list models")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_list)
    rm = models.add_parser("rm", parents=[common], help="remove a model")
    rm.add_argument("name")
    rm.set_defaults(func=cmd_rm)
    verify = models.add_parser("verify", parents=[common], help="rehash models against their manifests")
    verify.add_argument("name", nargs="?")
    verify.set_defaults(func=cmd_verify)
    return models
