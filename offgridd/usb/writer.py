"""Write the stick format: `offgridd usb prepare` (from a PC) and `offgridd models export` (from the box); documents
into its documents/ folder (`write_documents`)."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .. import __version__
from ..documents.extract import SUFFIXES
from ..documents.records import InvalidDocument, check_collection
from ..store import (
    BundleError,
    GgufError,
    file_chunks,
    looks_like_bundle,
    read_bundle_info,
    read_gguf_info,
    valid_name,
    write_hashing,
)
from .documents import DEFAULT_COLLECTION, FOLDER, MAX_DOCUMENTS, READABLE
from .stick import FORMAT_VERSION, MANIFEST, MAX_MODELS, StickError, StickModel, parse_manifest

MODELS_DIR = "OFFGRID/models"
SLACK_BYTES = 1 << 20  # the manifest and directory entries


class StickWriteError(Exception):
    """Nothing (more) was written; the message says why."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelSource:
    name: str
    path: Path
    license: str
    description: str | None = None
    sha256: str | None = None  # when known (export from the store): the copy must hash to it


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems (FUSE FAT) do not sync directories; the rename is still atomic
    finally:
        os.close(fd)


def _existing_models(target: Path) -> list[StickModel]:
    path = target / MANIFEST
    if not path.exists():
        return []
    try:
        return parse_manifest(path.read_bytes())
    except StickError as e:
        raise StickWriteError(f"{path} is there but unusable ({e}); remove it or use an empty stick") from None


def _copy_hashing(src: Path, dest: Path, on_progress: Callable[[int], None] | None) -> str:
    partial = dest.with_name(dest.name + ".partial")
    partial.unlink(missing_ok=True)  # a link left there is removed, never followed: "xb" creates a new file only
    try:
        digest, _ = write_hashing(partial, file_chunks(src), mode="xb", on_progress=on_progress)
        os.replace(partial, dest)
    finally:
        partial.unlink(missing_ok=True)
    return digest


def write_stick(target: Path, sources: list[ModelSource],
                on_progress: Callable[[str, int], None] | None = None) -> list[StickModel]:
    """Copy the models onto a mounted stick while hashing, then write OFFGRID/manifest.json atomically."""
    target = Path(target)
    if not target.is_dir():
        raise StickWriteError(f"{target} is not a directory: mount the stick and give its mount point")
    if not sources:
        raise StickWriteError("no models given")
    names = [s.name for s in sources]
    if dup := {n for n in names if names.count(n) > 1}:
        raise StickWriteError(f"the name(s) {sorted(dup)} are given twice")
    planned = []
    for s in sources:
        if not valid_name(s.name):
            raise StickWriteError(f"invalid model name {s.name!r}: use letters, digits and . _ : - (at most 128)")
        try:  # a speech model is one bundle blob, carried like a GGUF (store/bundle.py)
            info = read_bundle_info(s.path) if looks_like_bundle(s.path) else read_gguf_info(s.path)
        except GgufError as e:
            raise StickWriteError(f"{s.path} is not a usable GGUF model: {e}") from None
        except BundleError as e:
            raise StickWriteError(f"{s.path} is not a usable speech model bundle: {e}") from None
        except OSError as e:
            raise StickWriteError(f"{s.path} cannot be read: {e.strerror}") from None
        planned.append((s, info.quantization, s.path.stat().st_size))
    kept = [m for m in _existing_models(target) if m.name not in names]
    if len(kept) + len(planned) > MAX_MODELS:
        raise StickWriteError(f"a stick holds at most {MAX_MODELS} models")
    need = sum(size for _, _, size in planned) + SLACK_BYTES
    free = shutil.disk_usage(target).free
    if need > free:
        raise StickWriteError(f"not enough space on {target}: the models need {need} bytes, {free} are free; "
                              f"nothing was written")
    models_dir = target / MODELS_DIR
    models_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for s, quantization, size in planned:
        filename = s.name.replace(":", "-") + (".bundle" if looks_like_bundle(s.path) else ".gguf")  # FAT: no ':'
        dest = models_dir / filename
        digest = _copy_hashing(s.path, dest, (lambda done, n=s.name: on_progress(n, done)) if on_progress else None)
        if s.sha256 is not None and digest != s.sha256:
            dest.unlink(missing_ok=True)
            raise StickWriteError(f"{s.name}: the copy hashed to {digest}, the store says {s.sha256}; the store "
                                  f"copy may be damaged ('offgridd models verify {s.name}')")
        written.append(StickModel(name=s.name, file=f"{MODELS_DIR}/{filename}", sha256=digest, size=size,
                                  quantization=quantization, license=s.license, description=s.description))
    _fsync_dir(models_dir)
    _write_manifest(target, kept + written)
    return written


def _write_manifest(target: Path, models: list[StickModel]) -> None:
    doc = {"format": FORMAT_VERSION, "created_by": f"offgridd {__version__}",
           "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "models": [m.to_dict() for m in models]}
    path = target / MANIFEST
    tmp = path.with_name(path.name + ".partial")
    tmp.unlink(missing_ok=True)
    with open(tmp, "x") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def write_documents(target: Path, files: list[Path], collection: str | None = None,
                    on_progress: Callable[[str, int], None] | None = None) -> list[str]:
    """Copy documents onto a mounted stick: into documents/ for the collection "default", documents/<collection>/ for
    another; returns the paths written, relative to the stick. Checked before anything is written: the collection's
    name, each file a document this box reads, the names distinct, and the room."""
    target = Path(target)
    if not target.is_dir():
        raise StickWriteError(f"{target} is not a directory: mount the stick and give its mount point")
    if not files:
        raise StickWriteError("no documents given")
    try:
        collection = check_collection(collection)
    except InvalidDocument as e:
        raise StickWriteError(str(e)) from None
    names = [f.name for f in files]
    if dup := {n for n in names if names.count(n) > 1}:
        raise StickWriteError(f"the file name(s) {sorted(dup)} are given twice; a collection holds each name once")
    if len(files) > MAX_DOCUMENTS:
        raise StickWriteError(f"a stick carries at most {MAX_DOCUMENTS} documents")
    sizes = []
    for f in files:
        suffix = "." + f.name.rsplit(".", 1)[-1].lower() if "." in f.name else ""
        if suffix and suffix not in SUFFIXES:
            raise StickWriteError(f"{f}: a box reads documents named {READABLE}, not {suffix!r} files")
        if f.name.startswith(".") or not f.is_file():
            raise StickWriteError(f"{f} is not a document file (a regular file whose name does not start with '.')")
        sizes.append(f.stat().st_size)
    need, free = sum(sizes) + SLACK_BYTES, shutil.disk_usage(target).free
    if need > free:
        raise StickWriteError(f"not enough space on {target}: the documents need {need} bytes, {free} are free; "
                              f"nothing was written")
    folder = FOLDER if collection == DEFAULT_COLLECTION else f"{FOLDER}/{collection}"
    (target / folder).mkdir(parents=True, exist_ok=True)
    written = []
    for f in files:
        _copy_hashing(f, target / folder / f.name,
                      (lambda done, n=f.name: on_progress(n, done)) if on_progress else None)
        written.append(f"{folder}/{f.name}")
    _fsync_dir(target / folder)
    return written
