"""The node's identity and fleet key in $STATE/node.json (0600), and the signature peers put on HTTP calls."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import socket
import time
from dataclasses import dataclass, replace
from pathlib import Path

from .protocol import MAX_SKEW_S, NODE_RE, ReplayGuard

log = logging.getLogger(__name__)

NODE_FILE = "node.json"
KEY_RE = re.compile(r"^[0-9a-f]{64}$")
FLEET_HEADER = "X-Offgrid-Fleet"
HTTP_DOMAIN = "offgridd fleet http v1"


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


def load_identity(state: Path) -> NodeIdentity:
    """Read node.json, creating it (new node id, new fleet key) on first start. Blocking."""
    path = Path(state) / NODE_FILE
    try:
        data = json.loads(path.read_text())
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
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise FleetKeyError(f"{path} is unreadable ({e}); fix it or remove it to start a new fleet") from None
    if path.stat().st_mode & 0o077:
        log.warning("%s was readable by others; restricting it to its owner", path)
        os.chmod(path, 0o600)
    return identity


def save_identity(state: Path, identity: NodeIdentity) -> None:
    """Write node.json atomically with mode 0600, keeping the owner of an existing file (the daemon's user)."""
    path = Path(state) / NODE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    st = path.stat() if path.exists() else path.parent.stat()  # a new file belongs to the state dir's owner
    owner = (st.st_uid, st.st_gid)
    tmp = path.with_name(f".{NODE_FILE}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({"node_id": identity.node_id, "name": identity.name, "fleet_key": identity.fleet_key.hex()},
                      f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        with contextlib.suppress(PermissionError):
            os.chown(tmp, *owner)
        os.rename(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def join_fleet(state: Path, key_text: str) -> NodeIdentity:
    identity = replace(load_identity(state), fleet_key=parse_fleet_key(key_text))
    save_identity(state, identity)
    return identity


def _http_mac(key: bytes, node: str, ts: str, nonce: str, method: str, path: str) -> str:
    message = "\n".join((HTTP_DOMAIN, node, ts, nonce, method.upper(), path)).encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def sign_request(identity: NodeIdentity, method: str, path: str) -> dict[str, str]:
    """The header that proves a call to a peer comes from a member of the fleet."""
    ts, nonce = f"{time.time():.3f}", secrets.token_hex(12)
    mac = _http_mac(identity.fleet_key, identity.node_id, ts, nonce, method, path)
    return {FLEET_HEADER: f"{identity.node_id} {ts} {nonce} {mac}"}


def verify_request(key: bytes, header: str, method: str, path: str, guard: ReplayGuard) -> str:
    """The calling node's id, or FleetKeyError saying why the call is refused."""
    parts = header.split(" ")
    if len(parts) != 4 or not NODE_RE.fullmatch(parts[0]) or not re.fullmatch(r"[0-9a-f]{24}", parts[2]):
        raise FleetKeyError(f"missing or malformed {FLEET_HEADER} header")
    node, ts, nonce, mac = parts
    try:
        when = float(ts)
    except ValueError:
        raise FleetKeyError("bad timestamp") from None
    if not hmac.compare_digest(mac.encode(), _http_mac(key, node, ts, nonce, method, path).encode()):
        raise FleetKeyError("signature does not match this fleet's key")
    if not abs(time.time() - when) <= MAX_SKEW_S:
        raise FleetKeyError("signature is too old or from a clock that disagrees with this node's")
    if not guard.fresh(bytes.fromhex(nonce)):
        raise FleetKeyError("signature was already used")
    return node
