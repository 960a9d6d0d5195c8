"""Documents on a stick: `documents/<file>` goes into the collection "default", `documents/<collection>/<file>` into
that collection, through the box's document store (read, chunked, embedded by the worker), one job per file.

Everything on a stick is hostile until checked: folders are opened with O_NOFOLLOW and listed with a bound, files are
opened through `stick.open_on_stick` (a symlink anywhere on the path is refused, never followed; so are FIFOs and
devices), a file's size is checked against the store's limit before a byte of it is read, and reading is bounded.
Listing and reading block (the daemon runs them in an executor); the store's `add` runs on the event loop.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import os
import stat
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..documents.extract import SUFFIXES
from ..documents.records import Document, DocumentError, DocumentExists, InvalidDocument, check_collection
from ..inference import Overloaded
from ..jobs import JobBoard
from .stick import NotOnStick, Refusal, StickFileError, is_utf8, open_on_stick, shown_name

log = logging.getLogger(__name__)

KIND = "usb-document"
FOLDER = "documents"
DEFAULT_COLLECTION = "default"
MAX_DOCUMENTS = 1_000  # per stick: each takes about a second a page to embed
MAX_ENTRIES = 4 * MAX_DOCUMENTS  # read from one folder, junk included, before the folder is refused
BUSY_FOR_S = 300.0  # how long a stick's documents wait, in all, for a box that is starting or whose queue is full
JUNK = {"thumbs.db", "ehthumbs.db", "desktop.ini", "__macosx"}  # what file managers leave; never a document
OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
READABLE = ", ".join(sorted(SUFFIXES))

# the document store's `add`: (collection, file name, bytes, progress=) -> the document kept; raises DocumentError
# saying why not. `progress` hears the share of the document embedded, 0 to 1, which the job shows as bytes
AddDocument = Callable[..., Awaitable[Document]]


@dataclass(frozen=True, slots=True, kw_only=True)
class StickDocument:
    file: str  # relative to the stick's root, "/"-separated: documents/<file> or documents/<collection>/<file>
    collection: str
    filename: str


@dataclass(slots=True, kw_only=True)
class DocumentListing:
    found: bool = False  # the stick has a documents/ folder (a stick with only documents is not refused)
    documents: list[StickDocument] = field(default_factory=list)
    refused: list[Refusal] = field(default_factory=list)
    hint: str = ""  # why a folder that looks meant for documents was not read


@dataclass(slots=True, kw_only=True)
class DocumentResult:
    kind: str = "document"
    name: str  # the file name, as the document is listed and cited
    file: str
    collection: str | None
    state: str  # done | skipped | failed
    reason: str = ""
    size: int | None = None
    sha256: str | None = None
    document_id: int | None = None
    job: str = ""


class _TooMany(Exception):
    pass


def _junk(name: str) -> bool:
    """Files a person did not put there: macOS's .DS_Store and ._ AppleDouble files, Windows' Thumbs.db, backups."""
    return name.startswith(".") or name.endswith("~") or name.lower() in JUNK


def _entries(fd: int) -> list[os.DirEntry]:
    out = []
    with os.scandir(fd) as it:
        for entry in it:
            if len(out) >= MAX_ENTRIES:
                raise _TooMany
            out.append(entry)
    return sorted(out, key=lambda e: e.name)


def _open_folder(parent: int, name: str, shown: str) -> int:
    try:
        return os.open(name, OPEN_DIR, dir_fd=parent)
    except OSError as e:
        if e.errno == errno.ELOOP or (e.errno == errno.ENOTDIR and _link(parent, name)):
            raise StickFileError(f"{shown}/ is a symlink; symlinks on a stick are not followed") from None
        if e.errno == errno.ENOENT:
            raise NotOnStick(f"{shown}/ is not on the stick") from None
        if e.errno == errno.ENOTDIR:
            raise StickFileError(f"{shown} is a file; documents go in a folder named {FOLDER}/") from None
        raise StickFileError(f"{shown}/ cannot be opened: {e.strerror}") from None


def _link(parent: int, name: str) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=parent, follow_symlinks=False).st_mode)
    except OSError:
        return False


class _Lister:
    def __init__(self) -> None:
        self.listing = DocumentListing()
        self.left = 0  # files past MAX_DOCUMENTS, left on the stick

    def refuse(self, file: str, reason: str, name: str = "") -> None:
        self.listing.refused.append(Refusal(file=file, name=name, reason=reason))

    def folder(self, fd: int, where: str, collection: str | None) -> None:
        """One folder's files; `collection` None for documents/ itself, whose folders are collections."""
        try:
            entries = _entries(fd)
        except _TooMany:
            self.refuse(where, f"{where}/ holds more than {MAX_ENTRIES} entries; none of its files were imported")
            return
        except OSError as e:
            self.refuse(where, f"{where}/ cannot be listed: {e.strerror}")
            return
        for entry in entries:
            if not is_utf8(entry.name):
                path = f"{where}/{shown_name(entry.name)}"
                self.refuse(path, f"{path!r}: the name is not UTF-8; rename it (on the PC that wrote the stick)")
            elif not _junk(entry.name):
                self.entry(fd, entry, f"{where}/{entry.name}", collection)

    def entry(self, parent: int, entry: os.DirEntry, path: str, collection: str | None) -> None:
        try:
            mode = os.stat(entry.name, dir_fd=parent, follow_symlinks=False).st_mode
        except OSError as e:
            self.refuse(path, f"{path} cannot be read: {e.strerror}")
            return
        if stat.S_ISLNK(mode):
            self.refuse(path, f"{path} is a symlink; symlinks on a stick are not followed", entry.name)
        elif stat.S_ISDIR(mode) and collection is not None:
            self.refuse(path, f"{path}/ is a folder inside the collection folder {collection!r}: collections are one "
                              f"level deep ({FOLDER}/<collection>/<file>), so its files were not imported")
        elif stat.S_ISDIR(mode):
            self.collection(parent, entry.name, path)
        elif not stat.S_ISREG(mode):
            self.refuse(path, f"{path} is not a regular file (a FIFO, device or socket); it was not read", entry.name)
        else:
            self.file(path, entry.name, collection or DEFAULT_COLLECTION)

    def collection(self, parent: int, name: str, path: str) -> None:
        try:
            check_collection(name)
        except InvalidDocument as e:
            self.refuse(path, f"{path}/: a folder's name is its collection's, and {e}; its files were not imported")
            return
        try:
            fd = _open_folder(parent, name, path)
        except StickFileError as e:
            self.refuse(path, str(e))
            return
        try:
            self.folder(fd, path, name)
        finally:
            os.close(fd)

    def file(self, path: str, name: str, collection: str) -> None:
        suffix = "." + name.rsplit(".", 1)[-1].lower() if "." in name else ""
        if suffix and suffix not in SUFFIXES:
            self.refuse(path, f"{path}: this box reads documents named {READABLE}, not {suffix!r} files; it was left "
                              "on the stick", name)
        elif len(self.listing.documents) >= MAX_DOCUMENTS:
            self.left += 1
        else:
            self.listing.documents.append(StickDocument(file=path, collection=collection, filename=name))


def read_documents(root: Path) -> DocumentListing:
    """The documents a mounted stick offers in its documents/ folder, and the entries refused with the reason.
    Blocks (lists folders)."""
    lister = _Lister()
    listing = lister.listing
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            fd = _open_folder(root_fd, FOLDER, FOLDER)
        except NotOnStick:
            listing.hint = _case_hint(root_fd)
            return listing
        except StickFileError as e:
            listing.found = True
            lister.refuse(FOLDER, str(e))
            return listing
        listing.found = True
        try:
            lister.folder(fd, FOLDER, None)
        finally:
            os.close(fd)
    finally:
        os.close(root_fd)
    if lister.left:
        lister.refuse(FOLDER, f"{FOLDER}/: a stick carries at most {MAX_DOCUMENTS} documents; {lister.left} more "
                              "were left on the stick (by name, the last ones)")
    return listing


def _case_hint(root_fd: int) -> str:
    with os.scandir(root_fd) as it:
        for entry in it:
            if entry.name.lower() == FOLDER:
                return f"the folder {shown_name(entry.name)!r} is not read: documents go in {FOLDER}/, in lower case"
    return ""


def read_document(root: Path, file: str, max_bytes: int) -> bytes:
    """One document's bytes, its size checked before it is read; raises StickFileError saying why not. Blocks."""
    f = os.fdopen(open_on_stick(root, file), "rb", buffering=0)
    try:
        size = os.fstat(f.fileno()).st_size
        if size > max_bytes:
            raise StickFileError(f"{file} is {size:,} bytes; documents are at most {max_bytes:,} "
                                 "(documents.max_upload_bytes); it was not read")
        try:
            data = f.read(max_bytes + 1)
        except OSError as e:
            raise StickFileError(f"read error on the stick: {e.strerror or e} (was the stick removed?)") from None
    finally:
        try:
            f.close()
        except OSError:
            pass  # a stick pulled mid-read fails its close too
    if len(data) > max_bytes:
        raise StickFileError(f"{file} grew past {max_bytes:,} bytes while being read; it was not kept")
    return data


async def import_documents(root: Path, documents: list[StickDocument], *, add: AddDocument, max_bytes: int,
                           jobs: JobBoard, cancel: threading.Event | None = None) -> list[DocumentResult]:
    """Each document into the store in turn, one job each: done, skipped (already in its collection) or failed with
    the reason. A file that fails costs its own job, never the rest of the stick."""
    loop = asyncio.get_running_loop()
    busy_until = time.monotonic() + BUSY_FOR_S
    results = []
    for doc in documents:
        source = f"usb:{root}/{doc.file}"
        job = jobs.start(KIND, source, doc.filename)
        result = DocumentResult(name=doc.filename, file=doc.file, collection=doc.collection, state="failed",
                                job=job.id)
        try:
            if cancel is not None and cancel.is_set():
                raise StickFileError("not imported: the daemon is stopping; plug the stick in again to import it")
            data = await loop.run_in_executor(None, read_document, root, doc.file, max_bytes)
            result.size = job.bytes_total = len(data)
            embedded = functools.partial(_embedded, jobs, job, len(data))
            document = await _add(add, doc, data, busy_until, cancel, progress=embedded)
        except StickFileError as e:
            result.reason = str(e)
        except DocumentExists as e:
            result.state, result.reason = "skipped", str(e)
        except DocumentError as e:
            result.reason = f"{e}; nothing was kept"
        except Overloaded as e:
            result.reason = f"the box was busy ({e}); nothing was kept: plug the stick in again to import it"
        except asyncio.CancelledError:
            result.reason = "interrupted: the daemon is stopping; nothing was kept"
            _finish(jobs, job, result, source)
            raise
        except Exception as e:  # the embedding model failing, or a bug a hostile file found: this file's job only
            log.exception("usb import of %s from %s failed unexpectedly", doc.filename, source)
            result.reason = f"{type(e).__name__}: {e}; nothing was kept"
        else:
            result.state, result.sha256, result.document_id = "done", document.sha256, document.id
            result.reason = (f"into collection {document.collection!r} as document {document.id}: {document.kind}, "
                             f"{document.pages} page(s), {document.chunks} chunk(s)")
        _finish(jobs, job, result, source)
        results.append(result)
    return results


async def _add(add: AddDocument, doc: StickDocument, data: bytes, busy_until: float,
               cancel: threading.Event | None, progress: Callable[[float], None]) -> Document:
    """The store's add, tried again while the box is starting or its queue is full (a stick present at start-up is
    read before the model that embeds is loaded), up to BUSY_FOR_S for the whole stick."""
    while True:
        try:
            return await add(doc.collection, doc.filename, data, progress=progress)
        except Overloaded as e:
            wait = min(max(e.retry_after or 1.0, 0.5), 2.0)  # a refusal costs nothing: look again soon
            if (cancel is not None and cancel.is_set()) or time.monotonic() + wait > busy_until:
                raise
            log.info("usb: the box is busy (%s); %s waits %.0f s", e, doc.file, wait)
            await asyncio.sleep(wait)


def _embedded(jobs: JobBoard, job, size: int, share: float) -> None:
    """A document's job advances through its bytes as its chunks are embedded, so it shows how long is left."""
    jobs.progress(job, int(share * size))


def _finish(jobs: JobBoard, job, result: DocumentResult, source: str) -> None:
    jobs.finish(job, result.state, result.reason)
    level = logging.WARNING if result.state == "failed" else logging.INFO
    log.log(level, "usb import of %s from %s: %s (%s)", result.name, source, result.state, result.reason,
            extra={"DOCUMENT": result.name, "SOURCE": source, "JOB": job.id, "STATE": result.state})
