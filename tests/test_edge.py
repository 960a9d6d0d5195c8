"""A hostile LAN at the HTTP edge (issue #14): keys with scopes and limits, the audit log, the Host allow-list,
JSON bodies that must say so and stay bounded, and inputs that used to be 500s. In-process on the real app over real
sockets; what needs the model or the daemon's server setup runs against a real daemon."""

import asyncio
import json
import socket
import subprocess
import sys
import time

import openai
import psutil
import pytest
from conftest import http, private_state, running_daemon

from offgridd import keys
from offgridd.api.app import init_app
from offgridd.daemon import MAX_CONNECTIONS_PER_CLIENT, build_runtime
from offgridd.settings import load_settings

CHAT = {"messages": [{"role": "user", "content": "hi"}]}


def runtime(tmp_path, **settings):
    rt = build_runtime(load_settings(env={}, flags={"state": str(tmp_path), **settings}))
    rt.store.open()
    return rt


def make_key(rt, name, scope="chat", **limits) -> str:
    return rt.db.run_sync(lambda db: keys.add_key(db, name, scope, **limits))


def bearer(secret: str) -> dict:
    return {"Authorization": f"Bearer {secret}"}


def lan_address() -> str | None:
    """An address of this machine that is not loopback, for a client the daemon must not take for itself."""
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family == socket.AF_INET and not a.address.startswith("127."):
                return a.address
    return None


async def raw_request(port: int, head: bytes, body: bytes = b"") -> tuple[int, bytes]:
    """Send bytes as they are (headers that are not UTF-8 included) and read the status and body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head + b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)
    await writer.drain()
    raw = await reader.read()
    writer.close()
    status = int(raw.split(b" ", 2)[1])
    return status, raw.partition(b"\r\n\r\n")[2]


@pytest.fixture
async def served(aiohttp_client, tmp_path):
    """The real app and runtime, ready to serve (no model: a request past every check gets 404 or 503)."""
    rt = runtime(tmp_path)
    rt.phase = "ready"
    client = await aiohttp_client(init_app(rt))
    yield rt, client
    rt.db.close()


async def test_keys_have_scopes_and_a_revoked_key_stops_working(served):
    rt, client = served
    admin = make_key(rt, "owner", "admin")
    resp = await client.post("/v1/chat/completions", json=CHAT, headers=bearer("placeholder"))
    assert resp.status == 404  # only admin keys: chat stays open, and a client's placeholder key is ignored
    chat, _ = make_key(rt, "phone"), make_key(rt, "laptop")
    rt.keys._loaded = float("-inf")  # as after keys.RELOAD_S
    resp = await client.post("/v1/chat/completions", json=CHAT)
    assert resp.status == 401  # a chat key exists: the API is closed to clients without one
    resp = await client.post("/v1/chat/completions", json=CHAT, headers=bearer(chat))
    assert resp.status == 404  # past the key: the store is empty
    resp = await client.delete("/api/v1/models/x", headers=bearer(chat))
    assert resp.status == 403 and (await resp.json())["error"]["code"] == "admin_key_required"
    resp = await client.delete("/api/v1/models/x", headers=bearer(admin))
    assert resp.status == 404
    resp = await client.get("/api/v1/audit", headers=bearer(chat))
    assert resp.status == 403
    resp = await client.delete("/api/v1/keys/phone", headers=bearer(admin))
    assert resp.status == 200
    rt.keys._loaded = float("-inf")  # as after keys.RELOAD_S
    resp = await client.post("/v1/chat/completions", json=CHAT, headers=bearer(chat))
    assert resp.status == 401 and (await resp.json())["error"]["code"] == "invalid_api_key"


async def test_keys_made_over_http_are_shown_once_and_stored_hashed(served):
    rt, client = served
    admin = make_key(rt, "owner", "admin")
    resp = await client.post("/api/v1/keys", json={"name": "laptop", "scope": "chat", "rpm": 30},
                             headers=bearer(admin))
    assert resp.status == 201
    made = await resp.json()
    assert made["key"].startswith("og-") and made["rpm"] == 30
    listed = await (await client.get("/api/v1/keys", headers=bearer(admin))).json()
    assert {k["name"] for k in listed["keys"]} == {"owner", "laptop"}
    assert made["key"] not in json.dumps(listed)
    stored = rt.db.run_sync(lambda db: [r["hash"] for r in db["keys"].rows])
    assert keys.digest(made["key"].encode()) in stored and made["key"] not in stored
    resp = await client.post("/api/v1/keys", json={"name": "laptop"}, headers=bearer(admin))
    assert resp.status == 400 and "exists" in (await resp.json())["error"]["message"]
    resp = await client.post("/api/v1/keys", json={"name": "x", "scope": "root"}, headers=bearer(admin))
    assert resp.status == 400


async def test_a_key_over_its_requests_per_minute_gets_429_with_retry_after(served):
    rt, client = served
    limited = make_key(rt, "kiosk", rpm=2)
    statuses = [(await client.get("/v1/models", headers=bearer(limited))).status for _ in range(3)]
    assert statuses == [200, 200, 429]
    resp = await client.get("/v1/models", headers=bearer(limited))
    assert resp.status == 429 and 1 <= int(resp.headers["Retry-After"]) <= 30
    assert (await resp.json())["error"]["code"] == "rate_limit_exceeded"
    other = make_key(rt, "other")
    rt.keys._loaded = float("-inf")
    assert (await client.get("/v1/models", headers=bearer(other))).status == 200  # limits are per key


async def test_the_audit_log_names_keys_never_secrets(served):
    rt, client = served
    admin, _ = make_key(rt, "owner", "admin"), make_key(rt, "phone")  # a chat key closes the API
    await client.delete("/api/v1/models/gone", headers=bearer(admin))
    await client.get("/v1/models", headers=bearer("og-not-a-key"))
    await client.get("/v1/models", headers=bearer("og-not-a-key"))  # the same refusal again: recorded once
    entries = (await (await client.get("/api/v1/audit", headers=bearer(admin))).json())["entries"]
    actions = [(e["action"], e["key"], e["outcome"]) for e in entries]
    assert ("DELETE /api/v1/models/gone", "owner", "404") in actions
    assert actions.count(("GET /v1/models", None, "refused: unknown key")) == 1
    assert all(e["client"] == "127.0.0.1" for e in entries)
    text = json.dumps(entries)
    assert admin not in text and "og-not-a-key" not in text


async def test_without_an_admin_key_admin_actions_come_from_the_box_only(aiohttp_client, tmp_path):
    address = lan_address()
    if address is None:
        pytest.skip("this machine has no address besides loopback")
    rt = runtime(tmp_path)
    rt.phase = "ready"
    local = await aiohttp_client(init_app(rt))
    resp = await local.delete("/api/v1/models/x")
    assert resp.status == 404  # from the box itself: allowed, and there is no such model
    from aiohttp.test_utils import TestClient, TestServer

    async with TestClient(TestServer(init_app(rt), host=address)) as lan:
        resp = await lan.delete("/api/v1/models/x")
        assert resp.status == 403
        assert "offgridd keys add" in (await resp.json())["error"]["message"]
        assert (await lan.get("/v1/models")).status == 200  # chat stays open: no chat key exists
    rt.db.close()


@pytest.mark.parametrize(("host", "status"), [
    ("evil.example.com", 421), ("evil.example.com:11611", 421), ("127.0.0.1:11611", 200), ("[::1]:11611", 200),
    ("192.168.1.20", 200), ("localhost", 200), ("offgrid-ab12.local", 200), ("box.lan", 200),
])
async def test_only_the_box_s_own_names_are_answered(aiohttp_client, tmp_path, host, status):
    rt = runtime(tmp_path, allowed_hosts="box.lan")
    client = await aiohttp_client(init_app(rt))
    resp = await client.get("/v1/models", headers={"Host": host})
    assert resp.status == status
    if status == 421:
        assert (await resp.json())["error"]["code"] == "misdirected_request"
    rt.db.close()


async def test_a_json_body_must_say_it_is_json(served):
    _, client = served
    resp = await client.post("/v1/chat/completions", data=json.dumps(CHAT), headers={"Content-Type": "text/plain"})
    assert resp.status == 415  # what a cross-site form post sends, without a preflight
    resp = await client.post("/v1/chat/completions", data=json.dumps(CHAT))
    assert resp.status == 415


@pytest.mark.parametrize("body", [b"[" * 200_000, b'{"messages": [' + b'{"role": "user", "content": "x"},' * 30_000 +
                                  b'{"role": "user", "content": "x"}]}'])
async def test_a_body_with_too_many_values_is_refused_before_it_is_parsed(served, body):
    _, client = served
    resp = await client.post("/v1/chat/completions", data=body, headers={"Content-Type": "application/json"})
    assert resp.status == 413 and (await resp.json())["error"]["code"] == "request_too_large"


async def test_deep_nesting_within_the_count_is_a_400_not_a_500(served):
    _, client = served
    resp = await client.post("/v1/completions", data=b"[" * 5000 + b"]" * 5000,
                             headers={"Content-Type": "application/json"})
    assert resp.status == 400


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "a\\ud800b"}]}', "messages[0].content"),
    ("/v1/completions", '{"prompt": "\\udfff"}', "prompt"),
    ("/v1/completions", '{"prompt": "x", "stop": ["\\ud800"]}', "stop"),
    ("/v1/embeddings", '{"input": ["ok", "\\ud800"]}', "input"),
])
async def test_a_lone_surrogate_is_a_400_naming_where(served, path, body, param):
    _, client = served
    resp = await client.post(path, data=body, headers={"Content-Type": "application/json"})
    assert resp.status == 400 and (await resp.json())["error"]["param"] == param


async def test_too_many_messages_or_parts_are_refused(served):
    _, client = served
    resp = await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}] * 1025})
    assert resp.status == 400 and (await resp.json())["error"]["param"] == "messages"
    parts = [{"type": "text", "text": "x"}] * 65
    resp = await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": parts}]})
    assert resp.status == 400


@pytest.mark.parametrize("head", [
    b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer \xff\xfe\xc3\x28\r\n",
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    b"X-Offgrid-Hop: x\r\nX-Offgrid-Fleet: v2 \xff\xfe \xb2 \xb2 x \xb2 y z\r\n",
])
async def test_headers_that_are_not_utf8_are_refused_not_crashed_on(served, head):
    rt, client = served
    make_key(rt, "phone")  # keys are checked
    status, body = await raw_request(client.port, head, json.dumps(CHAT).encode())
    assert 400 <= status < 500, body
    assert "error" in json.loads(body)


async def test_a_usb_import_body_that_is_not_utf8_is_a_400(served):
    _, client = served
    status, body = await raw_request(
        client.port, b"POST /api/v1/usb/import HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n",
        b'{"path": "/\xff\xfe"}')
    assert status == 400, body
    resp = await client.post("/api/v1/usb/import", json={"path": "/media/\x00stick"})
    assert resp.status == 400


async def test_event_streams_are_bounded(served):
    rt, client = served
    from offgridd.api.native import MAX_EVENT_STREAMS

    streams = [await client.get("/api/v1/events") for _ in range(MAX_EVENT_STREAMS)]
    assert all(s.status == 200 for s in streams)
    resp = await client.get("/api/v1/events")
    assert resp.status == 503 and resp.headers["Retry-After"]
    for s in streams:
        s.close()


def test_keys_from_the_command_line_guard_a_running_daemon(model_state, tmp_path):
    """`offgridd keys add` on the box, the official client with the key, and tokens per minute that run out."""
    state = private_state(model_state, tmp_path / "state")
    made = subprocess.run([sys.executable, "-m", "offgridd", "keys", "add", "app", "--tpm", "20", "--state",
                           str(state)], capture_output=True, text=True, check=True)
    secret = made.stdout.strip()
    assert secret.startswith("og-") and "shown this once" in made.stderr
    with running_daemon(state, tmp_path / "daemon.log") as daemon:
        assert http("GET", f"{daemon.url}/v1/models")[0] == 401
        client = openai.OpenAI(base_url=f"{daemon.url}/v1", api_key=secret, max_retries=0)
        reply = client.chat.completions.create(model="gemma3-270m", max_tokens=40, temperature=0,
                                               messages=[{"role": "user", "content": "Count to twenty."}])
        assert reply.usage.total_tokens > 20  # more than the key's minute: its prompt alone
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(model="gemma3-270m", max_tokens=5,
                                           messages=[{"role": "user", "content": "hi"}])
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{daemon.url}/v1", api_key="og-wrong", max_retries=0).models.list()
    listed = subprocess.run([sys.executable, "-m", "offgridd", "audit", "--json", "--state", str(state)],
                            capture_output=True, text=True, check=True)
    entries = json.loads(listed.stdout)
    assert [e["action"] for e in entries if e["action"].startswith("keys add")] == ["keys add app"]
    assert secret not in listed.stdout


def test_one_client_cannot_hold_every_connection_and_idle_ones_are_closed(model_state, tmp_path):
    with running_daemon(model_state, tmp_path / "daemon.log") as daemon:
        port = int(daemon.url.rsplit(":", 1)[1])
        held = [socket.create_connection(("127.0.0.1", port)) for _ in range(MAX_CONNECTIONS_PER_CLIENT)]
        extra = socket.create_connection(("127.0.0.1", port))
        extra.settimeout(5)
        assert extra.recv(1) == b""  # closed at once: that address holds its share
        extra.close()
        held.pop().close()
        time.sleep(0.2)
        assert http("GET", f"{daemon.url}/health")[0] == 200  # a freed slot serves again
        for s in held:
            s.settimeout(25)
        started = time.monotonic()
        assert held[0].recv(1) == b""  # an idle connection is closed by the daemon
        assert time.monotonic() - started < 20
        for s in held:
            s.close()
