"""The engine proves itself on this CPU before a worker says ready, and an engine fault is served around.

The faults are injected exactly where the AMX bug strikes (a SIGSEGV in the first decode after load, through
OFFGRID_ENGINE_FAULT); everything around them is the real engine on the real model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import openai
from conftest import http, private_state, running_daemon, start_daemon, wait_for

from offgridd.engine_build import installed

SAFE_STEP = "engine-safe-mode"


def test_a_healthy_engine_passes_its_self_test_before_the_daemon_is_ready(daemon):
    model = daemon.health()[1]["model"]
    assert model["self_test"]["tokens"] == 4 and model["self_test"]["safe"] is False
    assert model["engine_path"] == "normal"
    assert SAFE_STEP not in {d["step"] for d in daemon.health()[1]["degraded"]}
    assert daemon.metric("offgridd_degraded", step=SAFE_STEP) == 0


def test_an_engine_that_crashes_in_its_self_test_is_served_on_the_safe_path(model_state, tmp_path):
    state = private_state(model_state, tmp_path / "state")
    env = {"OFFGRID_ENGINE_FAULT": "self-test"}
    with running_daemon(state, tmp_path / "daemon.log", env=env) as daemon:
        health = daemon.health()[1]
        assert health["model"]["engine_path"] == "safe" and health["model"]["self_test"]["safe"] is True
        step = next(d for d in health["degraded"] if d["step"] == SAFE_STEP)
        assert "SIGSEGV" in step["reason"] and "ggml-org/llama.cpp#20824" in step["reason"]
        assert daemon.metric("offgridd_degraded", step=SAFE_STEP) == 1
        assert daemon.metric("offgridd_worker_restarts_total", model="gemma3-270m") == 0
        _, _, body = http("GET", f"{daemon.url}/api/v1/status")
        assert SAFE_STEP in json.loads(body)["line"]
        assert "gemma3-270m" not in {d.get("model") for d in health["degraded"] if d["step"] == "model-bad"}

        client = openai.OpenAI(base_url=f"{daemon.url}/v1", api_key="x", max_retries=0)
        answer = client.completions.create(model="gemma3-270m", prompt="The capital of France is", max_tokens=8,
                                           temperature=0)
        assert answer.usage.completion_tokens == 8 and answer.choices[0].text.strip()
    assert "ggml-org/llama.cpp#20824" in (tmp_path / "daemon.log").read_text()


def test_an_engine_that_fails_on_the_safe_path_too_marks_the_model_bad(model_state, tmp_path):
    state = private_state(model_state, tmp_path / "state")
    daemon = start_daemon(state, tmp_path / "daemon.log", env={"OFFGRID_ENGINE_FAULT": "self-test-always"})
    try:
        health = wait_for(lambda: (h := daemon.health())[1]["status"] == "unavailable" and h, timeout=120,
                          what="the daemon to give up on the model")
        assert health[0] == 503
        bad = next(d for d in health[1]["degraded"] if d["step"] == "model-bad")
        assert "safe path too" in bad["reason"] and "SIGSEGV" in bad["reason"]
        status, headers, _ = http("POST", f"{daemon.url}/v1/completions", {"prompt": "Hi", "max_tokens": 2})
        assert status == 503 and "Retry-After" in headers
    finally:
        daemon.stop()


def doctor(state, tmp_path, env: dict | None = None) -> tuple[int, dict]:
    (tmp_path / "none.toml").write_text("")
    done = subprocess.run([sys.executable, "-m", "offgridd", "doctor", "--json", "--seconds", "1", "--state",
                           str(state)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OFFGRID_CONFIG": str(tmp_path / "none.toml"),
                               **(env or {})})
    return done.returncode, json.loads(done.stdout)


def test_doctor_reports_the_build_target_the_cpu_a_self_test_and_decode_speed(model_state, tmp_path):
    code, report = doctor(private_state(model_state, tmp_path / "state"), tmp_path)
    assert code == 0 and report["verdict"] == "ok"
    assert report["engine"] == installed()
    assert report["cpu"]["best_target"] == report["engine"]["target"]
    assert set(report["engine"]["needs"]) <= set(report["cpu"]["features"])
    normal = report["normal"]
    assert normal["compiled"]["OPENMP"] == "1" and "AMX_INT8" not in normal["compiled"]
    assert normal["self_test"]["tokens"] == 4
    assert normal["decode"]["tokens"] >= 1 and normal["decode"]["tokens_per_second"] > 0
    assert "safe" not in report and report["advice"] == []


def test_doctor_finds_an_engine_that_crashes_and_proves_the_safe_path(model_state, tmp_path):
    code, report = doctor(private_state(model_state, tmp_path / "state"), tmp_path,
                          env={"OFFGRID_ENGINE_FAULT": "self-test"})
    assert code == 1 and report["verdict"] == "safe-path"
    assert report["normal"] == {"ok": False, "safe": False, "error": "the engine died with signal SIGSEGV"}
    assert report["safe"]["ok"] and report["safe"]["decode"]["tokens_per_second"] > 0
    assert any("safe path" in line for line in report["advice"])
