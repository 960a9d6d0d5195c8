"""HTTP between fleet members (docs/peers.md): a request is signed and counted, an answer is bound to its request.

A request carries `X-Offgrid-Fleet: v2 <from node> <from boot> <seq> <to node> <to boot> <nonce> <mac>`: the receiver
takes it only if it is addressed to this start of this node (`to boot`, so nothing signed before a restart is good
after it) and its counter is new (SeqWindow). An answer carries `X-Offgrid-Fleet-Answer: <node> <address> <body
sha256 or -> <mac>` over the request's nonce (or a hello's challenge) and the address the connection arrived at, so a
stranger can neither forge it, replay an earlier one, nor relay a member's answer from an address of its own.
No clock is read anywhere here.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from .protocol import MAX_COUNT, NODE_RE

REQUEST_HEADER = "X-Offgrid-Fleet"
ANSWER_HEADER = "X-Offgrid-Fleet-Answer"
CHALLENGE_HEADER = "X-Offgrid-Challenge"
REQUEST_DOMAIN = "offgridd fleet request v2"
ANSWER_DOMAIN = "offgridd fleet answer v2"
HELLO_PATH = "/fleet/v2/hello"
INVENTORY_PATH = "/fleet/v2/inventory"
BLOB_PATH = "/fleet/v2/blobs/"
BOOT_FILE = "boot-count"
# why a request (as receiver) or an answer (as caller) was refused: offgridd_peer_exchanges_refused_total{reason}
REFUSALS = ("signature", "stale", "replay", "relayed", "unsigned", "forged", "altered", "impostor")
WINDOW = 4096  # request counters kept per member: calls in flight at once never come near this

_HEX24 = re.compile(r"^[0-9a-f]{24}$")
_HEX32 = re.compile(r"^[0-9a-f]{32}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
EMPTY_DIGEST = hashlib.sha256(b"").hexdigest()


class ExchangeRefused(Exception):
    """A request or an answer that does not prove what it claims; `reason` is one of REFUSALS."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


@dataclass(frozen=True, slots=True, kw_only=True)
class FleetCall:
    """A verified request: who sent it, and the nonce its answer is bound to."""

    node: str
    boot: int
    seq: int
    nonce: str


def endpoint(host: str, port: int) -> str:
    """host:port as both ends write it (an IPv4 address seen through an IPv6 socket is written as IPv4)."""
    host = host.removeprefix("::ffff:") if host.startswith("::ffff:") and "." in host else host
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def digest(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def new_challenge() -> str:
    return secrets.token_hex(16)


def valid_challenge(text: str) -> bool:
    return bool(_HEX32.fullmatch(text))


def _mac(key: bytes, *parts: str) -> str:
    # a path or header that was not UTF-8 on the wire is signed as the bytes it was
    return hmac.new(key, "\n".join(parts).encode("utf-8", "surrogateescape"), hashlib.sha256).hexdigest()


def sign_request(key: bytes, *, node: str, boot: int, seq: int, to_node: str, to_boot: int, method: str, path: str,
                 target: str, body: bytes = b"") -> tuple[dict[str, str], str]:
    """The header for a call to `to_node` at `target` (host:port), and the nonce its answer must be bound to."""
    nonce = secrets.token_hex(12)
    fields = [node, str(boot), str(seq), to_node, str(to_boot), nonce]
    mac = _mac(key, REQUEST_DOMAIN, *fields, method.upper(), path, target, digest(body))
    return {REQUEST_HEADER: " ".join(["v2", *fields, mac])}, nonce


def verify_request(key: bytes, header: str, *, me: str, my_boot: int, method: str, path: str, local: str,
                   body_digest: str, window: SeqWindow) -> FleetCall:
    """The verified call, or ExchangeRefused saying why it is refused."""
    parts = header.split(" ")
    if (len(parts) != 8 or parts[0] != "v2" or not NODE_RE.fullmatch(parts[1]) or not NODE_RE.fullmatch(parts[4])
            or not all(p.isascii() and p.isdigit() and len(p) < 20 for p in (parts[2], parts[3], parts[5]))
            or not _HEX24.fullmatch(parts[6]) or not _HEX64.fullmatch(parts[7])):
        raise ExchangeRefused("signature", f"missing or malformed {REQUEST_HEADER} header (protocol version 2)")
    _, node, boot, seq, to_node, to_boot, nonce, mac = parts
    # the address is checked by the MAC: a call signed for another address was relayed
    if not hmac.compare_digest(mac, _mac(key, REQUEST_DOMAIN, node, boot, seq, to_node, to_boot, nonce,
                                         method.upper(), path, local, body_digest)):
        raise ExchangeRefused("signature", "the signature does not match this fleet's key (or the call was relayed "
                                           "through another address)")
    if to_node != me or int(to_boot) != my_boot:
        raise ExchangeRefused("stale", f"signed for start {to_boot} of node {to_node[:8]}, this is start {my_boot} "
                                       f"of node {me[:8]}; the caller asks again after hearing this node")
    if not window.fresh(node, int(boot), int(seq)):
        raise ExchangeRefused("replay", "this signed call was already used")
    return FleetCall(node=node, boot=int(boot), seq=int(seq), nonce=nonce)


def sign_answer(key: bytes, *, node: str, bound_to: str, local: str, status: int, content_type: str,
                content_range: str, body_digest: str | None) -> str:
    body_digest = body_digest or "-"
    mac = _mac(key, ANSWER_DOMAIN, bound_to, node, local, str(status), content_type.lower(), content_range,
               body_digest)
    return f"{node} {local} {body_digest} {mac}"


def verify_answer(key: bytes, header: str | None, *, node: str, bound_to: str, dialed: str, status: int,
                  content_type: str, content_range: str = "", body: bytes | None = None) -> None:
    """Check that `node`, at the address dialed, answered this very request; `body` when it is authenticated too."""
    parts = (header or "").split(" ")
    if len(parts) != 4 or not NODE_RE.fullmatch(parts[0]) or not (parts[2] == "-" or _HEX64.fullmatch(parts[2])):
        raise ExchangeRefused("unsigned", "the answer carries no fleet signature")
    answered_by, local, body_digest, mac = parts
    if answered_by != node:
        raise ExchangeRefused("impostor", f"node {answered_by[:8]} answered for node {node[:8]}")
    if local != dialed:
        raise ExchangeRefused("relayed", f"the answer was made at {local[:64]}, not at {dialed}")
    expected = _mac(key, ANSWER_DOMAIN, bound_to, node, local, str(status), content_type.lower(), content_range,
                    body_digest)
    if not hmac.compare_digest(mac, expected):
        raise ExchangeRefused("forged", "the answer's signature does not match this fleet's key")
    if body is not None and body_digest != digest(body):
        raise ExchangeRefused("altered", "the answer's body is not the one its node signed")


class SeqWindow:
    """The counters each member has used in calls to this node since it started: a repeated one is a replay."""

    def __init__(self, senders: int = 1024, width: int = WINDOW):
        self.senders, self.width = senders, width
        self._seen: OrderedDict[str, tuple[int, int, set[int]]] = OrderedDict()

    def fresh(self, node: str, boot: int, seq: int) -> bool:
        known = self._seen.get(node)
        if known is None or boot > known[0]:
            known = (boot, 0, set())
        elif boot < known[0]:
            return False  # from an earlier start of that member: every such call is old
        _, high, seen = known
        if seq <= high - self.width or seq in seen:
            return False
        seen.add(seq)
        high = max(high, seq)
        if len(seen) > 2 * self.width:  # now and then, not on every call: anything this old is refused anyway
            seen.difference_update([s for s in seen if s <= high - self.width])
        self._seen[node] = (boot, high, seen)
        self._seen.move_to_end(node)
        while len(self._seen) > self.senders:
            self._seen.popitem(last=False)
        return True


def count_boot(state: Path) -> int:
    """Blocking: count this start in $STATE/boot-count and return the count (announcements and calls carry it)."""
    from .fleet import read_state_file, write_state_file

    try:
        text = read_state_file(state, BOOT_FILE)
    except FileNotFoundError:
        text = "0"
    if not text.strip().isdigit() or int(text) >= MAX_COUNT:
        raise ValueError(f"{Path(state) / BOOT_FILE} does not hold a count of starts; remove it (the fleet's boxes "
                         "then refuse this one's calls until they restart)")
    boot = int(text) + 1
    write_state_file(state, BOOT_FILE, f"{boot}\n")
    return boot
