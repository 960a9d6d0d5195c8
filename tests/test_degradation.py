"""The daemon bends instead of breaking: board fixture trees drive memory, heat and load; faults fall back."""

from __future__ import annotations

import ctypes
import json
import os
import signal
import threading
import time

import llama_cpp
import openai
import pytest
from boards import board_tree, set_temperature, write_meminfo
from conftest import http, private_state, running_daemon, start_daemon, wait_for

from offgridd.store import ModelStore

PI4_2GB_KB = 1891692



def degraded_steps(daemon) -> set[str]:
    return {d["step"] for d in daemon.health()[1]["degraded"]}


def complete(daemon, model="gemma3-270m", max_tokens=4) -> tuple[int, dict, dict]:
    status, headers, body = http("POST", f"{daemon.url}/v1/completions",
                                 {"model": model, "prompt": "The sea is", "max_tokens": max_tokens})
    return status, headers, json.loads(body)


@pytest.fixture
def pi4(model_state, tmp_path):
    """A daemon that believes it runs on a Raspberry Pi 4 with 2 GB, sampling its fixture tree often."""
    root = board_tree(tmp_path / "root", "pi4-2gb", available_fraction=0.6)
    with running_daemon(private_state(model_state, tmp_path / "state"), tmp_path / "daemon.log",
                        board_settings=True, env={"OFFGRID_HARDWARE_ROOT": str(root), "OFFGRID_THREADS": "2",
                                                  "OFFGRID_HARDWARE_SAMPLE_SECONDS": "0.3"}) as daemon:
        yield daemon, root


def test_a_pi4_2gb_gets_its_profile_and_a_short_context(pi4):
    daemon, _ = pi4
    health = daemon.health()[1]
    assert health["profile"]["id"] == "pi4-2gb"
    assert health["model"]["n_ctx"] == 1024
    assert health["queue"]["depth"] == 4 and health["services"]["hardware"]["limits"]["threads"] == 2
    assert complete(daemon)[0] == 200


def test_memory_pressure_steps_down_and_back_up(pi4):
    daemon, root = pi4
    write_meminfo(root, PI4_2GB_KB, int(PI4_2GB_KB * 0.05))
    wait_for(lambda: "memory-pressure" in degraded_steps(daemon), what="memory pressure")
    assert daemon.health()[1]["queue"]["depth"] == 2
    # the idle model is unloaded to give memory back, after the step is shown
    wait_for(lambda: daemon.health()[1]["loaded"] == {}, what="idle model unloaded")
    assert daemon.metric("offgridd_degraded", step="memory-pressure") == 1
    status, headers, body = complete(daemon)
    assert status == 503 and "Retry-After" in headers
    assert "MB are available" in body["error"]["message"]
    line = json.loads(http("GET", f"{daemon.url}/api/v1/status")[2])["line"]
    assert "degraded: memory-pressure" in line

    write_meminfo(root, PI4_2GB_KB, int(PI4_2GB_KB * 0.15))  # between the thresholds: still down
    time.sleep(1.0)
    assert "memory-pressure" in degraded_steps(daemon)
    write_meminfo(root, PI4_2GB_KB, int(PI4_2GB_KB * 0.6))
    wait_for(lambda: "memory-pressure" not in degraded_steps(daemon), what="recovery")
    assert daemon.health()[1]["queue"]["depth"] == 4
    assert complete(daemon)[0] == 200  # loaded again on demand


def test_heat_lowers_threads_and_critical_heat_stops_new_work_until_it_cools(pi4):
    daemon, root = pi4
    set_temperature(root, 78.0)  # the Pi 4 profile throttles at 75 °C
    wait_for(lambda: "hot" in degraded_steps(daemon), what="throttle step")
    assert daemon.metric("offgridd_threads") == 1
    assert daemon.health()[1]["queue"]["slots"] == 1
    assert complete(daemon)[0] == 200
    set_temperature(root, 84.0)  # critical at 82 °C
    wait_for(lambda: "critical-temperature" in degraded_steps(daemon), what="critical step")
    status, headers, body = complete(daemon)
    assert status == 503 and int(headers["Retry-After"]) >= 1 and "84°C" in body["error"]["message"]
    assert daemon.metric("offgridd_admission_rejected_total", reason="paused") >= 1
    set_temperature(root, 55.0)
    wait_for(lambda: not degraded_steps(daemon), what="cooling down")
    assert daemon.metric("offgridd_threads") == 2
    assert complete(daemon)[0] == 200


def test_when_no_model_fits_the_daemon_stays_up_and_says_why(model_state, tmp_path):
    root = board_tree(tmp_path / "root", "pi4-2gb", available_fraction=0.1)
    daemon = start_daemon(private_state(model_state, tmp_path / "state"), tmp_path / "daemon.log",
                          board_settings=True, env={"OFFGRID_HARDWARE_ROOT": str(root), "OFFGRID_THREADS": "2"})
    try:
        body = wait_for(lambda: (h := daemon.health()[1])["status"] == "unavailable" and h, what="unavailable")
        assert "gemma3-270m needs" in body["reason"] and "smaller quantization" in body["reason"]
        status, _, err = complete(daemon)
        assert status == 503 and "needs" in err["error"]["message"]
        assert http("GET", f"{daemon.url}/v1/models")[0] == 200
    finally:
        daemon.stop()


@pytest.fixture(scope="session")
def f16_model(tmp_path_factory, model_state) -> str:
    """A larger copy of the built-in model (F16, ~540 MB) made with llama.cpp's own quantizer."""
    out = tmp_path_factory.mktemp("f16") / "gemma3-270m-f16.gguf"
    store = ModelStore(model_state / "models")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_F16
    params.allow_requantize = True
    params.nthread = 2
    src = str(store.path_of(store.get("gemma3-270m"))).encode()
    assert llama_cpp.llama_model_quantize(src, str(out).encode(), ctypes.byref(params)) == 0
    return str(out)


def test_a_memory_limit_that_a_model_cannot_load_under_falls_back_to_one_that_can(model_state, f16_model, tmp_path):
    state = private_state(model_state, tmp_path / "state")
    ModelStore(state / "models").import_file(f16_model, name="gemma3-270m-f16")
    # measured: a worker peaks near 1.71 GB of address space with the Q4_K_M model, near 1.98 GB with F16
    with running_daemon(state, tmp_path / "daemon.log", "--model", "gemma3-270m-f16",
                        env={"OFFGRID_WORKER_MEMORY_LIMIT": str(1_850_000_000)}) as daemon:
        health = daemon.health()[1]
        bad = [d for d in health["degraded"] if d["step"] == "model-bad"]
        assert [d["model"] for d in bad] == ["gemma3-270m-f16"] and "failed to load" in bad[0]["reason"]
        substituted = [d for d in health["degraded"] if d["step"] == "model-substituted"]
        assert "serving gemma3-270m instead" in substituted[0]["reason"]
        status, _, body = complete(daemon, model="gemma3-270m-f16")
        assert status == 200 and body["model"] == "gemma3-270m"


def test_a_model_whose_worker_keeps_crashing_is_marked_bad_and_the_next_one_serves(model_state, tmp_path):
    state = private_state(model_state, tmp_path / "state")
    store = ModelStore(state / "models")
    store.import_file(store.path_of(store.get("gemma3-270m")), name="gemma-spare")
    with running_daemon(state, tmp_path / "daemon.log") as daemon:
        for crash in range(3):  # each during a request: a crash while idle is not held against the model
            pid = wait_for(lambda: (h := daemon.health()[1])["model"]["state"] == "ready" and h["model"]["pid"],
                           what="worker ready")
            answers = []
            asking = threading.Thread(target=lambda a=answers: a.append(complete(daemon, max_tokens=2000)[0]))
            asking.start()
            wait_for(lambda: daemon.health()[1]["requests"]["active"], what="a request in progress")
            os.kill(pid, signal.SIGKILL)
            asking.join(60)
            assert answers == [503]  # the request in flight is answered, not left hanging
            if crash < 2:
                wait_for(lambda p=pid: daemon.health()[1]["model"]["pid"] not in (p, None), what="restart")
        wait_for(lambda: "model-bad" in degraded_steps(daemon), what="model marked bad")
        status, _, body = complete(daemon)
        assert status == 200 and body["model"] == "gemma-spare"
        reasons = [d["reason"] for d in daemon.health()[1]["degraded"] if d["step"] == "model-bad"]
        assert "crashed 3 times" in reasons[0]


def test_a_burst_past_the_queue_gets_503_with_retry_after_and_never_500(model_state, tmp_path):
    with running_daemon(model_state, tmp_path / "daemon.log",
                        env={"OFFGRID_PARALLEL": "1", "OFFGRID_QUEUE_DEPTH": "2"}) as daemon:
        results = []

        def one():
            status, headers, _ = complete(daemon, max_tokens=24)
            results.append((status, "Retry-After" in headers))

        threads = [threading.Thread(target=one) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        statuses = sorted(s for s, _ in results)
        assert len(results) == 8 and set(statuses) <= {200, 503}
        assert statuses.count(200) >= 3 and statuses.count(503) >= 1
        assert all(retry for s, retry in results if s == 503)
        assert daemon.metric("offgridd_admission_rejected_total", reason="queue_full") == statuses.count(503)


def test_an_idle_model_is_unloaded_after_keep_alive_and_loaded_again_on_demand(model_state, tmp_path):
    with running_daemon(model_state, tmp_path / "daemon.log",
                        env={"OFFGRID_KEEP_ALIVE": "1", "OFFGRID_HARDWARE_SAMPLE_SECONDS": "0.3"}) as daemon:
        wait_for(lambda: daemon.health()[1]["loaded"] == {}, what="keep_alive unload")
        client = openai.OpenAI(base_url=f"{daemon.url}/v1", api_key="x", max_retries=0)
        r = client.completions.create(model="gemma3-270m", prompt="Hello", max_tokens=4)
        assert r.usage.completion_tokens > 0
        assert daemon.health()[1]["loaded"] == {"gemma3-270m": "ready"}
