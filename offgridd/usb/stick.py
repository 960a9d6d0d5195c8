"""The stick format: `OFFGRID/manifest.json` and the files it names, or bare `*.gguf` files with a `.sha256` beside.

Everything on a stick is hostile until checked: the manifest is size-bounded and validated field by field, paths must
stay on the stick, and files are opened component by component with O_NOFOLLOW, so a symlink is never followed.
"""

from __future__ import annotations

import json
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ..store import SHA256_RE, name_from_filename, valid_name

FORMAT_VERSION = 1
MANIFEST = "OFFGRID/manifest.json"
MAX_MANIFEST_BYTES = 1 << 20
MAX_MODELS = 256
MAX_PATH = 1024
MAX_TEXT = 4096  # license, description, quantization
MAX_CHECKSUM_FILE = 4096
_SHA256SUM_LINE = re.compile(r"^([0-9a-fA-F]{64})(?:\s+\*?(.+))?$")


class StickError(Exception):
    """The whole stick is refused; the message says why."""


class StickFileError(Exception):
    """One file on the stick cannot be used; the message says why."""


class NotOnStick(StickFileError):
    pass


@dataclass(frozen=True, slots=True, kw_only=True)
class StickModel:
    name: str
    file: str  # relative to the stick's root, "/"-separated
    sha256: str | None  # None only for a bare GGUF without checksum, imported when the owner allows it
    size: int | None = None
    quantization: str | None = None
    license: str | None = None
    description: str | None = None

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__ if getattr(self, k) is not None}


@dataclass(frozen=True, slots=True, kw_only=True)
class Refusal:
    file: str
    reason: str
    name: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class Stick:
    root: Path
    models: tuple[StickModel, ...]
    refused: tuple[Refusal, ...] = ()  # files seen on the stick that will not be imported, with the reason


def is_utf8(text: str) -> bool:
    """False for a str holding lone surrogates: a non-UTF-8 file name, or a JSON "\\udcff" escape. sqlite (the job
    record) and the event stream cannot carry one."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def shown_name(text: str) -> str:
    """A name as a person can be shown it, whatever bytes it came from."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace") if not is_utf8(text) else text


def safe_relative_path(value: object, where: str) -> str:
    """A manifest path that cannot leave the stick: relative, no `..`, no empty or odd components."""
    if not isinstance(value, str) or not value:
        raise StickError(f"{where}: must be a non-empty string")
    if not is_utf8(value):
        raise StickError(f"{where}: {shown_name(value)[:80]!r} is not valid UTF-8 (a lone surrogate escape)")
    if len(value) > MAX_PATH or "\0" in value or "\\" in value:
        raise StickError(f"{where}: {value[:80]!r} is not a plain relative path (no backslashes, NUL, at most "
                         f"{MAX_PATH} characters)")
    if value.startswith("/"):
        raise StickError(f"{where}: {value!r} is an absolute path; paths in the manifest are relative to the stick")
    parts = value.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise StickError(f"{where}: {value!r} has an empty, '.' or '..' component; paths must stay on the stick")
    return str(PurePosixPath(*parts))


def open_on_stick(root: Path, relative: str) -> int:
    """Open a regular file under `root` without following any symlink on the way; returns a file descriptor."""
    parts = relative.split("/")
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_NONBLOCK if last else os.O_DIRECTORY)
            try:
                nxt = os.open(part, flags, dir_fd=fd)
            except OSError as e:
                shown = "/".join(parts[: i + 1])
                if e.errno == 40 or (e.errno == 20 and _is_symlink(fd, part)):  # ELOOP / ENOTDIR on a link
                    raise StickFileError(f"{shown} is a symlink; symlinks on a stick are not followed") from None
                if e.errno == 2:
                    raise NotOnStick(f"{shown} is not on the stick") from None
                raise StickFileError(f"{shown} cannot be opened: {e.strerror}") from None
            os.close(fd)
            fd = nxt
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise StickFileError(f"{relative} is not a regular file")
        os.set_blocking(fd, True)
        result, fd = fd, -1
        return result
    finally:
        if fd >= 0:
            os.close(fd)


def _is_symlink(dir_fd: int, name: str) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def _read_bounded(root: Path, relative: str, limit: int) -> bytes:
    fd = open_on_stick(root, relative)
    with os.fdopen(fd, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size > limit:
            raise StickError(f"{relative} is {size} bytes, over the {limit}-byte limit")
        data = f.read(limit + 1)
    if len(data) > limit:
        raise StickError(f"{relative} is over the {limit}-byte limit")
    return data


def _text(entry: dict, key: str, where: str, *, required: bool) -> str | None:
    value = entry.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value.strip() or len(value) > MAX_TEXT:
        raise StickError(f"{where}.{key}: must be a non-empty string of at most {MAX_TEXT} characters")
    if not is_utf8(value):
        raise StickError(f"{where}.{key}: is not valid UTF-8 (a lone surrogate escape)")
    return value


def parse_manifest(data: bytes) -> list[StickModel]:
    """Validate a manifest's bytes against the format (usb/manifest.schema.json); raise StickError naming the field."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise StickError(f"{MANIFEST} is {len(data)} bytes, over the {MAX_MANIFEST_BYTES}-byte limit")
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise StickError(f"{MANIFEST} is not valid JSON: {e}") from None
    except RecursionError:  # "[[[[..." within the size bound: deeper than any manifest, and than Python's stack
        raise StickError(f"{MANIFEST} is nested too deeply to be a manifest") from None
    if not isinstance(doc, dict):
        raise StickError(f"{MANIFEST}: the top level must be an object")
    if doc.get("format") != FORMAT_VERSION or isinstance(doc.get("format"), bool):
        raise StickError(f"{MANIFEST}: format {doc.get('format')!r} is not supported (this offgridd reads format "
                         f"{FORMAT_VERSION})")
    unknown = set(doc) - {"format", "models", "created_by", "created"}
    if unknown:
        raise StickError(f"{MANIFEST}: unknown top-level keys {sorted(unknown)}")
    entries = doc.get("models")
    if not isinstance(entries, list) or not 1 <= len(entries) <= MAX_MODELS:
        raise StickError(f"{MANIFEST}: 'models' must be a list of 1 to {MAX_MODELS} entries")
    models: list[StickModel] = []
    seen: dict[str, int] = {}
    allowed = {"name", "file", "sha256", "size", "quantization", "license", "description"}
    for i, entry in enumerate(entries):
        where = f"models[{i}]"
        if not isinstance(entry, dict):
            raise StickError(f"{MANIFEST}: {where} must be an object")
        if extra := set(entry) - allowed:
            raise StickError(f"{MANIFEST}: {where} has unknown keys {sorted(extra)}")
        name = entry.get("name")
        if not isinstance(name, str) or not valid_name(name):
            raise StickError(f"{MANIFEST}: {where}.name {name!r} is not a valid model name (letters, digits, "
                             f". _ : -, at most 128)")
        if name in seen:
            raise StickError(f"{MANIFEST}: duplicate model name {name!r} (models[{seen[name]}] and {where})")
        seen[name] = i
        sha = entry.get("sha256")
        if not isinstance(sha, str) or not SHA256_RE.fullmatch(sha.lower()):
            raise StickError(f"{MANIFEST}: {where}.sha256 must be 64 hex digits")
        size = entry.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or not 0 < size < 1 << 50:
            raise StickError(f"{MANIFEST}: {where}.size must be a positive integer (bytes)")
        try:
            file = safe_relative_path(entry.get("file"), f"{where}.file")
        except StickError as e:
            raise StickError(f"{MANIFEST}: {e}") from None
        models.append(StickModel(
            name=name, file=file, sha256=sha.lower(), size=size,
            quantization=_text(entry, "quantization", where, required=True),
            license=_text(entry, "license", where, required=True),
            description=_text(entry, "description", where, required=False),
        ))
    return models


def parse_sha256sum(data: bytes, filename: str) -> str:
    """The digest for `filename` from a sha256sum-format file (one line, `HEX  NAME` or just `HEX`)."""
    try:
        lines = [ln.strip() for ln in data.decode().splitlines() if ln.strip()]
    except UnicodeDecodeError:
        raise StickFileError(f"{filename}.sha256 is not text") from None
    for line in lines:
        m = _SHA256SUM_LINE.match(line)
        if m and (m.group(2) is None or m.group(2).rsplit("/", 1)[-1] == filename):
            return m.group(1).lower()
    raise StickFileError(f"{filename}.sha256 has no sha256sum line for {filename!r}")


def read_stick(root: Path, *, allow_unverified: bool = False) -> Stick:
    """What a mounted stick offers: manifest models, then bare GGUFs at its top level. Blocks (file reads)."""
    root = Path(root)
    if not root.is_dir():
        raise StickError(f"{root} is not a directory")
    models: list[StickModel] = []
    refused: list[Refusal] = []
    try:
        manifest = _read_bounded(root, MANIFEST, MAX_MANIFEST_BYTES)
    except NotOnStick:
        manifest = None
    except StickFileError as e:
        raise StickError(str(e)) from None
    if manifest is not None:
        models = parse_manifest(manifest)
    listed = {m.file for m in models}
    names = {m.name for m in models}
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError as e:
        raise StickError(f"{root} cannot be listed: {e.strerror}") from None
    for entry in entries:
        if not entry.name.lower().endswith(".gguf") or entry.name in listed:
            continue
        if not is_utf8(entry.name):
            refused.append(Refusal(file=shown_name(entry.name), reason=(
                f"{shown_name(entry.name)!r}: the file name is not UTF-8; rename it (on the PC that wrote the stick)")))
            continue
        name = name_from_filename(entry.name)
        if entry.is_symlink():
            refused.append(Refusal(file=entry.name, name=name,
                                   reason=f"{entry.name} is a symlink; symlinks on a stick are not followed"))
            continue
        if name in names:
            refused.append(Refusal(file=entry.name, name=name,
                                   reason=f"{entry.name}: the name {name!r} is already used on this stick"))
            continue
        try:
            digest = parse_sha256sum(_read_bounded(root, entry.name + ".sha256", MAX_CHECKSUM_FILE), entry.name)
        except NotOnStick:
            if not allow_unverified:
                refused.append(Refusal(file=entry.name, name=name, reason=(
                    f"{entry.name} has no checksum: put {entry.name}.sha256 (sha256sum format) beside it or list it "
                    f"in {MANIFEST}; unverified imports are off (usb.allow_unverified)")))
                continue
            digest = None
        except (StickError, StickFileError) as e:
            refused.append(Refusal(file=entry.name, name=name, reason=str(e)))
            continue
        names.add(name)
        models.append(StickModel(name=name, file=entry.name, sha256=digest))
    return Stick(root=root, models=tuple(models), refused=tuple(refused))
