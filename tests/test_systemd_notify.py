"""The sd_notify protocol as systemd would see it, through a NOTIFY_SOCKET the test listens on."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time

import openai
import pytest
from conftest import http, running_daemon, start_daemon


class NotifyListener:
    """A datagram socket standing in for systemd's notification socket."""

    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.path = path
        self.messages: list[tuple[float, dict[str, str]]] = []
        self.health_at_ready: int | None = None
        self.url = ""
        self._done = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._done:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            if fields.get("READY") == "1" and self.url:
                self.health_at_ready = http("GET", f"{self.url}/health")[0]
            self.messages.append((time.monotonic(), fields))

    def wait_for(self, key, value=None, timeout=120):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for _, fields in self.messages:
                if key in fields and (value is None or fields[key] == value):
                    return fields
            time.sleep(0.05)
        raise TimeoutError(f"no {key}={value} in {self.messages}")

    def count(self, key):
        return sum(key in f for _, f in self.messages)

    def close(self):
        self._done = True
        self._thread.join()
        self.sock.close()


@pytest.fixture
def notified(model_state, tmp_path):
    listener = NotifyListener(tmp_path / "notify.sock")
    daemon = start_daemon(model_state, tmp_path / "daemon.log", env={
        "NOTIFY_SOCKET": str(listener.path), "WATCHDOG_USEC": "1000000", "OFFGRID_DRAIN_SECONDS": "60"})
    listener.url = daemon.url
    try:
        yield daemon, listener
    finally:
        daemon.stop()
        listener.close()


def test_ready_is_sent_once_the_api_answers_with_a_human_status_and_watchdog_pings(notified):
    daemon, listener = notified
    ready = listener.wait_for("READY", "1")
    assert listener.health_at_ready == 200
    assert ready["STATUS"].startswith("serving gemma3-270m")
    first_ping = listener.wait_for("WATCHDOG", "1")
    assert first_ping == {"WATCHDOG": "1"}
    time.sleep(1.6)  # WATCHDOG_USEC is 1 s: pings come every half second
    assert listener.count("WATCHDOG") >= 3
    assert daemon.stop() == 0
    stopping = listener.wait_for("STOPPING", "1")
    assert "stopping" in stopping["STATUS"]


def test_status_line_counts_requests_and_speed(notified):
    daemon, listener = notified
    listener.wait_for("READY", "1")
    client = openai.OpenAI(base_url=f"{daemon.url}/v1", api_key="x", max_retries=0)
    client.completions.create(model="gemma3-270m", prompt="1, 2, 3,", max_tokens=16, temperature=0)
    line = listener.wait_for("STATUS")  # keep looking until the periodic update reports the request
    deadline = time.monotonic() + 15
    while "1 requests" not in line["STATUS"] and time.monotonic() < deadline:
        time.sleep(0.2)
        line = [f for _, f in listener.messages if "STATUS" in f][-1]
    assert "1 requests" in line["STATUS"]
    assert "tok/s" in line["STATUS"] and "% RAM" in line["STATUS"]


def test_sigterm_drains_an_in_flight_stream_and_refuses_new_work(notified):
    daemon, listener = notified
    listener.wait_for("READY", "1")
    client = openai.OpenAI(base_url=f"{daemon.url}/v1", api_key="x", max_retries=0)
    stream = client.completions.create(model="gemma3-270m", prompt="Once upon a time", max_tokens=100,
                                       temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = [next(iter(stream))]
    daemon.proc.send_signal(signal.SIGTERM)
    listener.wait_for("STOPPING", "1")
    status, headers, body = http("POST", f"{daemon.url}/v1/completions", {"prompt": "Hi", "max_tokens": 2})
    assert status == 503 and "Retry-After" in headers
    assert "stopping" in json.loads(body)["error"]["message"]
    chunks += list(stream)
    assert chunks[-1].usage is not None  # the stream ran to its end, usage chunk included
    assert daemon.proc.wait(60) == 0


def test_drain_is_bounded_and_ends_streams_that_run_past_it(model_state, tmp_path):
    with running_daemon(model_state, tmp_path / "daemon.log", env={"OFFGRID_DRAIN_SECONDS": "1"}) as daemon:
        client = openai.OpenAI(base_url=f"{daemon.url}/v1", api_key="x", max_retries=0)
        stream = client.completions.create(model="gemma3-270m", prompt="1, 2, 3, 4, 5,", max_tokens=1800,
                                           temperature=0, stream=True)
        next(iter(stream))
        daemon.proc.send_signal(signal.SIGTERM)
        assert daemon.proc.wait(30) == 0
        with pytest.raises(openai.APIConnectionError):  # cut off: no [DONE] ever came
            for _ in stream:
                pass
