"""The daemon outlives its inference worker, and a client that leaves stops its own generation."""

from __future__ import annotations

import json
import os
import signal
import threading

import openai
import pytest
from conftest import http as call
from conftest import stream_then_leave, wait_for

LONG = {"prompt": "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,", "max_tokens": 1500, "temperature": 0}



def worker_pid(daemon) -> int:
    return daemon.health()[1]["model"]["pid"]


def generating(daemon) -> bool:
    h = daemon.health()[1]
    return h["requests"]["active"] == 1 and h["requests"]["waiting"] == 0


def test_worker_killed_mid_stream_ends_that_stream_with_an_error_and_the_next_request_succeeds(own_daemon):
    client = openai.OpenAI(base_url=f"{own_daemon.url}/v1", api_key="x", max_retries=0)
    pid = worker_pid(own_daemon)
    stream = client.completions.create(model="gemma3-270m", stream=True, **LONG)
    received = []
    with pytest.raises(openai.APIError) as e:
        for chunk in stream:
            received.append(chunk.choices[0].text)
            if len(received) == 5:
                os.kill(pid, signal.SIGKILL)
    assert "worker" in str(e.value.message)
    assert len(received) < 1500

    r = client.completions.create(model="gemma3-270m", prompt="The sea is", max_tokens=8)
    assert r.usage.completion_tokens > 0
    assert worker_pid(own_daemon) != pid
    assert own_daemon.metric("offgridd_worker_restarts_total", model="gemma3-270m") == 1


def test_worker_killed_during_a_whole_request_answers_503_in_openai_shape(own_daemon):
    result = {}

    def request():
        result["answer"] = call("POST", f"{own_daemon.url}/v1/completions", LONG)

    t = threading.Thread(target=request)
    t.start()
    wait_for(lambda: generating(own_daemon), what="generation to start")
    os.kill(worker_pid(own_daemon), signal.SIGKILL)
    t.join(60)
    status, headers, body = result["answer"]
    assert status == 503
    assert "Retry-After" in headers
    error = json.loads(body)["error"]
    assert error["type"] == "server_error" and "worker" in error["message"]
    # while the worker restarts, the gauge a dashboard watches says the model is not loaded
    seen = []
    while (state := own_daemon.health()[1]["model"]["state"]) != "ready":
        loaded = own_daemon.metric("offgridd_model_loaded", model="gemma3-270m")
        if own_daemon.health()[1]["model"]["state"] == state:
            seen.append((state, loaded))
    assert seen and all(loaded == 0 for _, loaded in seen), seen
    assert own_daemon.metric("offgridd_model_loaded", model="gemma3-270m") == 1
    status, _, body = call("POST", f"{own_daemon.url}/v1/completions", {"prompt": "Hello", "max_tokens": 4})
    assert status == 200 and json.loads(body)["usage"]["completion_tokens"] > 0


def test_client_that_disconnects_mid_stream_stops_its_generation(daemon):
    before = daemon.metric("offgridd_requests_abandoned_total", model="gemma3-270m")
    tokens_before = daemon.metric("offgridd_completion_tokens_total", model="gemma3-270m")
    stream_then_leave(daemon.url, LONG, events=5)

    wait_for(lambda: daemon.metric("offgridd_requests_abandoned_total", model="gemma3-270m") > before,
             what="the worker to report the abandoned generation")
    spent = daemon.metric("offgridd_completion_tokens_total", model="gemma3-270m") - tokens_before
    assert 5 <= spent < LONG["max_tokens"]
    assert daemon.health()[1]["requests"]["active"] == 0
