"""What every command shares: settings from the same model the daemon uses (config file, environment, flags), the
flags generated from that model, the store, and asking the running daemon."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
import urllib.error
import urllib.request
from pathlib import Path

from ..settings import Settings, load_settings, loopback_for
from ..store import ModelStore

SECRET = {"api_key", "admin_key"}  # never on a command line, where `ps` shows them to every user


def _kind(hint) -> str | None:
    """How a setting's value is written on a command line, or None for a section (a table of its own)."""
    if typing.get_origin(hint) is list:
        return "A,B,..." if typing.get_args(hint) == (str,) else None
    kinds = [k for k in typing.get_args(hint) or [hint] if k is not type(None)]
    return kinds[0].__name__.upper() if all(k in (str, int, float, bool, Path) for k in kinds) else None


# every top-level setting a flag can set: generated from the model, so a new setting gets its flag
SETTING_FLAGS = [f.name for f in dataclasses.fields(Settings)
                 if f.name not in SECRET and _kind(typing.get_type_hints(Settings)[f.name])]


def common_parser() -> argparse.ArgumentParser:
    """--config and --state, which every command that reads settings takes."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", type=Path, help="config file (default /etc/offgridd/config.toml)")
    common.add_argument("--state", help="state directory (models, database)")
    return common


def add_setting_flags(parser: argparse.ArgumentParser, names: list[str] | None = None) -> None:
    """A --flag for each setting named (default: all but --state), parsed and checked as the config file's value
    would be, so a bad one is named with its flag."""
    hints = typing.get_type_hints(Settings)
    for name in names if names is not None else [n for n in SETTING_FLAGS if n != "state"]:
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, metavar=_kind(hints[name]),
                            help=f"the '{name}' setting")


def settings(args: argparse.Namespace) -> Settings:
    flags = {name: getattr(args, name, None) for name in SETTING_FLAGS}
    return load_settings(config=getattr(args, "config", None), flags=flags)


def board_settings(args: argparse.Namespace, root: Path | None = None):
    """Settings with the board profile's layer, and the detection that chose it."""
    from ..hardware import settings_for_board

    flags = {name: getattr(args, name, None) for name in SETTING_FLAGS}
    return settings_for_board(config=getattr(args, "config", None), flags=flags, root=root)


def open_store(args: argparse.Namespace) -> ModelStore:
    store = ModelStore(settings(args).state / "models")
    store.open()
    return store


def base_url(args: argparse.Namespace) -> str:
    if getattr(args, "url", None):
        return args.url.rstrip("/")
    s = settings(args)
    return f"http://{loopback_for(s.host)}:{s.port}"


def ask_daemon(args: argparse.Namespace, path: str) -> tuple[int, dict] | None:
    """GET a native API path from the running daemon; None (after saying so) when it does not answer."""
    url = base_url(args)
    key = settings(args).api_key
    req = urllib.request.Request(f"{url}{path}", headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)
    except (urllib.error.URLError, OSError) as e:
        print(f"offgridd is not answering at {url}: {getattr(e, 'reason', e)}", file=sys.stderr)
        return None


def daemon_error(code: int, body: dict) -> bool:
    """Print the daemon's error, if its answer is one."""
    if "error" in body:
        print(f"error {code}: {body['error']['message']}", file=sys.stderr)
        return True
    return False
