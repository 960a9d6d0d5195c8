"""`offgridd usb prepare|import` and `offgridd models export`: sticks, with or without the daemon."""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from pathlib import Path

from ..db import Database
from ..events import EventBus
from ..jobs import Job, JobBoard
from ..settings import Settings, loopback_for
from ..store import ModelStore, StoreError, name_from_filename
from ..usb import ModelSource, StickWriteError, import_stick, write_documents, write_stick
from .common import settings as _settings


class _Progress:
    """One line on stderr, rewritten as bytes arrive, when stderr is a terminal."""

    def __init__(self):
        self.tty = sys.stderr.isatty()

    def show(self, label: str, done: int, total: int, rate: float = 0.0) -> None:
        if self.tty:
            pct = f"{100 * done / total:5.1f}%" if total else ""
            speed = f" {rate / 1e6:6.1f} MB/s" if rate else ""
            print(f"\r{label[:40]:40} {pct} {done >> 20:>7} MiB{speed}", end="", file=sys.stderr, flush=True)

    def end(self) -> None:
        if self.tty:
            print(file=sys.stderr)


class _TerminalJobBoard(JobBoard):
    def __init__(self, db: Database, progress: _Progress):
        super().__init__(db, EventBus())
        self.terminal = progress

    def progress(self, job: Job, done: int) -> None:
        super().progress(job, done)
        self.terminal.show(job.model, done, job.bytes_total, job.to_dict()["rate_bytes_per_s"])

    def finish(self, job: Job, state: str, reason: str = "") -> None:
        if job.bytes_done:
            self.terminal.end()
        super().finish(job, state, reason)


def _print_report(report: dict) -> None:
    if report.get("refused"):
        print(report["refused"], file=sys.stderr)
    for r in report.get("results", []):
        if r["state"] == "done":
            print(f"imported {r['name']}: {r['reason']}")
        elif r["state"] == "skipped":
            print(f"skipped {r['name']}: {r['reason']}")
        else:
            print(f"REFUSED {r['name'] or r['file']}: {r['reason']}", file=sys.stderr)


def _through_daemon(settings: Settings, path: Path) -> dict | None:
    """Ask the running daemon to import; None when no daemon answers."""
    host = loopback_for(settings.host)
    key = settings.admin_key or settings.api_key
    req = urllib.request.Request(f"http://{host}:{settings.port}/api/v1/usb/import", method="POST",
                                 data=json.dumps({"path": str(path)}).encode(),
                                 headers={"Content-Type": "application/json",
                                          **({"Authorization": f"Bearer {key}"} if key else {})})
    try:
        with urllib.request.urlopen(req, timeout=24 * 3600) as resp:
            return json.load(resp)
    except urllib.error.HTTPError as e:
        try:
            message = json.load(e)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = f"HTTP {e.code}"
        return {"root": str(path), "ok": False, "refused": f"the daemon refused: {message}", "results": []}
    except (urllib.error.URLError, ConnectionError):
        return None


def cmd_usb_import(args: argparse.Namespace) -> int:
    settings = _settings(args)
    path = Path(args.path).resolve()
    report = None if args.local else _through_daemon(settings, path)
    if report is None:
        store = ModelStore(settings.state / "models")
        db = Database(settings.state / "offgridd.db")
        try:
            report = import_stick(path, store=store, jobs=_TerminalJobBoard(db, _Progress()),
                                  allow_unverified=settings.usb.allow_unverified).to_dict()
        finally:
            db.close()
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_report(report)
    return 0 if report["ok"] else 1


def _write(target: Path, sources: list[ModelSource], ready: bool = True) -> int:
    progress = _Progress()
    try:
        written = write_stick(target, sources, on_progress=lambda name, done: progress.show(name, done, 0))
    except (StickWriteError, OSError) as e:
        progress.end()
        print(f"not written: {e}", file=sys.stderr)
        return 1
    progress.end()
    for m in written:
        print(f"wrote {m.name}: {m.file}, {m.size} bytes, sha256 {m.sha256}")
    if ready:
        print(f"{target} is ready: plug it into an offgridd box")
    return 0


def cmd_usb_prepare(args: argparse.Namespace) -> int:
    if not args.files and not args.documents:
        print("give model files, documents (--documents FILE...), or both", file=sys.stderr)
        return 2
    if args.name and len(args.files) != 1:
        print("--name needs exactly one model file", file=sys.stderr)
        return 2
    if args.files:
        sources = [ModelSource(name=args.name or name_from_filename(f.name), path=f, license=args.license,
                               description=args.description) for f in args.files]
        if (code := _write(args.dir, sources, ready=not args.documents)) != 0:
            return code
    if args.documents:
        try:
            written = write_documents(args.dir, args.documents, args.collection)
        except (StickWriteError, OSError) as e:
            print(f"not written: {e}", file=sys.stderr)
            return 1
        for path in written:
            print(f"wrote {path}")
        print(f"{args.dir} is ready: plug it into an offgridd box")
    return 0


def cmd_models_export(args: argparse.Namespace) -> int:
    store = ModelStore(_settings(args).state / "models")
    sources = []
    for name in args.names:
        try:
            m = store.get(name)
        except StoreError as e:
            print(e, file=sys.stderr)
            return 1
        sources.append(ModelSource(name=m.name, path=store.path_of(m), license=m.license or "unspecified",
                                   sha256=m.sha256))
    return _write(args.to, sources)


def add_commands(sub, common: argparse.ArgumentParser, models) -> None:
    """`usb prepare|import` under the top level, `export` under `models`."""
    usb = sub.add_parser("usb", help="USB sticks: write them, import from them").add_subparsers(
        dest="usb_command", required=True)
    prep = usb.add_parser("prepare", help="write models and documents onto a mounted stick in the offgridd format "
                          "(no daemon needed)")
    prep.add_argument("dir", type=Path, help="the stick's mount point")
    prep.add_argument("files", type=Path, nargs="*", metavar="MODEL_FILE", help="GGUF files")
    prep.add_argument("--documents", type=Path, nargs="+", default=[], metavar="FILE",
                      help="documents (text, Markdown, HTML, PDF) for the box's collections")
    prep.add_argument("--collection", help="the collection the documents go into (default: 'default')")
    prep.add_argument("--name", help="model name (one file only; default: from the file name)")
    prep.add_argument("--license", default="unspecified", help="license text or SPDX id recorded in the manifest")
    prep.add_argument("--description")
    prep.set_defaults(func=cmd_usb_prepare)
    imp = usb.add_parser("import", parents=[common], help="import a mounted stick (through the daemon when it runs)")
    imp.add_argument("path")
    imp.add_argument("--json", action="store_true")
    imp.add_argument("--local", action="store_true", help="import here even when the daemon is running")
    imp.set_defaults(func=cmd_usb_import)
    exp = models.add_parser("export", parents=[common], help="write models onto a mounted stick")
    exp.add_argument("names", nargs="+", metavar="NAME")
    exp.add_argument("--to", type=Path, required=True, help="the stick's mount point")
    exp.set_defaults(func=cmd_models_export)

