"""The content-addressed model store: blobs named by digest, manifests by name, one verified way in.

A model is of a kind: "llm" (one GGUF, the default for manifests written before kinds existed), "stt" or "tts" (a
speech model whose engine needs several files, held as one bundle blob: `bundle.py`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .bundle import BundleError, BundleInfo, looks_like_bundle, read_bundle_info
from .gguf import GgufError, read_gguf_info

log = logging.getLogger(__name__)

CHUNK = 4 << 20
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
KINDS = ("llm", "stt", "tts")
ORPHAN_AGE_S = 60  # a blob younger than this may belong to an import that is writing its manifest right now


class StoreError(Exception):
    """An import or lookup failed; the message is the reason a person can act on."""


class UnknownModel(StoreError):
    pass


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelManifest:
    name: str
    sha256: str
    size: int
    architecture: str
    quantization: str
    context_length: int
    has_chat_template: bool
    hyperparameters: dict[str, int] = field(default_factory=dict)
    source: str = ""
    license: str | None = None
    added: float = 0.0
    kind: str = "llm"  # llm | stt | tts
    engine: str = "llama.cpp"  # what runs it: llama.cpp, faster-whisper, piper
    language: str | None = None  # a speech model's language, where it has one

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelManifest:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


def valid_name(name: str) -> bool:
    return bool(NAME_RE.fullmatch(name))


def name_from_filename(filename: str) -> str:
    stem = filename.rsplit("/", 1)[-1].removesuffix(".gguf").lower()
    name = re.sub(r"[^a-z0-9._:-]+", "-", stem).strip("-._:")[:128]
    return name or "model"


def file_chunks(path: Path, on_chunk: Callable[[int], None] | None = None) -> Iterator[bytes]:
    """Read a file in store-sized chunks."""
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            if on_chunk:
                on_chunk(len(block))
            yield block


def write_hashing(path: Path, chunks: Iterable[bytes], *, mode: str = "xb", digest=None, done: int = 0,
                  on_progress: Callable[[int], None] | None = None) -> tuple[str, int]:
    """Write chunks to `path` while hashing them, in one pass, then fsync; returns (sha256 hex, bytes in total).

    `digest` and `done` carry on from bytes already in the file (a resumed download appends with mode "ab").
    """
    digest = digest or hashlib.sha256()
    with open(path, mode) as out:
        for block in chunks:
            digest.update(block)
            out.write(block)
            done += len(block)
            if on_progress:
                on_progress(done)
        out.flush()
        os.fsync(out.fileno())
    return digest.hexdigest(), done


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    for block in file_chunks(path):
        digest.update(block)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _describe(staged: Path, kind: str | None):
    """What a staged file is, checked for `kind`: GgufInfo for an LLM, BundleInfo for a speech model."""
    if kind in (None, "llm") and (kind == "llm" or not looks_like_bundle(staged)):
        try:
            return read_gguf_info(staged)
        except GgufError as e:
            raise StoreError(f"not a usable GGUF model: {e}") from None
    try:
        info = read_bundle_info(staged)
    except BundleError as e:
        raise StoreError(f"not a usable speech model bundle: {e}") from None
    if kind is not None and info.kind != kind:
        raise StoreError(f"the bundle holds a {info.kind} model ({info.engine}), not a {kind} model")
    return info


class ModelStore:
    """`$STATE/models`: blobs/sha256-<hex>, manifests/<name>.json, .staging/ for partial files.

    All methods block (hashing, fsync); the daemon calls them from an executor.
    """

    def __init__(self, root: Path):
        self.root = Path(root)
        self.blobs = self.root / "blobs"
        self.manifests = self.root / "manifests"
        self.staging = self.root / ".staging"

    def open(self, collect_garbage: bool = False) -> None:
        """Create the layout; at daemon start also empty .staging and drop blobs no manifest names."""
        for d in (self.blobs, self.manifests, self.staging):
            d.mkdir(parents=True, exist_ok=True)
        if not collect_garbage:
            return
        for leftover in self.staging.iterdir():
            log.info("removing partial file from an interrupted import: %s", leftover.name)
            if leftover.is_dir():
                shutil.rmtree(leftover)
            else:
                leftover.unlink(missing_ok=True)
        named = {m.sha256 for m in self.list()}
        for blob in self.blobs.glob("sha256-*"):
            if blob.name.removeprefix("sha256-") not in named and time.time() - blob.stat().st_mtime > ORPHAN_AGE_S:
                log.info("removing blob that no manifest names: %s", blob.name)
                blob.unlink(missing_ok=True)

    def blob_path(self, sha256: str) -> Path:
        return self.blobs / f"sha256-{sha256}"

    def path_of(self, manifest: ModelManifest) -> Path:
        return self.blob_path(manifest.sha256)

    def list(self, kind: str | None = None) -> list[ModelManifest]:
        """Every model, or those of one kind."""
        out = []
        for p in sorted(self.manifests.glob("*.json")):
            try:
                manifest = ModelManifest.from_dict(json.loads(p.read_text()))
            except (OSError, ValueError, TypeError) as e:
                log.warning("skipping unreadable manifest %s: %s", p.name, e)
                continue
            if kind is None or manifest.kind == kind:
                out.append(manifest)
        return out

    def get(self, name: str) -> ModelManifest:
        if not valid_name(name):
            raise UnknownModel(f"model {name!r} does not exist")
        try:
            return ModelManifest.from_dict(json.loads((self.manifests / f"{name}.json").read_text()))
        except FileNotFoundError:
            raise UnknownModel(f"model {name!r} does not exist") from None

    def find(self, name: str) -> ModelManifest | None:
        try:
            return self.get(name)
        except UnknownModel:
            return None

    def import_file(self, path: Path, **kwargs) -> ModelManifest:
        path = Path(path)
        kwargs.setdefault("name", name_from_filename(path.name))
        kwargs.setdefault("source", f"file:{path}")
        if path.is_file():
            kwargs.setdefault("expected_size", path.stat().st_size)
        return self.import_chunks(file_chunks(path), **kwargs)

    def import_chunks(
        self,
        chunks: Iterable[bytes],
        *,
        name: str,
        source: str,
        expected_sha256: str | None = None,
        expected_size: int | None = None,
        license: str | None = None,
        on_progress: Callable[[int], None] | None = None,
        partial: Path | None = None,
        kind: str | None = None,
    ) -> ModelManifest:
        """Stream bytes into .staging while hashing, verify, then commit blob and manifest atomically.

        `partial` makes the import resumable (peer pulls): the bytes go to that file (on the store's filesystem,
        outside .staging, which start-up empties) after what it already holds, and it is kept when `chunks` breaks
        off; a later call with the rest resumes it. It is deleted once the import is committed or refused.

        `kind` None takes what the bytes are (a GGUF, or a speech bundle, which says its kind); "llm" accepts only a
        GGUF, "stt"/"tts" only a bundle of that kind. Sticks and peers pass none, so they carry every kind alike.
        """
        if kind is not None and kind not in KINDS:
            raise StoreError(f"unknown model kind {kind!r}: one of {', '.join(KINDS)}")
        if not valid_name(name):
            raise StoreError(f"invalid model name {name!r}: use letters, digits and . _ : - (at most 128)")
        if expected_sha256 is not None:
            expected_sha256 = expected_sha256.lower()
            if not SHA256_RE.fullmatch(expected_sha256):
                raise StoreError(f"invalid sha256 {expected_sha256!r}: expected 64 hex digits")
        self.open()
        if expected_size is not None:
            # a resumed import needs room only for what the partial file lacks: committing it is a rename
            have = partial.stat().st_size if partial is not None and partial.exists() else 0
            free = shutil.disk_usage(self.staging).free
            if expected_size - have > free:
                raise StoreError(f"not enough space: the model needs {expected_size - have} more bytes, "
                                 f"{free} are free")
        staged = partial or self.staging / f"{uuid.uuid4().hex}.partial"
        written = False
        try:
            digest, size = self._write_staged(staged, chunks, on_progress, resume=partial is not None)
            written = True
            if expected_size is not None and size != expected_size:
                raise StoreError(f"size mismatch: expected {expected_size} bytes, got {size}")
            if expected_sha256 is not None and digest != expected_sha256:
                raise StoreError(f"sha256 mismatch: expected {expected_sha256}, got {digest}")
            described = _describe(staged, kind)
            with self._committing():  # the name's check, the blob and the manifest, as one step
                existing = self.find(name)
                if existing and existing.sha256 != digest:
                    raise StoreError(f"name {name!r} is already used by another model (sha256 {existing.sha256[:12]}…)")
                if isinstance(described, BundleInfo):
                    manifest = ModelManifest(
                        name=name, sha256=digest, size=size, architecture=described.architecture,
                        quantization=described.quantization, context_length=0, has_chat_template=False,
                        source=source, license=license or described.license,
                        added=existing.added if existing else time.time(), kind=described.kind,
                        engine=described.engine, language=described.language,
                    )
                else:
                    manifest = ModelManifest(
                        name=name, sha256=digest, size=size, architecture=described.architecture,
                        quantization=described.quantization, context_length=described.context_length,
                        has_chat_template=described.has_chat_template, hyperparameters=described.hyperparameters,
                        source=source, license=license, added=existing.added if existing else time.time(),
                    )
                self._commit_blob(staged, digest)
                self._write_manifest(manifest)
                return manifest
        finally:
            if partial is None or written:
                staged.unlink(missing_ok=True)

    def _write_staged(self, staged: Path, chunks: Iterable[bytes], on_progress,
                      resume: bool = False) -> tuple[str, int]:
        digest, size = hashlib.sha256(), 0
        if resume and staged.exists():  # hash what an interrupted import already wrote, then append the rest
            for block in file_chunks(staged):
                digest.update(block)
                size += len(block)
        return write_hashing(staged, chunks, mode="ab" if resume else "xb", digest=digest, done=size,
                             on_progress=on_progress)

    @contextlib.contextmanager
    def _committing(self) -> Iterator[None]:
        """One commit (or removal) at a time, across threads and processes (the daemon, a stick, a peer pull,
        `offgridd models import`): two imports of one name with different bytes cannot both find it free."""
        with open(self.root / ".commit.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _commit_blob(self, staged: Path, digest: str) -> None:
        blob = self.blob_path(digest)
        if blob.exists():
            return  # same bytes already stored: the staged copy is dropped by the caller
        os.chmod(staged, 0o444)
        os.rename(staged, blob)
        _fsync_dir(self.blobs)

    def _write_manifest(self, manifest: ModelManifest) -> None:
        tmp = self.staging / f"{uuid.uuid4().hex}.manifest"
        try:
            with open(tmp, "x") as f:
                json.dump(manifest.to_dict(), f, indent=2, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.rename(tmp, self.manifests / f"{manifest.name}.json")
            _fsync_dir(self.manifests)
        finally:
            tmp.unlink(missing_ok=True)

    def remove(self, name: str) -> ModelManifest:
        """Drop a model's manifest, and its blob when no other manifest shares it."""
        with self._committing():  # not while an import of the same bytes is taking the blob for its manifest
            manifest = self.get(name)
            (self.manifests / f"{name}.json").unlink()
            _fsync_dir(self.manifests)
            if not any(m.sha256 == manifest.sha256 for m in self.list()):
                self.blob_path(manifest.sha256).unlink(missing_ok=True)
        return manifest

    def verify(self, name: str) -> tuple[bool, str]:
        """Rehash a model's blob; returns (matches, actual digest or the reason it could not be read)."""
        manifest = self.get(name)
        try:
            actual = sha256_file(self.path_of(manifest))
        except OSError as e:
            return False, f"unreadable: {e.strerror}"
        return actual == manifest.sha256, actual
