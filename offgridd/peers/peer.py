"""A peer as this node knows it: a fleet member that proved, at its address, that it holds the fleet key."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from ..documents.records import COLLECTION
from ..store import SHA256_RE, valid_name
from .exchange import endpoint
from .protocol import PeerAnnouncement

EXPIRE_AFTER = 3  # silent announcement intervals before a peer is forgotten


@dataclass(slots=True, kw_only=True, eq=False)
class Peer:
    node: str
    name: str
    address: str  # where it answered a challenge under the fleet key: never taken from a datagram alone
    http_port: int
    version: str
    inventory: str
    models_count: int
    load: int
    queue: int
    every: float
    boot: int  # its count of starts, as it proved it: calls to it are signed for this start
    seq: int  # the counter of its last announcement taken: anything not newer is a replay
    clock_offset: float = 0.0  # its clock minus ours, seconds: shown, never relied on
    first_seen: float = field(default_factory=time.time)
    last_seen: float = field(default_factory=time.monotonic)
    models: dict[str, dict] = field(default_factory=dict)  # name -> {"sha256", "size", ...} from its inventory
    collections: dict[str, int] = field(default_factory=dict)  # its documents' collections: name -> documents
    fetched: str = ""  # the inventory digest `models` matches

    @property
    def endpoint(self) -> str:
        return endpoint(self.address, self.http_port)

    @property
    def url(self) -> str:
        return f"http://{self.endpoint}"

    def expired(self, now: float) -> bool:
        return now - self.last_seen > EXPIRE_AFTER * self.every

    def heard(self, ann: PeerAnnouncement) -> None:
        """Take what a fresh announcement (or a hello answer) says about the node's state."""
        self.name, self.version, self.inventory, self.models_count = ann.name, ann.version, ann.inventory, ann.models
        self.load, self.queue, self.every, self.boot, self.seq = ann.load, ann.queue, ann.every, ann.boot, ann.seq
        self.clock_offset = ann.clock - time.time()
        self.last_seen = time.monotonic()

    def to_dict(self) -> dict:
        return {"node": self.node, "name": self.name, "address": self.address, "http_port": self.http_port,
                "url": self.url, "version": self.version, "models": sorted(self.models),
                "collections": [{"name": n, "documents": d} for n, d in sorted(self.collections.items())],
                "model_count": self.models_count, "load": self.load, "queue": self.queue,
                "clock_offset_s": round(self.clock_offset, 1), "boot": self.boot,
                "first_seen": self.first_seen, "last_seen_s": round(time.monotonic() - self.last_seen, 1)}

    @classmethod
    def proven(cls, ann: PeerAnnouncement, address: str, http_port: int) -> Peer:
        peer = cls(node=ann.node, name=ann.name, address=address, http_port=http_port, version=ann.version,
                   inventory=ann.inventory, models_count=ann.models, load=ann.load, queue=ann.queue, every=ann.every,
                   boot=ann.boot, seq=ann.seq)
        peer.heard(ann)
        return peer


def parse_static(entries: list[str]) -> list[tuple[str, int]]:
    out = []
    for entry in entries:
        host, sep, port = entry.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"peers.static entry {entry!r} is not 'host:port'")
        out.append((host.strip("[]"), int(port)))
    return out


def good_collection(c) -> bool:
    """A collection in an inventory this node may show and pull: a valid name and a document count."""
    return (isinstance(c, dict) and isinstance(c.get("name"), str) and bool(COLLECTION.fullmatch(c["name"]))
            and isinstance(c.get("documents"), int) and not isinstance(c["documents"], bool) and c["documents"] >= 0)


def good_entry(m) -> bool:
    """An inventory entry this node may act on: a valid name, a sha256, a positive size."""
    return (isinstance(m, dict) and isinstance(m.get("name"), str) and valid_name(m["name"])
            and isinstance(m.get("sha256"), str) and bool(SHA256_RE.fullmatch(m["sha256"]))
            and isinstance(m.get("size"), int) and not isinstance(m["size"], bool) and m["size"] > 0)
