"""Start-up as a person sees it: 503 until a model is ready, a clear reason when none can be, and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import time

from conftest import free_port, http, running_daemon, start_daemon


def cli(*args, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "offgridd", *args], capture_output=True, text=True, timeout=120,
                          input=stdin)


def test_first_start_answers_503_until_the_builtin_model_is_registered_and_loaded(tmp_path):
    daemon = start_daemon(tmp_path / "state", tmp_path / "daemon.log")
    try:
        first = None
        deadline = time.monotonic() + 60
        while first is None and time.monotonic() < deadline:
            try:
                first = daemon.health()
            except OSError:
                time.sleep(0.02)
        status, body = first
        assert status == 503 and body["status"] in ("starting", "loading")
        code, headers, raw = http("POST", f"{daemon.url}/v1/completions", {"prompt": "Hi", "max_tokens": 2})
        assert code == 503 and "Retry-After" in headers
        assert json.loads(raw)["error"]["type"] == "server_error"
        daemon.wait_ready()
        models = json.loads(http("GET", f"{daemon.url}/v1/models")[2])["data"]
        assert [m["id"] for m in models] == ["gemma3-270m"]
    finally:
        assert daemon.stop() == 0


def test_a_configured_model_missing_from_the_store_leaves_the_daemon_up_with_a_reason(model_state, tmp_path):
    daemon = start_daemon(model_state, tmp_path / "daemon.log", "--model", "llama-3-8b-instruct")
    try:
        deadline = time.monotonic() + 60
        body = {}
        while body.get("status") != "unavailable" and time.monotonic() < deadline:
            try:
                status, body = daemon.health()
            except OSError:
                time.sleep(0.05)
        assert status == 503
        assert "llama-3-8b-instruct" in body["reason"] and "offgridd models import" in body["reason"]
        code, headers, raw = http("POST", f"{daemon.url}/v1/chat/completions",
                                  {"messages": [{"role": "user", "content": "hi"}]})
        assert code == 503 and "Retry-After" in headers
        assert "offgridd models import" in json.loads(raw)["error"]["message"]
        assert http("GET", f"{daemon.url}/v1/models")[0] == 200  # the rest of the API keeps working
    finally:
        assert daemon.stop() == 0


def test_status_command_reports_the_running_daemon(daemon):
    r = cli("status", "--url", daemon.url)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("serving gemma3-270m")
    settings = json.loads(cli("status", "--url", daemon.url, "--settings").stdout)
    assert settings["port"] == int(daemon.url.rsplit(":", 1)[1])


def test_status_command_says_when_no_daemon_answers():
    r = cli("status", "--url", f"http://127.0.0.1:{free_port()}")
    assert r.returncode == 3 and "not answering" in r.stderr


def test_terminal_chat_streams_an_answer(daemon):
    r = cli("chat", "--url", daemon.url, stdin="What is the capital of France?\n\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()


def test_api_key_when_configured_guards_the_api_but_not_health(model_state, tmp_path):
    with running_daemon(model_state, tmp_path / "daemon.log", env={"OFFGRID_API_KEY": "lan-secret"}) as daemon:
        code, _, raw = http("GET", f"{daemon.url}/v1/models")
        assert code == 401 and json.loads(raw)["error"]["code"] == "invalid_api_key"
        code, _, _ = http("GET", f"{daemon.url}/v1/models", headers={"Authorization": "Bearer lan-secret"})
        assert code == 200
        assert daemon.health()[0] == 200
