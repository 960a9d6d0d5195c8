"""The `offgridd` command: serve, status, models, chat."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import urllib.error
import urllib.request
from pathlib import Path

from .peers.cli import add_peer_commands
from .settings import Settings, SettingsError, load_settings
from .store import ModelStore, StoreError, name_from_filename
from .usb.cli import add_commands as add_usb_commands


def _settings(args: argparse.Namespace) -> Settings:
    flags = {k: getattr(args, k, None) for k in ("host", "port", "state", "model", "threads", "ctx")}
    return load_settings(config=args.config, flags=flags)


def _store(args: argparse.Namespace) -> ModelStore:
    store = ModelStore(_settings(args).state / "models")
    store.open()
    return store


def _board_settings(args: argparse.Namespace, root: Path | None = None):
    from .hardware import settings_for_board

    flags = {k: getattr(args, k, None) for k in ("host", "port", "state", "model", "threads", "ctx")}
    return settings_for_board(config=args.config, flags=flags, root=root)


def cmd_serve(args: argparse.Namespace) -> int:
    from .daemon import serve
    from .logs import setup_logging

    settings, detection = _board_settings(args)
    setup_logging(settings.log_level)
    asyncio.run(serve(settings, detection))
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    from .hardware import ProfileError

    try:
        settings, detection = _board_settings(args, root=Path(args.root) if args.root else None)
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


def cmd_doctor(args: argparse.Namespace) -> int:
    from .doctor import print_report, report
    from .inference.pool import default_threads

    settings, _ = _board_settings(args)
    r = report(settings, threads=settings.threads or default_threads(), seconds=args.seconds)
    if args.json:
        print(json.dumps(r, indent=2))
    else:
        print_report(r)
    return {"ok": 0, "safe-path": 1}.get(r["verdict"], 2)


def _base_url(args: argparse.Namespace) -> str:
    if args.url:
        return args.url.rstrip("/")
    s = _settings(args)
    host = "127.0.0.1" if s.host in ("0.0.0.0", "::", "") else s.host
    return f"http://{host}:{s.port}"


def ask_daemon(args: argparse.Namespace, path: str) -> tuple[int, dict] | None:
    """GET a native API path from the running daemon; None (after saying so) when it does not answer."""
    url = _base_url(args)
    key = _settings(args).api_key
    req = urllib.request.Request(f"{url}{path}", headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)
    except (urllib.error.URLError, OSError) as e:
        print(f"offgridd is not answering at {url}: {getattr(e, 'reason', e)}", file=sys.stderr)
        return None


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


def cmd_models_import(args: argparse.Namespace) -> int:
    store = _store(args)
    path = Path(args.path)
    try:
        m = store.import_file(path, name=args.name or name_from_filename(path.name), expected_sha256=args.sha256,
                              source=f"file:{path.resolve()}")
    except (StoreError, OSError) as e:
        print(f"import refused: {e}", file=sys.stderr)
        return 1
    print(f"imported {m.name}: {m.architecture} {m.quantization}, {m.size} bytes, sha256 {m.sha256}")
    return 0


def cmd_models_list(args: argparse.Namespace) -> int:
    store = _store(args)
    models = store.list()
    if args.json:
        print(json.dumps([{**m.to_dict(), "path": str(store.path_of(m))} for m in models], indent=2))
        return 0
    if not models:
        print("no models in the store; import one with 'offgridd models import FILE'")
    for m in models:
        print(f"{m.name:32} {m.quantization:8} {m.size / 1e6:9.1f} MB  ctx {m.context_length:<7} {m.source}")
    return 0


def cmd_models_rm(args: argparse.Namespace) -> int:
    try:
        m = _store(args).remove(args.name)
    except StoreError as e:
        print(e, file=sys.stderr)
        return 1
    print(f"removed {m.name}")
    return 0


def cmd_models_verify(args: argparse.Namespace) -> int:
    store = _store(args)
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


def cmd_chat(args: argparse.Namespace) -> int:
    from .chat import run_chat

    return run_chat(_base_url(args), args.model, args.system, _settings(args).api_key)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="offgridd", description="Offline LLM appliance daemon")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", type=Path, help="config file (default /etc/offgridd/config.toml)")
    common.add_argument("--state", help="state directory (models, database)")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", parents=[common], help="run the daemon")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--model", help="model name to load at start")
    serve.add_argument("--threads", type=int)
    serve.add_argument("--ctx", type=int)
    serve.set_defaults(func=cmd_serve)

    status = sub.add_parser("status", parents=[common], help="ask the running daemon how it is")
    status.add_argument("--url", help="daemon URL (default from settings)")
    status.add_argument("--json", action="store_true")
    status.add_argument("--settings", action="store_true", help="print the daemon's effective settings")
    status.set_defaults(func=cmd_status)

    models = sub.add_parser("models", help="the model store").add_subparsers(dest="models_command", required=True)
    imp = models.add_parser("import", parents=[common], help="verify and add a GGUF file")
    imp.add_argument("path")
    imp.add_argument("--sha256", help="expected digest; the import is refused on mismatch")
    imp.add_argument("--name", help="model name (default: from the file name)")
    imp.set_defaults(func=cmd_models_import)
    ls = models.add_parser("list", parents=[common], help="list models")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_models_list)
    rm = models.add_parser("rm", parents=[common], help="remove a model")
    rm.add_argument("name")
    rm.set_defaults(func=cmd_models_rm)
    verify = models.add_parser("verify", parents=[common], help="rehash models against their manifests")
    verify.add_argument("name", nargs="?")
    verify.set_defaults(func=cmd_models_verify)
    add_usb_commands(sub, models, common)
    add_peer_commands(sub, common)

    profile = sub.add_parser("profile", parents=[common], help="which board profile applies here, and why")
    profile.add_argument("--root", help="read /proc, /sys and /etc under this directory (default /)")
    profile.add_argument("--json", action="store_true")
    profile.set_defaults(func=cmd_profile)

    doctor = sub.add_parser("doctor", parents=[common],
                            help="the engine's build target, this CPU's features, a self-test and decode speed")
    doctor.add_argument("--json", action="store_true")
    doctor.add_argument("--seconds", type=float, default=3.0, help="how long to measure decode speed")
    doctor.set_defaults(func=cmd_doctor)

    chat = sub.add_parser("chat", parents=[common], help="chat with the running daemon in the terminal")
    chat.add_argument("--url", help="daemon URL (default from settings)")
    chat.add_argument("--model", help="model name (default: the daemon's)")
    chat.add_argument("--system", help="system message")
    chat.set_defaults(func=cmd_chat)
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
