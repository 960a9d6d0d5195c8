"""The node's identity and fleet key in $STATE/node.json (0600); files there are never written through a symlink.

`fleet join` and `fleet rotate` run as root in a directory the daemon's user owns, so that user could plant a
symbolic link where root is about to write or read: every file here is opened with O_NOFOLLOW, new files with O_EXCL
under a random name, then renamed into place (a rename replaces a link, it never follows one).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import secrets
import socket
import stat
from dataclasses import dataclass, replace
from pathlib import Path

from .protocol import NODE_RE

log = logging.getLogger(__name__)

NODE_FILE = "node.json"
KEY_RE = re.compile(r"^[0-9a-f]{64}$")
MAX_STATE_FILE = 1 << 16


class FleetKeyError(ValueError):
    pass


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeIdentity:
    node_id: str
    name: str
    fleet_key: bytes

    @property
    def key_fingerprint(self) -> str:
        """Shown where the key itself must not be: equal fingerprints mean the same fleet."""
        return hashlib.sha256(b"fingerprint:" + self.fleet_key).hexdigest()[:12]


def parse_fleet_key(text: str) -> bytes:
    cleaned = re.sub(r"[\s:-]", "", text).lower()
    if not KEY_RE.fullmatch(cleaned):
        raise FleetKeyError("a fleet key is 64 hex digits, as 'offgridd fleet key' prints it on another box")
    return bytes.fromhex(cleaned)


def read_state_file(state: Path, name: str) -> str:
    """Blocking: a small file of the state directory, refused when it is a symbolic link; made private if it was not."""
    path = Path(state) / name
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise FleetKeyError(f"{path} is a symbolic link; offgridd does not follow it: remove it") from None
        raise
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise FleetKeyError(f"{path} is not a regular file; remove it")
        if st.st_mode & 0o077:
            log.warning("%s was readable by others; restricting it to its owner", path)
            os.fchmod(f.fileno(), 0o600)
        return f.read(MAX_STATE_FILE).decode()


def write_state_file(state: Path, name: str, text: str) -> None:
    """Blocking: replace a file of the state directory atomically, mode 0600, owned like the state directory."""
    state = Path(state)
    state.mkdir(parents=True, exist_ok=True)
    dir_fd = os.open(state, os.O_RDONLY | os.O_DIRECTORY)
    try:
        owner = os.fstat(dir_fd)  # a file written by root belongs to the daemon's user, who owns the directory
        tmp = f".{name}.{secrets.token_hex(8)}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=dir_fd)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
                if (owner.st_uid, owner.st_gid) != (os.geteuid(), os.getegid()):
                    os.fchown(f.fileno(), owner.st_uid, owner.st_gid)
            os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            try:
                os.unlink(tmp, dir_fd=dir_fd)
            except FileNotFoundError:
                pass
            raise
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_identity(state: Path) -> NodeIdentity:
    """Read node.json, creating it (new node id, new fleet key) on first start. Blocking."""
    path = Path(state) / NODE_FILE
    try:
        data = json.loads(read_state_file(state, NODE_FILE))
        identity = NodeIdentity(node_id=data["node_id"], name=data["name"],
                                fleet_key=parse_fleet_key(data["fleet_key"]))
        if not NODE_RE.fullmatch(identity.node_id):
            raise ValueError(f"bad node_id {identity.node_id!r}")
    except FileNotFoundError:
        identity = NodeIdentity(node_id=secrets.token_hex(16), name=(socket.gethostname() or "offgridd")[:64],
                                fleet_key=secrets.token_bytes(32))
        save_identity(state, identity)
        log.info("new node %s: generated a fleet key in %s", identity.node_id, path)
        return identity
    except FleetKeyError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise FleetKeyError(f"{path} is unreadable ({e}); fix it or remove it to start a new fleet") from None
    return identity


def save_identity(state: Path, identity: NodeIdentity) -> None:
    write_state_file(state, NODE_FILE, json.dumps(
        {"node_id": identity.node_id, "name": identity.name, "fleet_key": identity.fleet_key.hex()}, indent=2))


def identity_mark(state: Path) -> tuple[int, int, int] | None:
    """What changes when node.json is replaced: a daemon compares it before trusting its key (one stat call)."""
    try:
        st = os.stat(Path(state) / NODE_FILE, follow_symlinks=False)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def join_fleet(state: Path, key_text: str) -> NodeIdentity:
    identity = replace(load_identity(state), fleet_key=parse_fleet_key(key_text))
    save_identity(state, identity)
    return identity


def rotate_fleet_key(state: Path) -> NodeIdentity:
    """A new key for this box; the others join it. Only one key is ever accepted, so the old one dies with the file."""
    return join_fleet(state, secrets.token_bytes(32).hex())
