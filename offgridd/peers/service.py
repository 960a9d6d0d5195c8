"""PeerService: announce this node on the LAN, prove the nodes it hears, keep the table of live peers."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import secrets
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace

import aiohttp

from .. import __version__
from ..documents import DocumentStore
from ..events import EventBus
from ..jobs import JobBoard
from ..metrics import Metrics
from ..settings import Settings
from ..store import ModelManifest, ModelStore
from .collections import PullError, pull_collection
from .exchange import (
    ANSWER_HEADER,
    CHALLENGE_HEADER,
    HELLO_PATH,
    INVENTORY_PATH,
    REFUSALS,
    ExchangeRefused,
    SeqWindow,
    count_boot,
    endpoint,
    new_challenge,
    sign_request,
    verify_answer,
)
from .fleet import FleetKeyError, NodeIdentity, identity_mark, load_identity
from .peer import Peer, good_collection, good_entry, parse_static
from .protocol import (
    DROP_REASONS,
    DatagramRejected,
    PeerAnnouncement,
    announcement_from,
    inventory_digest,
    read_announcement,
)
from .sync import ModelPuller

log = logging.getLogger(__name__)

MAX_INVENTORY_BYTES = 1 << 20
MAX_HELLO_BYTES = 4096
LOAD_CHECK_S = 0.5
PROBE_GAP_S = 1.0  # an address that failed a challenge is not challenged again sooner (nor a datagram's sender)
MAX_PROBING = 16  # challenges in flight at once: a flood of replays from forged sources cannot pile up more
MAX_PROBED = 4096  # addresses held back for PROBE_GAP_S after a challenge


async def _bounded_body(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    """The whole body of an answer that must be signed with its body, refused unless its length is given and small."""
    if resp.content_length is None or resp.content_length > limit:
        raise ValueError(f"an answer without a length or over {limit} bytes")
    return await resp.read()


class _Listener(asyncio.DatagramProtocol):
    def __init__(self, service: PeerService):
        self.service = service

    def datagram_received(self, data: bytes, addr) -> None:
        self.service.on_datagram(data, addr)

    def error_received(self, exc: Exception) -> None:
        log.debug("peer socket error: %s", exc)


class PeerService:
    name = "peers"

    def __init__(self, settings: Settings, store: ModelStore, jobs: JobBoard, metrics: Metrics, bus: EventBus,
                 load: Callable[[], tuple[int, int]], documents: DocumentStore | None = None):
        self.state, self.http_port = settings.state, settings.port
        self.settings = settings.peers
        self.store, self.metrics, self.bus, self.jobs = store, metrics, bus, jobs
        self.documents = documents  # its collections are listed to members, and pulled from them on request
        self.load = load  # (requests active, requests waiting): what announcements say and routing ranks by
        self.identity: NodeIdentity | None = None
        self.boot = 0  # this node's count of starts: what it signs announcements and answers for
        self.sent = 0  # announcements sent in this start
        self.calls = 0  # signed calls made in this start
        self.window = SeqWindow()  # counters of the calls members made to this start of this node
        self.peers: dict[str, Peer] = {}
        self.multicast = False
        self.session: aiohttp.ClientSession | None = None
        self.puller = ModelPuller(store, jobs, bus, metrics, settings, peers=self.peers_by_load,
                                  changed=self.changed, call=self.call)
        self.static: list[tuple[str, int]] = []
        self.inventory: list[ModelManifest] = []
        self.digest = inventory_digest([])
        self.refusals = metrics.peer_refusals
        self._probes: dict[str, tuple[float, bool | None]] = {}  # endpoint -> (when, proved: None while asking)
        self._told: set[str] = set()  # endpoints whose failed challenge was logged
        self._transport: asyncio.DatagramTransport | None = None
        self._tasks: set[asyncio.Task] = set()
        self._changed = asyncio.Event()
        self._documents_lock = asyncio.Lock()  # collections are synced one pull at a time
        self._mark = None
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
        state = self.state
        self.identity = await loop.run_in_executor(None, load_identity, state)
        self._mark = await loop.run_in_executor(None, identity_mark, state)
        self.boot = await loop.run_in_executor(None, count_boot, state)
        self._transport, _ = await loop.create_datagram_endpoint(lambda: _Listener(self), sock=self._open_socket())
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=60))
        for reason in DROP_REASONS:
            self.metrics.peer_datagrams_dropped.labels(reason)
        for reason in REFUSALS:
            self.refusals.labels(reason)
        self._spawn(self._announce_loop(), "peer-announce")
        self._spawn(self._watch_bus(), "peer-bus")
        self._spawn(self.puller.run(), "peer-sync")
        log.info("peers: node %s (%s), start %d, fleet %s, multicast %s, static %s", self.identity.node_id,
                 self.identity.name, self.boot, self.identity.key_fingerprint,
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
                "fleet": ident.key_fingerprint if ident else None, "peers": len(self.peers), "boot": self.boot,
                "multicast": f"{self.settings.group}:{self.settings.port}" if self.multicast else None,
                "static": self.settings.static, "sync": self.settings.sync,
                "sync_documents": self.settings.sync_documents, "pulling": self.puller.current}

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

    # --- the key: exactly one is accepted, the one node.json holds now

    def key(self) -> bytes:
        """The fleet key, re-read the moment `offgridd fleet join|rotate` replaces node.json (one stat per use),
        so no call or datagram is taken under a key the file no longer holds."""
        state = self.state
        mark = identity_mark(state)
        if mark is not None and mark != self._mark:
            self._mark = mark
            try:
                identity = load_identity(state)  # a few hundred bytes, read only when the file was replaced
            except (FleetKeyError, OSError) as e:
                log.error("node.json changed but cannot be read (%s); peers are ignored until it is fixed", e)
                # neither the old key nor an empty one: a key nobody holds, until the file is fixed
                identity = replace(self.identity, fleet_key=secrets.token_bytes(32))
            if identity.fleet_key != self.identity.fleet_key:
                log.info("fleet key changed (fleet %s): forgetting the old fleet's peers", identity.key_fingerprint)
                self.peers.clear()
                self._probes.clear()
                self.window = SeqWindow()
                self.metrics.peers.set(0)
                self.changed()
            self.identity = identity
        return self.identity.fleet_key

    # --- announcing

    async def refresh(self) -> tuple[list[ModelManifest], list[dict]]:
        """This node's models and collections now, and the digest its announcements carry for both (a member
        fetches the inventory again when the digest changes)."""
        self.inventory = await asyncio.get_running_loop().run_in_executor(None, self.store.list)
        collections = await self.documents.collections() if self.documents is not None else []
        self.digest = inventory_digest([*((m.name, m.sha256) for m in self.inventory),
                                        *((f"collection {c['name']}", f"{c['documents']} {c['bytes']}")
                                          for c in collections)])
        return self.inventory, collections

    def announcement(self) -> PeerAnnouncement:
        """This node as it announces itself now, under the counter of its latest datagram."""
        load, queue = self.load()
        return PeerAnnouncement(
            node=self.identity.node_id, name=self.identity.name, http_port=self.http_port,
            version=__version__[:32], inventory=self.digest, models=len(self.inventory), load=load, queue=queue,
            every=self.settings.interval, boot=self.boot, seq=self.sent, clock=time.time())

    async def _announce_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                self.key()
                await self.refresh()
                await self._announce()
                self._expire()
            except Exception:
                log.exception("peer announcement failed")
            deadline = loop.time() + self.settings.interval
            while (left := deadline - loop.time()) > 0 and self.load() == self._announced_load:
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
        self._announced_load = self.load()
        for target in targets:
            self.sent += 1  # one counter per datagram: a receiver takes each only once
            self._transport.sendto(self.announcement().encode(self.key()), target)

    def _expire(self) -> None:
        now = time.monotonic()
        for node, peer in list(self.peers.items()):
            if peer.expired(now):
                del self.peers[node]
                log.info("peer %s (%s) went silent; forgetting it", peer.name, peer.address)
                self.bus.publish("peers", {"left": peer.to_dict()})
        self._forget_probes(now)
        self.metrics.peers.set(len(self.peers))

    def _forget_probes(self, now: float) -> None:
        """Challenges that are over and past PROBE_GAP_S no longer hold their address back."""
        for target, (when, proved) in list(self._probes.items()):
            if proved is not None and now - when >= PROBE_GAP_S:
                del self._probes[target]

    async def _watch_bus(self) -> None:
        with self.bus.subscribe() as queue:
            while True:
                event = await queue.get()
                if event.kind in ("models", "documents") or (event.kind == "job" and event.data.get("state") == "done"):
                    self.changed()

    # --- listening: a datagram is taken from a proven address, and otherwise only prompts a challenge

    def drop(self, reason: str, address: str, detail: object) -> None:
        self.metrics.peer_datagrams_dropped.labels(reason).inc()
        log.debug("dropped a datagram from %s: %s", address, detail)

    def on_datagram(self, data: bytes, addr) -> None:
        try:
            ann = read_announcement(data, self.key())
            if ann.node == self.identity.node_id:
                return  # our own, looped back by multicast
            self._consider(ann, addr[0])
        except DatagramRejected as e:
            self.drop(e.reason, addr[0], e)

    def _consider(self, ann: PeerAnnouncement, address: str) -> None:
        peer = self.peers.get(ann.node)
        if peer is not None and (ann.boot, ann.seq) <= (peer.boot, peer.seq):
            raise DatagramRejected("replay", f"counter {ann.boot}/{ann.seq}, already at {peer.boot}/{peer.seq}")
        if peer is not None and ann.boot == peer.boot and (address, ann.http_port) == (peer.address, peer.http_port):
            peer.heard(ann)
            self._fetch_if_changed(peer)
            return
        # a new node, a new start of a known one, or a known one at another address: ask it to prove itself there
        target = endpoint(address, ann.http_port)
        when, proved = self._probes.get(target, (-PROBE_GAP_S, True))
        if proved is None:
            return  # a challenge to that address is under way: its answer decides
        if time.monotonic() - when < PROBE_GAP_S:
            if proved is False:
                raise DatagramRejected("unproven", f"{target} did not answer a challenge under the fleet key")
            return
        if len(self._probes) >= MAX_PROBED:
            self._forget_probes(time.monotonic())
        if len(self._probes) >= MAX_PROBED or sum(p is None for _, p in self._probes.values()) >= MAX_PROBING:
            raise DatagramRejected("unproven", f"too many addresses to challenge at once; {target} waits its turn")
        self._probes[target] = (time.monotonic(), None)
        self._spawn(self._probe(ann.node, address, ann.http_port), f"probe-{target}")

    async def _probe(self, node: str, address: str, port: int) -> None:
        target = endpoint(address, port)
        try:
            answer = await self.hello(node, address, port)
        except (ExchangeRefused, DatagramRejected, aiohttp.ClientError, TimeoutError, OSError, ValueError) as e:
            self._probes[target] = (time.monotonic(), False)
            why = f"{target} could not prove it is node {node[:8]}: {e or type(e).__name__}"
            self.drop("unproven", address, why)
            if target not in self._told and len(self._told) < MAX_PROBED:  # once per address: replays repeat
                self._told.add(target)
                log.warning("%s; a box of this fleet there needs its API reachable from here (a stranger replaying "
                            "a datagram fails the same way)", why)
            return
        self._probes[target] = (time.monotonic(), True)
        self._proven(answer, address, port)

    async def hello(self, node: str, address: str, port: int) -> PeerAnnouncement:
        """Challenge the node at address:port to prove, under the fleet key, that it is `node`; its state if so."""
        challenge, target = new_challenge(), endpoint(address, port)
        async with self.session.get(f"http://{target}{HELLO_PATH}", headers={CHALLENGE_HEADER: challenge},
                                    timeout=aiohttp.ClientTimeout(total=5)) as resp:
            body = await _bounded_body(resp, MAX_HELLO_BYTES)
            self.check_answer(resp, node=node, bound_to=challenge, dialed=target, body=body)
            if resp.status != 200:
                raise ValueError(f"HTTP {resp.status} to a challenge")
        answer = announcement_from(json.loads(body))
        if answer.node != node:
            raise ExchangeRefused("impostor", f"the answer is about node {answer.node[:8]}")
        return answer

    async def prove(self, peer: Peer) -> Peer:
        """Challenge a known peer again at its address, before trusting it with a client's credentials."""
        answer = await self.hello(peer.node, peer.address, peer.http_port)
        return self._proven(answer, peer.address, peer.http_port)

    def check_answer(self, resp: aiohttp.ClientResponse, *, node: str, bound_to: str, dialed: str,
                     body: bytes | None = None) -> None:
        """ExchangeRefused (and counted) unless `node` itself answered the request bound to `bound_to`."""
        try:
            verify_answer(self.key(), resp.headers.get(ANSWER_HEADER), node=node, bound_to=bound_to, dialed=dialed,
                          status=resp.status, content_type=resp.content_type,
                          content_range=resp.headers.get("Content-Range", ""), body=body)
        except ExchangeRefused as e:
            self.refusals.labels(e.reason).inc()
            log.warning("refused an answer from %s: %s", dialed, e)
            raise

    @contextlib.asynccontextmanager
    async def call(self, peer: Peer, path: str, headers: dict[str, str] | None = None,
                   limits: aiohttp.ClientTimeout | None = None) -> AsyncIterator[aiohttp.ClientResponse]:
        """A signed GET to a member, whose answer is checked to be that member's own (ExchangeRefused if not)
        before the caller reads its body."""
        signed, nonce = self.sign_call(peer, "GET", path)
        async with self.session.get(peer.url + path, headers={**signed, **(headers or {})}, timeout=limits) as resp:
            self.check_answer(resp, node=peer.node, bound_to=nonce, dialed=peer.endpoint)
            yield resp

    def sign_call(self, peer: Peer, method: str, path: str, body: bytes = b"") -> tuple[dict[str, str], str]:
        """Headers for a call to `peer` (signed for its current start), and the nonce its answer is bound to."""
        self.calls += 1
        return sign_request(self.key(), node=self.identity.node_id, boot=self.boot, seq=self.calls, to_node=peer.node,
                            to_boot=peer.boot, method=method, path=path, target=peer.endpoint, body=body)

    def _proven(self, answer: PeerAnnouncement, address: str, port: int) -> Peer:
        peer = self.peers.get(answer.node)
        if peer is None:
            peer = self.peers[answer.node] = Peer.proven(answer, address, port)
            log.info("peer %s joined: node %s at %s, proved under the fleet key", answer.name, answer.node, peer.url)
            self.metrics.peers.set(len(self.peers))
            self.bus.publish("peers", {"joined": peer.to_dict()})
            self.changed()  # answer a newcomer at once rather than at our next interval
        else:
            if (address, port) != (peer.address, peer.http_port):
                log.info("peer %s moved from %s to %s, proved under the fleet key", peer.name, peer.endpoint,
                         endpoint(address, port))
                peer.address, peer.http_port, peer.fetched = address, port, ""
            if answer.boot != peer.boot:
                peer.fetched = ""  # a restarted node may have changed its store
            peer.heard(answer)
        self._fetch_if_changed(peer)
        return peer

    def _fetch_if_changed(self, peer: Peer) -> None:
        if peer.fetched != peer.inventory and not any(t.get_name() == f"inventory-{peer.node}" for t in self._tasks):
            self._spawn(self._fetch_inventory(peer), f"inventory-{peer.node}")

    async def fetch(self, peer: Peer, path: str, limit: int, seconds: float = 10) -> tuple[int, bytes]:
        """A signed GET to a member whose whole answer (status and body, at most `limit` bytes) is proved to be that
        member's own: ExchangeRefused if not, ValueError for an answer without a length or over the limit."""
        headers, nonce = self.sign_call(peer, "GET", path)
        async with self.session.get(peer.url + path, headers=headers,
                                    timeout=aiohttp.ClientTimeout(total=seconds)) as resp:
            body = await _bounded_body(resp, limit)
            self.check_answer(resp, node=peer.node, bound_to=nonce, dialed=peer.endpoint, body=body)
            return resp.status, body

    def find(self, name: str) -> Peer | None:
        """A live peer by its name or node id."""
        now = time.monotonic()
        return next((p for p in self.peers.values() if name in (p.name, p.node) and not p.expired(now)), None)

    async def _fetch_inventory(self, peer: Peer) -> None:
        try:
            status, body = await self.fetch(peer, INVENTORY_PATH, MAX_INVENTORY_BYTES)
            if status != 200:
                log.warning("peer %s refused its inventory: HTTP %s", peer.name, status)
                return
            data = json.loads(body)
            if data["node"] != peer.node:
                raise ValueError("the inventory is another node's")
            peer.models = {m["name"]: m for m in data["models"] if good_entry(m)}
            peer.collections = {c["name"]: c["documents"] for c in data.get("collections", []) if good_collection(c)}
            peer.fetched = data["inventory"]
            if self.settings.sync_documents and self.documents is not None and peer.collections:
                self._spawn(self._sync_documents(peer), f"documents-{peer.node}")
        except (ExchangeRefused, aiohttp.ClientError, TimeoutError, ValueError, KeyError, TypeError) as e:
            log.warning("could not fetch the inventory of peer %s: %s", peer.name, e or type(e).__name__)
            return
        self.puller.wake()

    async def _sync_documents(self, peer: Peer) -> None:
        """peers.sync_documents: the peer's collections, each pulled as on request (documents here are skipped
        without being fetched), one pull at a time on this node."""
        async with self._documents_lock:
            for name in sorted(peer.collections):
                try:
                    report = await pull_collection(self.fetch, self.jobs, self.documents, peer, name)
                except PullError as e:
                    log.warning("syncing documents from %s: %s", peer.name, e)
                    continue
                if added := [d.filename for d in report.documents if d.state == "done"]:
                    log.info("synced %d document(s) of %s from %s: %s", len(added), name, peer.name, ", ".join(added))

    def peers_by_load(self) -> list[Peer]:
        """Live peers, least busy first."""
        now = time.monotonic()
        return sorted((p for p in self.peers.values() if not p.expired(now)), key=lambda p: (p.queue, p.load))

    def route_candidates(self, model: str) -> list[Peer]:
        """Peers that have `model`, least busy first."""
        return [p for p in self.peers_by_load() if model in p.models]
