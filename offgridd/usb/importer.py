"""Import what a stick carries: one job per model, copied once while hashing, committed through the store or not at all;
then its documents/ folder, listed here and imported by the caller on the event loop (`documents.import_documents`).

Blocks (reads the stick, writes the store): the daemon runs `import_stick` in an executor, the CLI calls it directly.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..jobs import Job, JobBoard
from ..store import CHUNK, ModelStore, StoreError
from .documents import FOLDER, DocumentListing, DocumentResult, StickDocument, read_documents
from .documents import KIND as DOCUMENT_KIND
from .stick import Refusal, Stick, StickError, StickFileError, StickModel, open_on_stick, read_stick

log = logging.getLogger(__name__)

KIND = "usb-import"
RESERVE_BYTES = 16 << 20  # left free after an import, so sqlite and the logs can still write
LOG_EVERY_S = 5.0
NEEDS_DAEMON = ("documents are imported by the running daemon, which embeds them with its model: run "
                "'offgridd usb import' while it runs, or plug the stick into the box")
DOCUMENTS_OFF = "documents are off on this box (documents.enabled = false)"


class Interrupted(Exception):
    pass


class StickReadError(Exception):
    pass


@dataclass(slots=True, kw_only=True)
class ModelResult:
    kind: str = "model"
    name: str
    file: str
    state: str  # done | skipped | failed
    reason: str = ""
    sha256: str | None = None
    size: int | None = None
    job: str = ""


@dataclass(slots=True, kw_only=True)
class StickReport:
    root: str
    results: list[ModelResult | DocumentResult] = field(default_factory=list)  # models first, then documents
    refused: str = ""  # the whole stick was refused, and why
    pending_documents: list[StickDocument] = field(default_factory=list, repr=False)  # for the caller to import

    @property
    def ok(self) -> bool:
        return not self.refused and all(r.state != "failed" for r in self.results)

    @property
    def imported(self) -> list[str]:
        """The models imported."""
        return [r.name for r in self.results if r.kind == "model" and r.state == "done"]

    @property
    def documents_imported(self) -> list[str]:
        return [f"{r.collection}/{r.name}" for r in self.results if r.kind == "document" and r.state == "done"]

    def to_dict(self) -> dict:
        return {"root": self.root, "ok": self.ok, "refused": self.refused,
                "results": [asdict(r) for r in self.results]}


def _stick_chunks(f, job: Job, jobs: JobBoard, cancel: threading.Event | None) -> Iterator[bytes]:
    """Read a stick file once, in store-sized chunks, reporting progress and to the log now and then."""
    done, logged = 0, time.monotonic()
    os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
    while True:
        if cancel is not None and cancel.is_set():
            raise Interrupted("the import was interrupted: the daemon is stopping")
        try:
            block = f.read(CHUNK)
        except OSError as e:
            raise StickReadError(f"read error on the stick after {done} of {job.bytes_total} bytes: "
                                 f"{e.strerror or e} (was the stick removed?)") from None
        if not block:
            return
        done += len(block)
        jobs.progress(job, done)
        if time.monotonic() - logged >= LOG_EVERY_S:
            logged = time.monotonic()
            info = job.to_dict()
            eta = f", {info['eta_s']:.0f}s left" if info["eta_s"] is not None else ""
            log.info("usb import of %s: %d of %d MB, %.1f MB/s%s", job.model, done >> 20,
                     job.bytes_total >> 20, info["rate_bytes_per_s"] / 1e6, eta)
        yield block


def _present(store: ModelStore, sha256: str) -> str | None:
    for m in store.list():
        if m.sha256 == sha256:
            return m.name
    return None


def import_model(stick: Stick, model: StickModel, *, store: ModelStore, jobs: JobBoard,
                 cancel: threading.Event | None = None) -> ModelResult:
    """One model from a stick: refused, skipped or committed, recorded as a job with its reason."""
    result = ModelResult(name=model.name, file=model.file, state="failed", sha256=model.sha256, size=model.size)
    source = f"usb:{stick.root}/{model.file}"
    f = None
    try:
        f = os.fdopen(open_on_stick(stick.root, model.file), "rb", buffering=0)
        size = os.fstat(f.fileno()).st_size
    except StickFileError as e:
        result.reason, size = str(e), 0
    except OSError as e:
        result.reason, size = f"{model.file} cannot be read: {e.strerror}", 0
    job = jobs.start(KIND, source, model.name, total=size)
    result.job = job.id
    if f is not None:
        try:
            result.state, result.reason = _import_open(model, f, size, store, jobs, job, cancel)
        except Exception as e:  # a file that trips a bug costs its own job, never the rest of the stick
            log.exception("usb import of %s from %s failed unexpectedly", model.name, source)
            result.state, result.reason = "failed", f"{type(e).__name__}: {e}; nothing was imported"
        finally:
            with contextlib.suppress(OSError):  # a stick pulled mid-copy fails its close too
                f.close()
    jobs.finish(job, result.state, result.reason)
    level = logging.WARNING if result.state == "failed" else logging.INFO
    log.log(level, "usb import of %s from %s: %s%s", model.name, source, result.state,
            f" ({result.reason})" if result.reason else "",
            extra={"MODEL": model.name, "SOURCE": source, "JOB": job.id, "STATE": result.state})
    return result


def _import_open(model: StickModel, f, size: int, store: ModelStore, jobs: JobBoard, job: Job,
                 cancel: threading.Event | None) -> tuple[str, str]:
    kept = " nothing was copied"
    if model.size is not None and size != model.size:
        return "failed", (f"size mismatch: the manifest says {model.size} bytes, {model.file} is {size} bytes "
                          f"(truncated or replaced?);{kept}")
    if model.sha256 is not None and (present := _present(store, model.sha256)):
        return "skipped", f"already in the store as {present!r} (same sha256)"
    existing = store.find(model.name)
    if existing is not None and existing.sha256 != model.sha256:
        return "failed", (f"the name {model.name!r} is already used by another model in the store "
                          f"(sha256 {existing.sha256[:12]}…);{kept}")
    free = shutil.disk_usage(store.staging).free
    if size + RESERVE_BYTES > free:
        return "failed", (f"not enough space: {model.file} needs {size} bytes plus {RESERVE_BYTES >> 20} MiB "
                          f"kept free, {free} bytes are free;{kept}")
    try:
        manifest = store.import_chunks(
            _stick_chunks(f, job, jobs, cancel), name=model.name, source=f"usb:{model.file}",
            expected_sha256=model.sha256, expected_size=size, license=model.license)
    except StoreError as e:
        return "failed", f"{e}; nothing was imported, the file is left on the stick"
    except (Interrupted, StickReadError) as e:
        return "failed", f"{e}; nothing was imported"
    except OSError as e:
        return "failed", f"writing the store failed: {e.strerror or e}; nothing was imported"
    verified = "sha256 verified" if model.sha256 else "UNVERIFIED: no checksum on the stick"
    return "done", f"{manifest.architecture} {manifest.quantization}, {manifest.size} bytes, {verified}"


def import_stick(root: Path, *, store: ModelStore, jobs: JobBoard, allow_unverified: bool = False,
                 cancel: threading.Event | None = None, documents_off: str | None = NEEDS_DAEMON) -> StickReport:
    """Import every model a mounted stick offers; a stick that is wrong as a whole is refused with one job record.

    Its documents are listed: those refused get their job here; the rest are left in `report.pending_documents` for
    the caller to import on the event loop, or, when `documents_off` says why this caller cannot, skipped with
    one job saying so."""
    report = StickReport(root=str(root))
    store.open()
    try:
        stick = read_stick(Path(root), allow_unverified=allow_unverified)
    except Exception as e:  # StickError says why; anything else is a bug a hostile stick found, refused the same way
        why = str(e) if isinstance(e, StickError) else f"{type(e).__name__}: {e}"
        if not isinstance(e, StickError):
            log.exception("reading the stick at %s failed unexpectedly", root)
        report.refused = f"stick refused: {why}; nothing was imported"
        job = jobs.start(KIND, f"usb:{root}")
        jobs.finish(job, "failed", report.refused)
        log.warning("usb import from %s: %s", root, report.refused, extra={"SOURCE": f"usb:{root}", "JOB": job.id})
        return report
    documents = _read_documents(Path(root))
    for refusal in stick.refused:
        job = jobs.start(KIND, f"usb:{root}/{refusal.file}", refusal.name)
        jobs.finish(job, "failed", refusal.reason)
        log.warning("usb import from %s: %s", root, refusal.reason)
        report.results.append(ModelResult(name=refusal.name, file=refusal.file, state="failed",
                                          reason=refusal.reason, job=job.id))
    if not stick.models and not stick.refused and not documents.found:
        hint = f" ({documents.hint})" if documents.hint else ""
        report.refused = (f"no models on {root}: expected OFFGRID/manifest.json, *.gguf files with a .sha256 beside, "
                          f"or a {FOLDER}/ folder{hint}")
        return report
    for model in stick.models:
        report.results.append(import_model(stick, model, store=store, jobs=jobs, cancel=cancel))
    _list_documents(report, documents, jobs, documents_off)
    return report


def _read_documents(root: Path) -> DocumentListing:
    try:
        return read_documents(root)
    except Exception as e:  # a bug a hostile stick found costs its documents, not its models
        log.exception("listing the documents on the stick at %s failed unexpectedly", root)
        return DocumentListing(found=True, refused=[Refusal(file=FOLDER, reason=(
            f"{FOLDER}/ could not be read ({type(e).__name__}: {e}); no document was imported"))])


def _list_documents(report: StickReport, documents: DocumentListing, jobs: JobBoard, off: str | None) -> None:
    root = report.root
    for refusal in documents.refused:
        job = jobs.start(DOCUMENT_KIND, f"usb:{root}/{refusal.file}", refusal.name)
        jobs.finish(job, "failed", refusal.reason)
        log.warning("usb import from %s: %s", root, refusal.reason)
        report.results.append(DocumentResult(name=refusal.name, file=refusal.file, collection=None, state="failed",
                                             reason=refusal.reason, job=job.id))
    if off is None:
        report.pending_documents = list(documents.documents)
    elif documents.documents:
        count = len(documents.documents)
        reason = f"{off}; the {count} document(s) in {FOLDER}/ were left on the stick"
        job = jobs.start(DOCUMENT_KIND, f"usb:{root}/{FOLDER}", FOLDER)
        jobs.finish(job, "skipped", reason)
        log.info("usb import from %s: %s", root, reason)
        report.results.append(DocumentResult(name=FOLDER, file=FOLDER, collection=None, state="skipped",
                                             reason=reason, job=job.id))
