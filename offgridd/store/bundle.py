"""The speech-model bundle: one blob holding a model that needs several files, so it is stored, verified, carried
on sticks and pulled from peers exactly like a GGUF (one name, one size, one SHA256).

Format (version 1): a POSIX ustar archive, written deterministically (sorted order, mtime 0, uid/gid 0, mode 0444) so
the same files give the same digest on every box. Its first member is `offgrid-bundle.json`:

    {"format": 1, "kind": "stt" | "tts", "engine": "faster-whisper" | "piper", "architecture": str,
     "quantization": str, "language": str | null, "license": str | null}

then the engine's files under fixed plain names (`ENGINE_FILES`). Everything in a bundle is hostile until checked: at
most `MAX_MEMBERS` regular files with plain names, no links, directories or extended headers, each inside the blob,
the metadata at most `MAX_META_BYTES` and validated field by field. Loaders read a member's bytes at the offset this
module found, never by extracting names to disk.
"""

from __future__ import annotations

import json
import re
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

FORMAT_VERSION = 1
META = "offgrid-bundle.json"
MAX_MEMBERS = 16
MAX_META_BYTES = 64 << 10
BLOCK = 512
_MEMBER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_WORD = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+ -]{0,63}$")
KINDS = ("stt", "tts")
# the files each engine needs (required, optional)
ENGINE_FILES = {
    "faster-whisper": ({"model.bin", "config.json", "tokenizer.json"},
                       {"vocabulary.txt", "vocabulary.json", "preprocessor_config.json"}),
    "piper": ({"voice.onnx", "voice.onnx.json"}, {"MODEL_CARD"}),
}
ENGINE_KIND = {"faster-whisper": "stt", "piper": "tts"}


class BundleError(Exception):
    """Not a usable bundle; the message says which part is wrong."""


@dataclass(frozen=True, slots=True, kw_only=True)
class BundleInfo:
    kind: str
    engine: str
    architecture: str
    quantization: str
    language: str | None = None
    license: str | None = None
    members: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (offset of its data, size)


def looks_like_bundle(path: Path) -> bool:
    """A ustar header whose first member is the bundle's metadata: cheap, and false for a GGUF."""
    try:
        with open(path, "rb") as f:
            head = f.read(BLOCK)
    except OSError:
        return False
    return len(head) == BLOCK and head[257:263] == b"ustar\0" and head[:len(META) + 1] == META.encode() + b"\0"


def _header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = size, 0, 0o444, 0, 0, "", ""
    return info.tobuf(format=tarfile.USTAR_FORMAT)


def _pad(size: int) -> bytes:
    return b"\0" * (-size % BLOCK)


def bundle_chunks(meta: dict, files: dict[str, Path], chunk: int = 4 << 20) -> Iterator[bytes]:
    """Stream a bundle of `files` (bundle name -> path) with `meta`, without writing it anywhere first."""
    body = json.dumps({"format": FORMAT_VERSION, **meta}, sort_keys=True, separators=(",", ":")).encode()
    yield _header(META, len(body)) + body + _pad(len(body))
    for name in sorted(files):
        path = files[name]
        size = path.stat().st_size
        yield _header(name, size)
        done = 0
        with open(path, "rb") as f:
            while block := f.read(chunk):
                done += len(block)
                yield block
        if done != size:
            raise BundleError(f"{path} changed size while it was being read")
        yield _pad(size)
    yield b"\0" * (2 * BLOCK)


def bundle_size(files: Iterable[Path], meta: dict) -> int:
    body = json.dumps({"format": FORMAT_VERSION, **meta}, sort_keys=True, separators=(",", ":")).encode()
    total = BLOCK + len(body) + len(_pad(len(body))) + 2 * BLOCK
    for path in files:
        size = path.stat().st_size
        total += BLOCK + size + len(_pad(size))
    return total


def _text(meta: dict, key: str, *, required: bool) -> str | None:
    value = meta.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not _WORD.fullmatch(value):
        raise BundleError(f"{META}: {key!r} must be a short plain string, got {str(value)[:80]!r}")
    return value


def read_bundle_info(path: Path) -> BundleInfo:
    """Check a bundle's structure and metadata; raise BundleError naming what is wrong. Blocks (reads headers)."""
    path = Path(path)
    try:
        total = path.stat().st_size
        with tarfile.open(path, "r:", format=tarfile.USTAR_FORMAT) as tar:
            members: dict[str, tuple[int, int]] = {}
            meta_bytes = None
            for i in range(MAX_MEMBERS + 1):
                member = tar.next()
                if member is None:
                    break
                if i == MAX_MEMBERS:
                    raise BundleError(f"more than {MAX_MEMBERS} files in the bundle")
                if member.pax_headers or not member.isreg():
                    raise BundleError(f"{member.name[:80]!r} is not a plain file (links, directories and extended "
                                      "headers are refused)")
                if not _MEMBER_NAME.fullmatch(member.name):
                    raise BundleError(f"member name {member.name[:80]!r} is not a plain file name")
                if member.name in members:
                    raise BundleError(f"{member.name!r} is in the bundle twice")
                if i == 0 and member.name != META:
                    raise BundleError(f"the first file must be {META}, not {member.name!r}")
                if member.offset_data + member.size > total:
                    raise BundleError(f"{member.name!r} runs past the end of the file (truncated?)")
                members[member.name] = (member.offset_data, member.size)
                if member.name == META:
                    if member.size > MAX_META_BYTES:
                        raise BundleError(f"{META} is {member.size} bytes, over the {MAX_META_BYTES}-byte limit")
                    meta_bytes = tar.extractfile(member).read()
    except BundleError:
        raise
    except (tarfile.TarError, OSError, EOFError, ValueError, UnicodeError) as e:
        raise BundleError(f"not a readable bundle: {e}") from None
    if meta_bytes is None:
        raise BundleError(f"no {META} in the bundle")
    try:
        meta = json.loads(meta_bytes)
    except (ValueError, UnicodeDecodeError) as e:
        raise BundleError(f"{META} is not valid JSON: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION or isinstance(meta.get("format"), bool):
        raise BundleError(f"{META}: format {meta.get('format') if isinstance(meta, dict) else None!r} is not "
                          f"supported (this offgridd reads format {FORMAT_VERSION})")
    engine = meta.get("engine")
    if engine not in ENGINE_FILES:
        raise BundleError(f"{META}: engine {str(engine)[:40]!r} is not one of {sorted(ENGINE_FILES)}")
    kind = meta.get("kind")
    if kind != ENGINE_KIND[engine]:
        raise BundleError(f"{META}: kind {str(kind)[:20]!r} does not match engine {engine} "
                          f"({ENGINE_KIND[engine]})")
    required, optional = ENGINE_FILES[engine]
    files = set(members) - {META}
    if missing := required - files:
        raise BundleError(f"the {engine} bundle lacks {sorted(missing)}")
    if extra := files - required - optional:
        raise BundleError(f"the {engine} bundle has files it does not use: {sorted(extra)}")
    return BundleInfo(kind=kind, engine=engine, architecture=_text(meta, "architecture", required=True),
                      quantization=_text(meta, "quantization", required=True),
                      language=_text(meta, "language", required=False),
                      license=_text(meta, "license", required=False), members=members)


def read_member(path: Path, info: BundleInfo, name: str) -> bytes:
    """One member's bytes, read at the offset `read_bundle_info` checked."""
    offset, size = info.members[name]
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(size)
    if len(data) != size:
        raise BundleError(f"{name!r} is truncated: {len(data)} of {size} bytes")
    return data
