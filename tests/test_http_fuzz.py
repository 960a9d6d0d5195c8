"""Fuzzing the HTTP edge (issue #14): hypothesis sends hostile requests (methods, paths, headers that are not UTF-8,
bodies of every shape and encoding) over a real socket to the real app, and every answer must be a 4xx (or a 2xx
where the request happens to be fine) in OpenAI's error shape: never a 500, never a dropped connection.

The classes of input are counted with hypothesis' `event()`; `pytest --hypothesis-show-statistics` prints them.
"""

import asyncio
import json
import socket
import threading

import pytest
from aiohttp import web
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from offgridd.api.app import init_app
from offgridd.daemon import build_runtime
from offgridd.settings import load_settings

PATHS = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models", "/v1/models/x%00y",
         "/api/v1/usb/import", "/api/v1/keys", "/api/v1/models/..%2F..%2Fetc", "/api/v1/audit?since=x",
         "/fleet/v2/inventory", "/fleet/v2/blob/" + "a" * 64, "/v1/../../etc/passwd", "/%ff%fe"]
POSTS = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/api/v1/usb/import", "/api/v1/keys"]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=12), inner, max_size=6),
    max_leaves=40)
chat_like = st.fixed_dictionaries({}, optional={
    "model": st.text(max_size=20) | st.integers(), "messages": json_values | st.lists(st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system", "assistant", "tool", "x"]), "content": json_values}),
        max_size=4),
    "prompt": json_values, "input": json_values, "n": json_values, "max_tokens": json_values, "stop": json_values,
    "temperature": json_values, "stream": json_values, "stream_options": json_values, "path": json_values,
    "name": json_values, "scope": json_values, "seed": json_values, "logprobs": json_values,
    "response_format": json_values, "tools": json_values})
header_values = st.binary(max_size=40).filter(lambda b: b"\r" not in b and b"\n" not in b)


@st.composite
def requests(draw):
    kind = draw(st.sampled_from(["json", "json-like", "bytes", "nested", "surrogates"]))
    event(f"body: {kind}")
    if kind == "json":
        body = json.dumps(draw(json_values)).encode()
    elif kind == "json-like":
        body = json.dumps(draw(chat_like)).encode()
    elif kind == "bytes":
        body = draw(st.binary(max_size=300))
    elif kind == "nested":
        depth = draw(st.integers(1, 100_000))
        body = b"[" * depth + b"]" * draw(st.integers(0, depth))
    else:
        body = b'{"messages": [{"role": "user", "content": "\\ud8' + draw(st.sampled_from([b"00", b"ff", b"3d"])) + \
            b'"}], "prompt": "\\udc00", "input": "\\ud800"}'
    method = draw(st.sampled_from(["POST", "POST", "GET", "DELETE", "PUT"]))
    path = draw(st.sampled_from(POSTS if method == "POST" else PATHS))
    headers = {b"Content-Type": draw(st.sampled_from([b"application/json", b"text/plain", b"application/json; "
                                                      b"charset=latin-1", b"multipart/form-data", b"\xff"]))}
    for name in draw(st.lists(st.sampled_from([b"Authorization", b"X-Offgrid-Fleet", b"X-Offgrid-Hop",
                                               b"X-Offgrid-Challenge", b"Host", b"Accept-Encoding"]),
                              max_size=3, unique=True)):
        headers[name] = draw(st.sampled_from([b"Bearer ", b"", b"v2 "])) + draw(header_values)
        event(f"header: {name.decode()}")
    event(f"{method} {path.split('?')[0][:24]}")
    return method, path, headers, body


class Server:
    """The real app on a real socket, served from a loop in a thread so hypothesis can drive it synchronously."""

    def __init__(self, state):
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.state = state
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        self.ready.wait(30)

    def _run(self):
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._start())
        self.ready.set()
        self.loop.run_forever()

    async def _start(self):
        self.rt = build_runtime(load_settings(env={}, flags={"state": str(self.state), "max_body_bytes": 1 << 20}))
        self.rt.store.open()
        self.rt.phase = "ready"
        self.runner = web.AppRunner(init_app(self.rt), handler_cancellation=True)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = self.runner.addresses[0][1]

    def close(self):
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.rt.db.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("fuzz-state"))
    yield s
    s.close()


def send(port: int, method: str, path: str, headers: dict[bytes, bytes], body: bytes) -> tuple[int, bytes]:
    head = f"{method} {path} HTTP/1.1\r\n".encode() + b"".join(k + b": " + v + b"\r\n" for k, v in headers.items())
    if b"Host" not in headers:
        head += b"Host: 127.0.0.1\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(head + b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)
        raw = b""
        while chunk := s.recv(65536):
            raw += chunk
    status_line, _, rest = raw.partition(b"\r\n")
    return int(status_line.split(b" ")[1]), rest.partition(b"\r\n\r\n")[2]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests())
def test_no_request_is_answered_with_a_500(server, request_):
    method, path, headers, body = request_
    status, answer = send(server.port, method, path, headers, body)
    event(f"status {status}")
    assert status < 500, (status, answer[:300])
    if status >= 400 and answer.startswith(b"{"):
        error = json.loads(answer)["error"]
        assert error["message"] and error["type"]
    elif status >= 400:  # only aiohttp's own parser answers in plain text: a request line or header it refuses
        assert status == 400, answer[:200]
        event("refused by aiohttp's HTTP parser")
