"""The fleet trusts only the fleet: a stranger on the LAN without the key cannot pose as a box, and boxes whose clocks
disagree by hours (or sit at 1970) still work as one. Real daemons, each in a network namespace of its own."""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import msgpack
import pytest
from conftest import Daemon, http, wait_for
from test_peers import INTERVAL, big_model, fleet_state, jobs, member_call, model_names, peers_of, stop_all, udp_port

from offgridd.peers.exchange import ANSWER_HEADER, INVENTORY_PATH, ExchangeRefused, verify_answer
from offgridd.peers.fleet import load_identity
from offgridd.store import ModelStore

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


@contextlib.contextmanager
def inside(ns: str):
    """Run the block in network namespace `ns`: sockets made here stay there (this thread only)."""
    here = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    there = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        if _libc.setns(there, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns")
        yield
    finally:
        _libc.setns(here, CLONE_NEWNET)
        os.close(here)
        os.close(there)


class Lan:
    """A switch (a bridge) that boxes, each a network namespace, plug into; this process reaches them through it."""

    def __init__(self):
        tag = secrets.token_hex(2)
        self.net, self.tag, self.boxes = f"10.232.{secrets.randbelow(250) + 1}", tag, []
        self.bridge = f"ogbr{tag}"
        self._ip("link", "add", self.bridge, "type", "bridge", "mcast_snooping", "0")
        self._ip("addr", "add", f"{self.net}.254/24", "dev", self.bridge)
        self._ip("link", "set", self.bridge, "up")

    @staticmethod
    def _ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)

    def plug(self, name: str) -> tuple[str, str]:
        """A new box on the switch: (namespace, its address)."""
        n = len(self.boxes) + 1
        ns, here, there = f"og{self.tag}{name}", f"og{self.tag}h{n}", f"og{self.tag}t{n}"
        self._ip("netns", "add", ns)
        self.boxes.append((ns, here))
        self._ip("link", "add", here, "type", "veth", "peer", "name", there)
        self._ip("link", "set", here, "master", self.bridge)
        self._ip("link", "set", here, "up")
        self._ip("link", "set", there, "netns", ns)
        self._ip("-n", ns, "addr", "add", f"{self.net}.{n}/24", "dev", there)
        self._ip("-n", ns, "link", "set", there, "up")
        self._ip("-n", ns, "link", "set", "lo", "up")
        self._ip("-n", ns, "route", "add", "224.0.0.0/4", "dev", there)
        return ns, f"{self.net}.{n}"

    def remove(self) -> None:
        for ns, here in self.boxes:
            subprocess.run(["ip", "link", "del", here], capture_output=True, timeout=10)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True, timeout=10)


@pytest.fixture
def lan():
    if os.geteuid() != 0 or not shutil.which("ip"):
        pytest.skip("network namespaces need root and iproute2")
    try:
        switch = Lan()
    except subprocess.CalledProcessError as e:
        pytest.skip(f"cannot build a bridge here: {e.stderr.decode().strip()}")
    try:
        yield switch
    finally:
        switch.remove()


def start_box(ns: str, address: str, state: Path, udp: int, group: str, *args: str, wait: bool = True,
              http_port: int | None = None, **env: str) -> Daemon:
    (state / "none.toml").write_text("")
    full = {**os.environ, "OFFGRID_CONFIG": str(state / "none.toml"), "PYTHONASYNCIODEBUG": "1",
            "OFFGRID_PEERS_ENABLED": "true", "OFFGRID_PEERS_PORT": str(udp), "OFFGRID_PEERS_GROUP": group,
            "OFFGRID_PEERS_INTERVAL": INTERVAL, "OFFGRID_PEERS_INTERFACE": address, **env}
    full.pop("NOTIFY_SOCKET", None)
    http_port = http_port or 11611 + secrets.randbelow(1000)
    log = state.parent / f"{state.name}.log"
    proc = subprocess.Popen(
        ["ip", "netns", "exec", ns, sys.executable, "-m", "offgridd", "serve", "--host", address, "--port",
         str(http_port), "--state", str(state), "--threads", "2", "--ctx", "2048", *args],
        stdout=subprocess.DEVNULL, stderr=open(log, "ab"), env=full)
    daemon = Daemon(proc=proc, url=f"http://{address}:{http_port}", state=state, log=log)
    if wait:
        daemon.wait_ready()
    return daemon


class Stranger:
    """Someone on the LAN without the fleet key: hears every announcement, sends what it likes, runs a web server
    that relays, forges and serves what it wants, and writes down every request that reaches it."""

    def __init__(self, ns: str, address: str, udp: int, groups: list[str], http_port: int, pose_as: str,
                 scratch: Path):
        self.address, self.requests, self.pose_as = address, [], pose_as
        self.relay_to: str | None = None  # "host:port" of the box whose challenges it passes on
        self.forged_blob = big_model(scratch / "forged.gguf", 1).read_bytes()
        with inside(ns):
            self.ear = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.ear.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.ear.bind(("", udp))
            for group in groups:
                self.ear.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP,
                                    socket.inet_aton(group) + socket.inet_aton(address))
            self.mouth = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.web = ThreadingHTTPServer((address, http_port), self._handler())
        self.ear.settimeout(0.2)
        threading.Thread(target=self.web.serve_forever, daemon=True).start()

    def listen(self, node: str) -> bytes:
        """The next announcement of `node` heard on the LAN (the body is not secret, only signed)."""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                data, _ = self.ear.recvfrom(2048)
                if msgpack.unpackb(msgpack.unpackb(data)[1])["node"] == node:
                    return data
        raise TimeoutError(f"heard nothing from {node}")

    def send(self, data: bytes, to: tuple[str, int]) -> None:
        self.mouth.sendto(data, to)

    def _handler(self):
        stranger = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                stranger.requests.append((self.command, self.path, dict(self.headers)))
                if self.path == "/fleet/v2/hello" and stranger.relay_to:
                    req = urllib.request.Request(f"http://{stranger.relay_to}{self.path}",
                                                 headers={"X-Offgrid-Challenge": self.headers["X-Offgrid-Challenge"]})
                    with urllib.request.urlopen(req, timeout=5) as resp:
                        body, answer = resp.read(), resp.headers[ANSWER_HEADER]
                    if len(stranger.requests) % 2 == 0:  # every other time it claims the answer was made here
                        node, _, digest, mac = answer.split(" ")
                        answer = f"{node} {stranger.address}:{self.server.server_port} {digest} {mac}"
                    self._send(200, body, {ANSWER_HEADER: answer})
                elif self.path == "/fleet/v2/hello":  # nobody to relay: make an answer up
                    self._send(200, b"{}", {ANSWER_HEADER: f"{stranger.pose_as} {stranger.address}:"
                                                           f"{self.server.server_port} - {'0' * 64}"})
                elif self.path == INVENTORY_PATH:
                    sha = hashlib.sha256(stranger.forged_blob).hexdigest()
                    self._send(200, json.dumps({"models": [{"name": "llama3-8b-instruct", "sha256": sha,
                                                            "size": len(stranger.forged_blob)}]}).encode())
                else:
                    self._send(200, stranger.forged_blob)

            def do_POST(self) -> None:
                stranger.requests.append((self.command, self.path, dict(self.headers)))
                self._send(200, b'{"choices": []}')

            def _send(self, status: int, body: bytes, headers: dict | None = None) -> None:
                self.send_response(status)
                for k, v in {"Content-Type": "application/json", **(headers or {})}.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        return Handler

    def close(self) -> None:
        self.web.shutdown()
        self.web.server_close()
        self.ear.close()
        self.mouth.close()


def dropped(daemon: Daemon, reason: str) -> float:
    try:
        return daemon.metric("offgridd_peer_datagrams_dropped_total", reason=reason)
    except KeyError:
        return 0  # the peer service has not started yet


def refused(daemon: Daemon, reason: str) -> float:
    try:
        return daemon.metric("offgridd_peer_exchanges_refused_total", reason=reason)
    except KeyError:
        return 0


def test_a_stranger_replaying_and_relaying_a_box_cannot_take_its_place_before_or_after_the_victim_restarts(
        model_state, tmp_path, lan):
    key, udp = secrets.token_bytes(32), udp_port()
    group, elsewhere = (f"239.255.{secrets.randbelow(250) + 1}.{secrets.randbelow(250) + 1}" for _ in range(2))
    (ns_a, at_a), (ns_b, at_b), (ns_m, at_m) = lan.plug("a"), lan.plug("b"), lan.plug("m")
    state_a = fleet_state(model_state, tmp_path, "box-a", key)
    state_b = fleet_state(model_state, tmp_path, "box-b", key)
    node_a, a_port = load_identity(state_a).node_id, 11611 + secrets.randbelow(1000)
    a = start_box(ns_a, at_a, state_a, udp, group, http_port=a_port, OFFGRID_PEERS_SYNC="off")
    b = start_box(ns_b, at_b, state_b, udp, group)
    # the stranger's web server listens on A's port, as A's datagrams announce it
    stranger = Stranger(ns_m, at_m, udp, [group, elsewhere], a_port, pose_as=node_a,
                        scratch=tmp_path)
    try:
        wait_for(lambda: [p["address"] for p in peers_of(b)["peers"]] == [at_a], what="B to prove A")
        captured = stranger.listen(node_a)

        # 1. B knows A: the captured datagram, sent again from the stranger's address, is an old counter
        stranger.send(captured, (at_b, udp))
        wait_for(lambda: dropped(b, "replay") >= 1, what="B to refuse the replay")

        # 2. A is gone and B restarts, remembering nobody: the replay gets the stranger only a challenge it cannot
        # answer, however often it is sent
        stop_all(a, b)
        b = start_box(ns_b, at_b, state_b, udp, group, wait=False)

        def replay() -> bool:
            stranger.send(captured, (at_b, udp))
            return dropped(b, "unproven") >= 2

        wait_for(replay, what="B to challenge the stranger and find it unproven")
        assert refused(b, "forged") >= 1 and peers_of(b)["peers"] == []

        # 3. A is back on another segment B does not hear; the stranger bridges them: it sends B each of A's live
        # announcements and passes B's challenges on to A, so B gets A's real answers, from the stranger's address
        stranger.relay_to = f"{at_a}:{a_port}"
        a = start_box(ns_a, at_a, state_a, udp, elsewhere, http_port=a_port, OFFGRID_PEERS_SYNC="off")
        b.wait_ready()
        forged = refused(b, "forged")

        def relay() -> bool:
            stranger.send(stranger.listen(node_a), (at_b, udp))
            return refused(b, "relayed") >= 1 and refused(b, "forged") > forged

        wait_for(relay, what="B to refuse A's answers relayed through the stranger")
        assert peers_of(b)["peers"] == [] and b.metric("offgridd_peers") == 0

        # nothing the stranger offered was fetched, stored, or sent a client's credentials
        asked = {path for _, path, _ in stranger.requests}
        assert asked == {"/fleet/v2/hello"}, asked
        status, _, _ = http("POST", f"{b.url}/v1/chat/completions", {"model": "llama3-8b-instruct", "messages": [
            {"role": "user", "content": "hi"}]}, headers={"Authorization": "Bearer classroom-secret"})
        assert status == 404
        assert not any("Authorization" in headers for _, _, headers in stranger.requests)
        assert model_names(b) == {"gemma3-270m"} and not [j for j in jobs(b) if j["kind"] == "peer-pull"]
        assert [m.name for m in ModelStore(state_b / "models").list()] == ["gemma3-270m"]
        assert not list((state_b / "models" / ".partial").glob("*"))
    finally:
        stranger.close()
        stop_all(a, b)


def test_an_inventory_answer_altered_or_replayed_on_its_way_is_refused(model_state, tmp_path):
    """What a relay on the path would try: change a real answer of a real box, or hand back an earlier one."""
    from test_peers import start_peer

    key = secrets.token_bytes(32)
    a = start_peer(fleet_state(model_state, tmp_path, "box-a", key), udp_port(), OFFGRID_PEERS_SYNC="off")
    try:
        node_a, dialed = load_identity(a.state).node_id, a.url.removeprefix("http://")

        def ask() -> tuple[str, int, dict, bytes]:
            headers = member_call(a, key, "GET", INVENTORY_PATH)
            nonce = headers["X-Offgrid-Fleet"].split(" ")[6]
            status, answer_headers, body = http("GET", a.url + INVENTORY_PATH, headers=headers)
            return nonce, status, answer_headers, body

        def check(nonce: str, status: int, headers: dict, body: bytes) -> None:
            verify_answer(key, headers.get(ANSWER_HEADER), node=node_a, bound_to=nonce, dialed=dialed, status=status,
                          content_type=headers["Content-Type"].split(";")[0], body=body)

        first = ask()
        check(*first)  # the real answer is taken
        assert json.loads(first[3])["models"][0]["name"] == "gemma3-270m"
        altered = first[3].replace(b"gemma3-270m", b"llama3-8b-xx")
        for tampered, why in (((*first[:3], altered), "altered"), ((ask()[0], *first[1:]), "forged")):
            with pytest.raises(ExchangeRefused) as e:
                check(*tampered)
            assert e.value.reason == why
        # and the signed call itself, sent again, is refused by A
        headers = member_call(a, key, "GET", INVENTORY_PATH)
        assert http("GET", a.url + INVENTORY_PATH, headers=headers)[0] == 200
        status, _, body = http("GET", a.url + INVENTORY_PATH, headers=headers)
        assert status == 403 and "already used" in json.loads(body)["error"]["message"]
        assert a.metric("offgridd_peer_exchanges_refused_total", reason="replay") == 1
        # nor after A restarts, when it remembers no counter: the call was signed for A's previous start
        fresh = member_call(a, key, "GET", INVENTORY_PATH)
        stop_all(a)
        a = start_peer(a.state, udp_port(), port=int(dialed.rsplit(":", 1)[1]), OFFGRID_PEERS_SYNC="off")
        for held in (headers, fresh):
            status, _, body = http("GET", a.url + INVENTORY_PATH, headers=held)
            assert status == 403 and "start 1" in json.loads(body)["error"]["message"]
        assert a.metric("offgridd_peer_exchanges_refused_total", reason="stale") == 2
    finally:
        stop_all(a)


def faketime_library() -> str | None:
    found = sorted(Path("/usr/lib").glob("*/faketime/libfaketimeMT.so.1"))  # the daemon runs threads
    return str(found[0]) if found else None


def test_boxes_whose_clocks_are_hours_apart_or_at_1970_find_each_other_sync_and_route(model_state, tmp_path):
    """A Raspberry Pi without a battery-backed clock starts at 1970 after a power cut; the fleet must not care."""
    from test_peers import start_peer

    lib = faketime_library()
    if lib is None:
        pytest.skip("needs Debian's faketime package (apt-get install faketime)")
    key, pa, pb = secrets.token_bytes(32), udp_port(), udp_port()
    state_a = fleet_state(model_state, tmp_path, "box-a", key)
    builtin = json.loads((state_a / "models" / "manifests" / "gemma3-270m.json").read_text())
    (state_a / "models" / "manifests" / "tutor.json").write_text(json.dumps({**builtin, "name": "tutor"}))
    state_b = fleet_state(model_state, tmp_path, "box-b", key)
    ModelStore(state_b / "models").import_file(big_model(tmp_path / "field-guide.gguf", 4), name="field-guide")
    # only the wall clock is wrong, as on a Pi; announcing every 2 s, as a daemon stalled by libfaketime for up to
    # 1.6 s (see below) is not taken for gone
    wall = {"LD_PRELOAD": lib, "FAKETIME_DONT_FAKE_MONOTONIC": "1", "OFFGRID_PEERS_INTERVAL": "2"}
    a = start_peer(state_a, pa, [pb], **wall, FAKETIME="+21600")  # six hours ahead
    b = start_peer(state_b, pb, [pa], **wall, FAKETIME="@1970-01-01 08:00:00", OFFGRID_PEERS_SYNC="off")
    try:
        # B believes it is 1970 (it stamps first_seen with its own clock), A that it is six hours from now
        wait_for(lambda: [p["name"] for p in peers_of(b)["peers"]] == ["box-a"], what="B to prove A")
        wait_for(lambda: [p["name"] for p in peers_of(a)["peers"]] == ["box-b"], what="A to prove B")
        [seen_by_b] = peers_of(b)["peers"]
        assert seen_by_b["first_seen"] < 86400 and seen_by_b["clock_offset_s"] > 50 * 365 * 86400
        [seen_by_a] = peers_of(a)["peers"]
        assert seen_by_a["clock_offset_s"] < -50 * 365 * 86400
        out = subprocess.run([sys.executable, "-m", "offgridd", "peers", "--url", b.url], capture_output=True,
                             text=True, timeout=30)
        assert out.returncode == 0 and "box-a" in out.stdout and "clock +2" in out.stdout, out.stdout

        # A pulls the model only B has ...
        wait_for(lambda: any(j["state"] != "running" for j in jobs(a) if j["model"] == "field-guide"),
                 what="A's pull of field-guide to end")
        assert [j["state"] for j in jobs(a) if j["model"] == "field-guide"] == ["done"]
        assert ModelStore(state_a / "models").verify("field-guide")[0]
        # ... and B passes a request for the model only A has to A
        status, headers, body = http("POST", f"{b.url}/v1/chat/completions", {
            "model": "tutor", "messages": [{"role": "user", "content": "Name a river."}], "max_tokens": 4})
        assert status == 200 and json.loads(body)["choices"][0]["message"]["content"]
        assert headers["X-Offgrid-Node"] == load_identity(state_a).node_id
        for daemon in (a, b):
            assert dropped(daemon, "replay") == dropped(daemon, "unproven") == 0
    finally:
        # not stop_all: under libfaketime, asyncio's debug mode reports steps of the daemon's start-up and of request
        # handlers at 0.6-1.9 s on the loop, against under 0.3 s for the same daemon without it; the other peer tests
        # hold the same code to the blocked-loop check
        a.stop()
        b.stop()


def test_once_every_box_has_the_rotated_key_the_old_one_is_refused_at_once(model_state, tmp_path):
    from test_peers import start_peer

    old, pa, pb = secrets.token_bytes(32), udp_port(), udp_port()
    a = start_peer(fleet_state(model_state, tmp_path, "box-a", old), pa, [pb], OFFGRID_PEERS_SYNC="off")
    b = start_peer(fleet_state(model_state, tmp_path, "box-b", old), pb, [pa], OFFGRID_PEERS_SYNC="off")
    fleet = [sys.executable, "-m", "offgridd", "fleet"]
    try:
        wait_for(lambda: peers_of(a)["peers"] and peers_of(b)["peers"], what="A and B to prove each other")
        # calls signed under the old key, held back by someone who captured them (or a box that missed the change)
        held_for_a = member_call(a, old, "GET", INVENTORY_PATH)
        held_for_b = member_call(b, old, "GET", INVENTORY_PATH)

        rotated = subprocess.run([*fleet, "rotate", "--state", str(a.state)], capture_output=True, text=True,
                                 timeout=60)
        assert rotated.returncode == 0 and "fleet join" in rotated.stderr
        new = rotated.stdout.strip()
        assert http("GET", a.url + INVENTORY_PATH, headers=held_for_a)[0] == 403, "A took the old key after rotating"
        wait_for(lambda: not peers_of(b)["peers"], what="B to forget A, whose datagrams it cannot check any more")

        joined = subprocess.run([*fleet, "join", new, "--state", str(b.state)], capture_output=True, text=True,
                                timeout=60)
        assert joined.returncode == 0
        # the last box has the new key: from this moment nobody takes the old one, not even for one interval
        status, _, body = http("GET", b.url + INVENTORY_PATH, headers=held_for_b)
        assert status == 403 and "fleet" in json.loads(body)["error"]["message"]
        wait_for(lambda: [p["name"] for p in peers_of(b)["peers"]] == ["box-a"], what="B to prove A again")
        wait_for(lambda: [p["name"] for p in peers_of(a)["peers"]] == ["box-b"], what="A to prove B again")
        assert peers_of(a)["node"]["fleet"] == peers_of(b)["node"]["fleet"]
        hmac_drops = dropped(a, "hmac")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            from offgridd.peers.protocol import PeerAnnouncement

            stale = PeerAnnouncement(node=secrets.token_hex(16), name="old-fleet", http_port=1, version="0",
                                     inventory="0" * 16, models=0, load=0, queue=0, every=1.0, boot=1, seq=1,
                                     clock=0.0)
            s.sendto(stale.encode(old), ("127.0.0.1", pa))
        wait_for(lambda: dropped(a, "hmac") > hmac_drops, what="A to drop a datagram under the old key")
    finally:
        stop_all(a, b)


def test_a_clients_credentials_go_only_to_a_peer_that_proves_itself_in_that_exchange(model_state, tmp_path):
    """A box leaves and something else takes its address before the others forget it: a request that would have
    gone there, with the client's Authorization, is not sent."""
    from test_peers import start_peer

    key, pa, pb = secrets.token_bytes(32), udp_port(), udp_port()
    state_a = fleet_state(model_state, tmp_path, "box-a", key)
    builtin = json.loads((state_a / "models" / "manifests" / "gemma3-270m.json").read_text())
    (state_a / "models" / "manifests" / "tutor.json").write_text(json.dumps({**builtin, "name": "tutor"}))
    # A announces every 30 s, so B keeps it in its table for 90 s after it goes
    a = start_peer(state_a, pa, [pb], OFFGRID_PEERS_SYNC="off", OFFGRID_PEERS_INTERVAL="30")
    b = start_peer(fleet_state(model_state, tmp_path, "box-b", key), pb, [pa], OFFGRID_PEERS_SYNC="off")
    impostor = None
    try:
        wait_for(lambda: any("tutor" in p["models"] for p in peers_of(b)["peers"]), what="B to know A's models")
        ask = {"model": "tutor", "messages": [{"role": "user", "content": "Name a river."}], "max_tokens": 4}
        status, headers, _ = http("POST", f"{b.url}/v1/chat/completions", ask,
                                  headers={"Authorization": "Bearer classroom-secret"})
        assert status == 200 and headers["X-Offgrid-Node"] == load_identity(state_a).node_id
        a_port = int(a.url.rsplit(":", 1)[1])
        a.stop()
        seen: list[tuple[str, str, dict]] = []

        class Impostor(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _any(self) -> None:
                seen.append((self.command, self.path, dict(self.headers)))
                body = b'{"node": "x", "choices": [{"message": {"content": "trust me"}}]}'
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _any

        impostor = ThreadingHTTPServer(("127.0.0.1", a_port), Impostor)
        threading.Thread(target=impostor.serve_forever, daemon=True).start()
        assert [p["name"] for p in peers_of(b)["peers"]] == ["box-a"], "B still lists A, at the impostor's address"

        status, _, body = http("POST", f"{b.url}/v1/chat/completions", ask,
                               headers={"Authorization": "Bearer classroom-secret"})
        assert status == 404 and b"trust me" not in body
        assert [(method, path) for method, path, _ in seen] == [("GET", "/fleet/v2/hello")]
        assert not any("Authorization" in headers for _, _, headers in seen)
        assert refused(b, "unsigned") >= 1
    finally:
        if impostor is not None:
            impostor.shutdown()
            impostor.server_close()
        stop_all(a, b)
