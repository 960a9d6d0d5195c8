"""The peer announcement datagram (docs/peers.md): msgpack, at most 1,400 bytes, HMAC-SHA256 under the fleet key.

An announcement is a hint, never a proof: it carries the sender's start count (`boot`) and a counter (`seq`) so a
receiver that has already proved the sender (exchange.py) refuses replays, and otherwise it only prompts a challenge.
No field depends on the receiver's clock agreeing with the sender's; `clock` is shown, not checked.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable
from dataclasses import dataclass

import msgpack

PROTOCOL_VERSION = 2
MAX_DATAGRAM = 1400
MAC_BYTES = 32
MAX_COUNT = (1 << 63) - 1
DOMAIN = b"offgridd peer announcement v2\n"  # a MAC for a datagram can never be mistaken for an HTTP signature
# unproven: the node at the datagram's source address could not answer a challenge under the fleet key
DROP_REASONS = ("oversized", "malformed", "version", "hmac", "replay", "unproven")

NODE_RE = re.compile(r"^[0-9a-f]{32}$")
INVENTORY_RE = re.compile(r"^[0-9a-f]{16}$")


class DatagramRejected(Exception):
    """A datagram that is not an authentic announcement; `reason` is one of DROP_REASONS."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerAnnouncement:
    node: str  # 32 hex digits, from node.json
    name: str  # a person's name for the box (its hostname)
    http_port: int
    version: str  # offgridd's version
    inventory: str  # inventory_digest() of the node's models
    models: int
    load: int  # inference requests in progress
    queue: int  # requests waiting for a worker
    every: float  # seconds between announcements: receivers expire the node after a few silent ones
    boot: int  # how many times the sender has started (persisted): a replay from an earlier start is older
    seq: int  # counts the sender's datagrams within this start
    clock: float  # the sender's wall clock, for people to see how far apart the boxes' clocks are

    def body(self) -> dict:
        return {"node": self.node, "name": self.name, "port": self.http_port, "ver": self.version,
                "inv": self.inventory, "models": self.models, "load": self.load, "queue": self.queue,
                "every": self.every, "boot": self.boot, "seq": self.seq, "clock": self.clock}

    def encode(self, key: bytes) -> bytes:
        body = msgpack.packb(self.body())
        datagram = msgpack.packb([PROTOCOL_VERSION, body, _mac(key, body)])
        if len(datagram) > MAX_DATAGRAM:
            raise ValueError(f"announcement is {len(datagram)} bytes, over {MAX_DATAGRAM}")
        return datagram


def inventory_digest(models: Iterable[tuple[str, str]]) -> str:
    """16 hex digits that change whenever a (name, sha256) pair is added, removed or changed."""
    lines = "\n".join(sorted(f"{name} {sha}" for name, sha in models))
    return hashlib.sha256(lines.encode()).hexdigest()[:16]


def _mac(key: bytes, body: bytes) -> bytes:
    return hmac.new(key, DOMAIN + body, hashlib.sha256).digest()


def _field(body: dict, key: str, kind: type, check=lambda v: True):
    value = body.get(key)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool) or not check(value):
        raise DatagramRejected("malformed", f"field {key!r} is missing or out of range")
    return value


def announcement_from(body: dict) -> PeerAnnouncement:
    """The announcement a body map describes (a datagram's, or a hello answer's), or DatagramRejected("malformed")."""
    if not isinstance(body, dict):
        raise DatagramRejected("malformed", "body is not a map")
    return PeerAnnouncement(
        node=_field(body, "node", str, NODE_RE.fullmatch),
        name=_field(body, "name", str, lambda v: 0 < len(v) <= 64 and v.isprintable()),
        http_port=_field(body, "port", int, lambda v: 1 <= v <= 65535),
        version=_field(body, "ver", str, lambda v: len(v) <= 32 and v.isprintable()),
        inventory=_field(body, "inv", str, INVENTORY_RE.fullmatch),
        models=_field(body, "models", int, lambda v: 0 <= v <= 1 << 20),
        load=_field(body, "load", int, lambda v: 0 <= v <= 1 << 20),
        queue=_field(body, "queue", int, lambda v: 0 <= v <= 1 << 20),
        every=_field(body, "every", float, lambda v: 0.1 <= v <= 3600),
        boot=_field(body, "boot", int, lambda v: 0 < v <= MAX_COUNT),
        seq=_field(body, "seq", int, lambda v: 0 <= v <= MAX_COUNT),
        clock=_field(body, "clock", float, lambda v: abs(v) < 1e12),  # not NaN, not infinite
    )


def read_announcement(data: bytes, key: bytes) -> PeerAnnouncement:
    """Parse and authenticate one datagram, or raise DatagramRejected naming why it is dropped.

    Whether it is fresh is the listener's business: it compares (boot, seq) with what the sender last proved.
    """
    if len(data) > MAX_DATAGRAM:
        raise DatagramRejected("oversized", f"{len(data)} bytes")
    try:
        outer = msgpack.unpackb(data, raw=False, max_bin_len=MAX_DATAGRAM, max_str_len=MAX_DATAGRAM,
                                max_array_len=8, max_map_len=16, max_ext_len=0)
    except Exception as e:  # msgpack raises several types for hostile input; every one means "malformed"
        raise DatagramRejected("malformed", type(e).__name__) from None
    if not isinstance(outer, list) or not outer or not isinstance(outer[0], int) or isinstance(outer[0], bool):
        raise DatagramRejected("malformed", "not an offgridd announcement")
    if outer[0] != PROTOCOL_VERSION:
        raise DatagramRejected("version", f"protocol version {outer[0]}")
    if len(outer) != 3 or not isinstance(outer[1], bytes) or not isinstance(outer[2], bytes):
        raise DatagramRejected("malformed", "expected [version, body, mac]")
    body_bytes, mac = outer[1], outer[2]
    if len(mac) != MAC_BYTES or not hmac.compare_digest(mac, _mac(key, body_bytes)):
        raise DatagramRejected("hmac")
    try:
        body = msgpack.unpackb(body_bytes, raw=False, max_bin_len=64, max_str_len=256, max_array_len=0,
                               max_map_len=16, max_ext_len=0)
    except Exception as e:
        raise DatagramRejected("malformed", f"body: {type(e).__name__}") from None
    return announcement_from(body)
