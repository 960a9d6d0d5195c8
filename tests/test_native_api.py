"""The native API the UI and the CLI use: store, jobs, events, and the admin key on state changes."""

from __future__ import annotations

import json

from conftest import EventLog, http, private_state, running_daemon, wait_for
from gguf_factory import write_gguf

from offgridd.store import ModelStore


def test_events_stream_starts_with_a_status_snapshot(daemon):
    events = EventLog(daemon.url)
    wait_for(lambda: events.events, what="the first event")
    kind, status = events.events[0]
    assert kind == "status"
    assert status["status"] == "ready" and status["line"].startswith("serving")


def test_native_models_and_jobs(daemon):
    status, _, body = http("GET", f"{daemon.url}/api/v1/models")
    assert status == 200
    [model] = [m for m in json.loads(body)["models"] if m["name"] == "gemma3-270m"]
    assert model["default"] is True and model["loaded"] == "ready" and model["quantization"] == "Q4_K_M"
    status, _, body = http("GET", f"{daemon.url}/api/v1/jobs")
    assert status == 200 and json.loads(body)["jobs"] == []


def test_deleting_a_model_needs_the_admin_key_when_one_is_set(model_state, tmp_path):
    state = private_state(model_state, tmp_path / "state")
    ModelStore(state / "models").import_file(write_gguf(tmp_path / "extra.gguf"), name="extra")
    with running_daemon(state, tmp_path / "daemon.log", env={"OFFGRID_ADMIN_KEY": "owner"}) as daemon:
        status, _, body = http("DELETE", f"{daemon.url}/api/v1/models/extra")
        assert status == 403 and json.loads(body)["error"]["code"] == "admin_key_required"
        status, _, body = http("DELETE", f"{daemon.url}/api/v1/models/extra",
                               headers={"Authorization": "Bearer owner"})
        assert status == 200 and json.loads(body) == {"removed": "extra"}
        ids = [m["id"] for m in json.loads(http("GET", f"{daemon.url}/v1/models")[2])["data"]]
        assert ids == ["gemma3-270m"]
