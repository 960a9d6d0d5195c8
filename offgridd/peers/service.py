"""PeerService: announce this node on the LAN, listen for the others, keep the table of live peers."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import time
from dataclasses import dataclass, field

import aiohttp

from .. import __version__
from ..runtime import Runtime
from ..store.store import SHA256_RE, ModelManifest, valid_name
from .fleet import NODE_FILE, NodeIdentity, load_identity, sign_request
from .protocol import (
    DROP_REASONS,
    DatagramRejected,
    PeerAnnouncement,
    ReplayGuard,
    inventory_digest,
    new_nonce,
    read_announcement,
)
from .sync import ModelPuller

log = logging.getLogger(__name__)

EXPIRE_AFTER = 3  # silent announcement intervals before a peer is forgotten
INVENTORY_PATH = "/fleet/v1/inventory"
BLOB_PATH = "/fleet/v1/blobs/"
MAX_INVENTORY_BYTES = 1 << 20
LOAD_CHECK_S = 0.5


@dataclass(slots=True, kw_only=True, eq=False)
class Peer:
    node: str
    name: str
    address: str
    http_port: int
    version: str
    inventory: str
    models_count: int
    load: int
    queue: int
    every: float
    first_seen: float = field(default_factory=time.time)
    last_seen: float = field(default_factory=time.monotonic)
    models: dict[str, dict] = field(default_factory=dict)  # name -> {"sha256", "size", ...} from its inventory
    fetched: str = ""  # the inventory digest `models` matches

    @property
    def url(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"http://{host}:{self.http_port}"

    def expired(self, now: float) -> bool:
        return now - self.last_seen > EXPIRE_AFTER * self.every

    def to_dict(self) -> dict:
        return {"node": self.node, "name": self.name, "address": self.address, "http_port": self.http_port,
                "url": self.url, "version": self.version, "models": sorted(self.models),
                "model_count": self.models_count, "load": self.load, "queue": self.queue,
                "first_seen": self.first_seen, "last_seen_s": round(time.monotonic() - self.last_seen, 1)}


class _Listener(asyncio.DatagramProtocol):
    def __init__(self, service: PeerService):
        self.service = service

    def datagram_received(self, data: bytes, addr) -> None:
        self.service.on_datagram(data, addr)

    def error_received(self, exc: Exception) -> None:
        log.debug("peer socket error: %s", exc)


def parse_static(entries: list[str]) -> list[tuple[str, int]]:
    out = []
    for entry in entries:
        host, sep, port = entry.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"peers.static entry {entry!r} is not 'host:port'")
        out.append((host.strip("[]"), int(port)))
    return out


class PeerService:
    name = "peers"

    def __init__(self, rt: Runtime):
        self.rt = rt
        self.settings = rt.settings.peers
        self.identity: NodeIdentity | None = None
        self.peers: dict[str, Peer] = {}
        self.guard = ReplayGuard()
        self.http_guard = ReplayGuard()
        self.multicast = False
        self.session: aiohttp.ClientSession | None = None
        self.puller = ModelPuller(self)
        self.static: list[tuple[str, int]] = []
        self.inventory: list[ModelManifest] = []
        self.digest = inventory_digest([])
        self._transport: asyncio.DatagramTransport | None = None
        self._tasks: set[asyncio.Task] = set()
        self._changed = asyncio.Event()
        self._identity_mtime = 0.0
        self._announced_load = (0, 0)

    @property
    def peer_count(self) -> int:
        return len(self.peers)

    async def start(self) -> None:
        group = ipaddress.ip_address(self.settings.group)
        if group.version != 4 or not group.is_multicast:
            raise ValueError(f"peers.group {self.settings.group!r} is not an IPv4 multicast address")
        if self.settings.interface:
            try:
                ipaddress.IPv4Address(self.settings.interface)
            except ValueError:
                raise ValueError(f"peers.interface {self.settings.interface!r} is not an IPv4 address") from None
        self.static = parse_static(self.settings.static)
        loop = asyncio.get_running_loop()
        self.identity = await loop.run_in_executor(None, load_identity, self.rt.settings.state)
        self._identity_mtime = await loop.run_in_executor(None, self._node_file_mtime)
        self._transport, _ = await loop.create_datagram_endpoint(lambda: _Listener(self), sock=self._open_socket())
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=60))
        for reason in DROP_REASONS:
            self.rt.metrics.peer_datagrams_dropped.labels(reason)
        self._spawn(self._announce_loop(), "peer-announce")
        self._spawn(self._watch_bus(), "peer-bus")
        self._spawn(self.puller.run(), "peer-sync")
        log.info("peers: node %s (%s), fleet %s, multicast %s, static %s", self.identity.node_id,
                 self.identity.name, self.identity.key_fingerprint,
                 f"{self.settings.group}:{self.settings.port}" if self.multicast else "off",
                 self.settings.static or "none")

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._transport is not None:
            self._transport.close()
        if self.session is not None:
            await self.session.close()

    def describe(self) -> dict:
        ident = self.identity
        return {"node": ident.node_id if ident else None, "name": ident.name if ident else None,
                "fleet": ident.key_fingerprint if ident else None, "peers": len(self.peers),
                "multicast": f"{self.settings.group}:{self.settings.port}" if self.multicast else None,
                "static": self.settings.static, "sync": self.settings.sync, "pulling": self.puller.current}

    def _spawn(self, coro, name: str) -> asyncio.Task:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _open_socket(self) -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # several daemons on one host share the group port
        s.bind(("", self.settings.port))
        s.setblocking(False)
        iface = socket.inet_aton(self.settings.interface or "0.0.0.0")
        try:
            s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, socket.inet_aton(self.settings.group) + iface)
            s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)  # the LAN, never routed beyond it
            s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
            if self.settings.interface:
                s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, iface)
            self.multicast = True
        except OSError as e:
            log.warning("multicast is not available here (%s); announcing to peers.static only", e.strerror)
        return s

    # --- announcing

    def _node_file_mtime(self) -> float:
        try:
            return (self.rt.settings.state / NODE_FILE).stat().st_mtime
        except OSError:
            return 0.0

    def _refresh(self) -> None:
        """Blocking: re-read the inventory, and node.json when `offgridd fleet join` changed it."""
        self.inventory = self.rt.store.list()
        self.digest = inventory_digest((m.name, m.sha256) for m in self.inventory)
        mtime = self._node_file_mtime()
        if mtime != self._identity_mtime:
            self._identity_mtime = mtime
            identity = load_identity(self.rt.settings.state)
            if identity.fleet_key != self.identity.fleet_key:
                log.info("fleet key changed (fleet %s): forgetting the old fleet's peers", identity.key_fingerprint)
                self.peers.clear()
            self.identity = identity

    def _load(self) -> tuple[int, int]:
        return self.rt.active, self.rt.pool.waiting

    async def _announce_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                await loop.run_in_executor(None, self._refresh)
                await self._announce()
                self._expire()
            except Exception:
                log.exception("peer announcement failed")
            deadline = loop.time() + self.settings.interval
            while (left := deadline - loop.time()) > 0 and self._load() == self._announced_load:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(left, LOAD_CHECK_S)):
                        await self._changed.wait()
                if self._changed.is_set():
                    break
            self._changed.clear()

    def changed(self) -> None:
        """Announce now (the inventory or the fleet changed)."""
        self._changed.set()

    async def _announce(self) -> None:
        loop = asyncio.get_running_loop()
        targets = [(self.settings.group, self.settings.port)] if self.multicast else []
        for host, port in self.static:
            try:
                infos = await loop.getaddrinfo(host, port, family=socket.AF_INET, type=socket.SOCK_DGRAM)
                targets.append(infos[0][4][:2])
            except OSError as e:
                log.debug("cannot resolve static peer %s: %s", host, e)
        self._announced_load = load, queue = self._load()
        for target in targets:
            ann = PeerAnnouncement(
                node=self.identity.node_id, name=self.identity.name, http_port=self.rt.settings.port,
                version=__version__[:32], inventory=self.digest, models=len(self.inventory), load=load, queue=queue,
                every=self.settings.interval, ts=time.time(), nonce=new_nonce(),
            )
            self._transport.sendto(ann.encode(self.identity.fleet_key), target)

    def _expire(self) -> None:
        now = time.monotonic()
        for node, peer in list(self.peers.items()):
            if peer.expired(now):
                del self.peers[node]
                log.info("peer %s (%s) went silent; forgetting it", peer.name, peer.address)
                self.rt.bus.publish("peers", {"left": peer.to_dict()})
        self.rt.metrics.peers.set(len(self.peers))

    async def _watch_bus(self) -> None:
        with self.rt.bus.subscribe() as queue:
            while True:
                event = await queue.get()
                if event.kind == "models" or (event.kind == "job" and event.data.get("state") == "done"):
                    self.changed()

    # --- listening

    def on_datagram(self, data: bytes, addr) -> None:
        try:
            ann = read_announcement(data, self.identity.fleet_key)
            if ann.node == self.identity.node_id:
                return  # our own, looped back by multicast
            if not self.guard.fresh(ann.nonce):
                raise DatagramRejected("replay")
        except DatagramRejected as e:
            self.rt.metrics.peer_datagrams_dropped.labels(e.reason).inc()
            log.debug("dropped a datagram from %s: %s", addr[0], e)
            return
        self._heard(ann, addr[0])

    def _heard(self, ann: PeerAnnouncement, address: str) -> None:
        peer = self.peers.get(ann.node)
        if peer is None:
            peer = self.peers[ann.node] = Peer(
                node=ann.node, name=ann.name, address=address, http_port=ann.http_port, version=ann.version,
                inventory=ann.inventory, models_count=ann.models, load=ann.load, queue=ann.queue, every=ann.every)
            log.info("peer %s joined: node %s at %s", ann.name, ann.node, peer.url)
            self.rt.metrics.peers.set(len(self.peers))
            self.rt.bus.publish("peers", {"joined": peer.to_dict()})
            self.changed()  # answer a newcomer at once rather than at our next interval
        else:
            peer.name, peer.address, peer.http_port, peer.version = ann.name, address, ann.http_port, ann.version
            peer.inventory, peer.models_count, peer.load, peer.queue = ann.inventory, ann.models, ann.load, ann.queue
            peer.every, peer.last_seen = ann.every, time.monotonic()
        if peer.fetched != peer.inventory and not any(t.get_name() == f"inventory-{peer.node}" for t in self._tasks):
            self._spawn(self._fetch_inventory(peer), f"inventory-{peer.node}")

    async def _fetch_inventory(self, peer: Peer) -> None:
        try:
            async with self.session.get(peer.url + INVENTORY_PATH, headers=sign_request(self.identity, "GET",
                                        INVENTORY_PATH), timeout=aiohttp.ClientTimeout(total=10)) as resp:
                if resp.status != 200:
                    log.warning("peer %s refused its inventory: HTTP %s", peer.name, resp.status)
                    return
                if not resp.content_length or resp.content_length > MAX_INVENTORY_BYTES:
                    log.warning("peer %s sent an inventory without a length or too long", peer.name)
                    return
                data = await resp.json()
            peer.models = {m["name"]: m for m in data["models"] if _good_entry(m)}
            peer.fetched = data["inventory"]
        except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, TypeError) as e:
            log.warning("could not fetch the inventory of peer %s: %s", peer.name, e or type(e).__name__)
            return
        self.puller.wake()

    def peers_by_load(self) -> list[Peer]:
        """Live peers, least busy first."""
        now = time.monotonic()
        return sorted((p for p in self.peers.values() if not p.expired(now)), key=lambda p: (p.queue, p.load))

    def route_candidates(self, model: str) -> list[Peer]:
        """Peers that have `model`, least busy first."""
        return [p for p in self.peers_by_load() if model in p.models]


def _good_entry(m) -> bool:
    return (isinstance(m, dict) and isinstance(m.get("name"), str) and valid_name(m["name"])
            and isinstance(m.get("sha256"), str) and bool(SHA256_RE.fullmatch(m["sha256"]))
            and isinstance(m.get("size"), int) and m["size"] > 0)
