"""Fixtures that run the real daemon as a subprocess on the real built-in model."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from http.client import HTTPConnection
from pathlib import Path
from urllib.parse import urlparse

import pytest

from offgridd.store import ModelStore, register_builtin

# asyncio debug mode (PYTHONASYNCIODEBUG) logs each callback that holds the loop over 100 ms. On 2 cores shared with
# llama.cpp's spinning threads a callback can be descheduled for a while, so the fixtures fail only past BLOCKED_S:
# real blocking work (hashing, copying, a sqlite write) on the loop takes far longer than that.
BLOCKED_LOOP = re.compile(r"Executing (.*) took (\d+\.\d+) seconds")
BLOCKED_S = 0.3


def wait_for(predicate, timeout: float = 60, what: str = "a condition"):
    """Poll until `predicate()` is truthy and return its value; a daemon not listening yet counts as not yet."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if value := predicate():
                return value
        except OSError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method: str, url: str, body: bytes | dict | None = None, headers: dict | None = None,
         timeout: float = 60) -> tuple[int, dict, bytes]:
    """A plain HTTP call: (status, headers, body), HTTP errors included."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    if isinstance(body, dict):
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def stream_then_leave(url: str, body: dict, events: int) -> None:
    """Stream a completion, read `events` of its events, then drop the connection, as a client that leaves does."""
    where = urlparse(url)
    conn = HTTPConnection(where.hostname, where.port, timeout=60)
    conn.request("POST", "/v1/completions", json.dumps({**body, "stream": True}), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    for _ in range(events):
        assert resp.readline().startswith(b"data: ")
        assert resp.readline() == b"\n"
    conn.sock.shutdown(2)
    conn.close()


class EventLog(threading.Thread):
    """Reads /api/v1/events in the background, as the UI does."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url, self.events = url, []
        self.start()

    def run(self) -> None:
        with urllib.request.urlopen(f"{self.url}/api/v1/events", timeout=120) as resp:
            kind = None
            for raw in resp:
                line = raw.decode().rstrip("\n")
                if line.startswith("event: "):
                    kind = line[7:]
                elif line.startswith("data: "):
                    self.events.append((kind, json.loads(line[6:])))

    def of(self, kind: str) -> list[dict]:
        return [data for k, data in list(self.events) if k == kind]


@dataclass
class Daemon:
    proc: subprocess.Popen
    url: str
    state: Path
    log: Path

    def health(self) -> tuple[int, dict]:
        status, _, body = http("GET", f"{self.url}/health", timeout=10)
        return status, json.loads(body)

    def metric(self, name: str, **labels) -> float:
        _, _, body = http("GET", f"{self.url}/metrics")
        want = ",".join(f'{k}="{v}"' for k, v in labels.items())
        for line in body.decode().splitlines():
            key, _, value = line.rpartition(" ")
            if key == name or (labels and key.startswith(name + "{") and all(
                    f'{k}="{v}"' in key for k, v in labels.items())):
                return float(value)
        raise KeyError(f"{name}{{{want}}} not in /metrics")

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                if self.health()[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"daemon not ready after {timeout}s:\n{self.log.read_text()}")

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def blocked_loop_reports(self) -> list[str]:
        """Callbacks that held the daemon's event loop too long (asyncio's own exit-time thread join aside)."""
        return [m.group(0) for m in BLOCKED_LOOP.finditer(self.log.read_text())
                if float(m.group(2)) > BLOCKED_S and "shutdown_default_executor" not in m.group(1)]


def start_daemon(state: Path, log: Path, *args: str, env: dict | None = None, port: int | None = None,
                 board_settings: bool = False) -> Daemon:
    """Run `offgridd serve`; 2 threads and ctx 2048 unless board_settings leaves them to the board profile."""
    port = port or free_port()
    full_env = {**os.environ, "PYTHONASYNCIODEBUG": "1", "OFFGRID_CONFIG": str(state / "none.toml"),
                "OFFGRID_PEERS_ENABLED": "false", **(env or {})}  # peer tests turn peers on
    if "NOTIFY_SOCKET" not in (env or {}):
        full_env.pop("NOTIFY_SOCKET", None)
    (state / "none.toml").parent.mkdir(parents=True, exist_ok=True)
    (state / "none.toml").write_text("")
    proc = subprocess.Popen(
        [sys.executable, "-m", "offgridd", "serve", "--host", "127.0.0.1", "--port", str(port), "--state", str(state),
         *([] if board_settings else ["--threads", "2", "--ctx", "2048"]), *args],
        stdout=subprocess.DEVNULL, stderr=open(log, "wb"), env=full_env,
    )
    return Daemon(proc=proc, url=f"http://127.0.0.1:{port}", state=state, log=log)


def private_state(model_state: Path, dest: Path) -> Path:
    """A state directory of its own holding the built-in model, its blob hard-linked rather than copied."""
    for part in ("manifests", "blobs"):
        shutil.copytree(model_state / "models" / part, dest / "models" / part, copy_function=os.link)
    return dest


@pytest.fixture(scope="session")
def model_state(tmp_path_factory) -> Path:
    """A state directory holding the built-in model, registered once per test session."""
    state = tmp_path_factory.mktemp("state")
    store = ModelStore(state / "models")
    store.open()
    register_builtin(store)
    return state


@contextlib.contextmanager
def running_daemon(state: Path, log: Path, *args: str, **kwargs) -> Iterator[Daemon]:
    """A daemon that is ready inside the block and stopped after it; fails the test if its event loop was blocked."""
    daemon = start_daemon(state, log, *args, **kwargs)
    try:
        daemon.wait_ready()
        yield daemon
    finally:
        daemon.stop()
    blocked = daemon.blocked_loop_reports()
    assert not blocked, f"the daemon's event loop was blocked: {blocked}"


def _run_daemon(state: Path, log: Path, *args: str, **kwargs):
    with running_daemon(state, log, *args, **kwargs) as daemon:
        yield daemon


@pytest.fixture(scope="session")
def daemon(model_state, tmp_path_factory):
    """One daemon shared by tests that do not hurt it."""
    yield from _run_daemon(model_state, tmp_path_factory.mktemp("logs") / "daemon.log")


@pytest.fixture
def own_daemon(model_state, tmp_path):
    """A daemon for one test that kills workers or stops the daemon."""
    yield from _run_daemon(model_state, tmp_path / "daemon.log")
