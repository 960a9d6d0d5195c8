"""Conversations over HTTP and from the command line (issue #18 items 1, 2, 4): the routes in-process on the real app,
then a real daemon keeping chats a client opted in to, searching them, and losing at most the message being written
when it is killed mid-write."""

import json
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import openai
import pytest
from conftest import http, private_state, start_daemon

from offgridd import keys
from offgridd.api.app import init_app
from offgridd.daemon import build_runtime
from offgridd.hardware.profiles import detect, load_profiles, profiles_dir
from offgridd.settings import load_settings

CHAT = {"messages": [{"role": "user", "content": "Name a river in France."}], "max_tokens": 12, "temperature": 0}


@pytest.fixture
async def served(aiohttp_client, tmp_path):
    rt = build_runtime(load_settings(env={}, flags={"state": str(tmp_path)}))
    rt.store.open()
    await rt.history.prepare()
    yield rt, await aiohttp_client(init_app(rt))
    rt.db.close()


async def test_a_conversation_is_made_kept_searched_exported_and_deleted(served):
    _, client = served
    resp = await client.post("/api/v1/conversations", json={"title": "Garden notes"})
    assert resp.status == 201
    cid = (await resp.json())["id"]
    for role, content in (("user", "When do tomatoes need staking?"), ("assistant", "Once they flower.")):
        resp = await client.post(f"/api/v1/conversations/{cid}/messages", json={"role": role, "content": content})
        assert resp.status == 201
    page = await (await client.get("/api/v1/conversations")).json()
    assert [c["id"] for c in page["conversations"]] == [cid] and page["total"] == 1
    resp = await client.patch(f"/api/v1/conversations/{cid}", json={"title": "Tomatoes"})
    assert (await resp.json())["title"] == "Tomatoes"
    hits = (await (await client.get("/api/v1/conversations/search", params={"q": "tomato staking"})).json())["hits"]
    assert hits and hits[0]["conversation_id"] == cid
    assert any(part["match"] for part in hits[0]["snippet"])
    resp = await client.get(f"/api/v1/conversations/{cid}/export", params={"format": "md"})
    assert resp.status == 200 and "attachment" in resp.headers["Content-Disposition"]
    assert "Once they flower." in await resp.text()
    whole = await (await client.get(f"/api/v1/conversations/{cid}/export")).json()
    assert [m["role"] for m in whole["messages"]] == ["user", "assistant"]
    assert (await client.delete(f"/api/v1/conversations/{cid}")).status == 200
    resp = await client.get(f"/api/v1/conversations/{cid}")
    assert resp.status == 404 and (await resp.json())["error"]["code"] == "conversation_not_found"


async def test_bad_input_is_a_4xx_with_a_reason(served):
    _, client = served
    assert (await client.get("/api/v1/conversations", params={"limit": "0"})).status == 400
    cid = (await (await client.post("/api/v1/conversations", json={})).json())["id"]
    resp = await client.post(f"/api/v1/conversations/{cid}/messages", json={"role": "wizard", "content": "x"})
    assert resp.status == 400 and (await resp.json())["error"]["message"]
    assert (await client.post(f"/api/v1/conversations/{cid}/messages", json={"role": "user"})).status == 400
    assert (await client.get(f"/api/v1/conversations/{cid}/export", params={"format": "pdf"})).status == 400
    hits = await (await client.get("/api/v1/conversations/search", params={"q": '") OR NEAR(*'})).json()
    assert hits == {"hits": []}


async def test_each_key_sees_its_own_conversations(served):
    rt, client = served
    alice, bob = (rt.db.run_sync(lambda db, n=n: keys.add_key(db, n)) for n in ("alice", "bob"))
    as_alice, as_bob = {"Authorization": f"Bearer {alice}"}, {"Authorization": f"Bearer {bob}"}
    cid = (await (await client.post("/api/v1/conversations", json={"title": "Alice's"}, headers=as_alice)).json())["id"]
    assert (await client.get(f"/api/v1/conversations/{cid}", headers=as_bob)).status == 404
    assert (await client.delete(f"/api/v1/conversations/{cid}", headers=as_bob)).status == 404
    listed = await (await client.get("/api/v1/conversations", headers=as_bob)).json()
    assert listed["conversations"] == []
    assert (await client.get(f"/api/v1/conversations/{cid}", headers=as_alice)).status == 200
    assert (await client.get("/api/v1/conversations")).status == 401  # chat keys exist: the API is closed


async def test_what_a_browser_kept_is_imported_once(served):
    _, client = served
    saved = [{"id": "lq2x9k1ab3", "title": "Old chat", "model": "gemma3-270m",
              "messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi there"}]},
             {"id": "../../etc", "title": "bad", "messages": []}]
    first = await (await client.post("/api/v1/conversations/import", json={"saved": saved})).json()
    assert list(first["imported"]) == ["lq2x9k1ab3"] and first["rejected"]
    again = await (await client.post("/api/v1/conversations/import", json={"saved": saved})).json()
    assert again["imported"] == {} and list(again["already"]) == ["lq2x9k1ab3"]
    listed = await (await client.get("/api/v1/conversations")).json()
    assert [c["title"] for c in listed["conversations"]] == ["Old chat"]


def test_a_client_that_opts_in_has_its_chat_kept_and_searchable(model_state, tmp_path):
    state = private_state(model_state, tmp_path / "state")
    daemon = start_daemon(state, tmp_path / "daemon.log")
    try:
        daemon.wait_ready()
        client = openai.OpenAI(base_url=f"{daemon.url}/v1", api_key="none", max_retries=0)
        raw = client.chat.completions.with_raw_response.create(
            model="gemma3-270m", extra_headers={"X-Offgrid-Conversation": "new"}, **CHAT)
        cid = raw.headers["X-Offgrid-Conversation"]
        first = raw.parse().choices[0].message.content
        follow_up = CHAT["messages"] + [{"role": "assistant", "content": first},
                                        {"role": "user", "content": "And one in Spain?"}]
        pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="gemma3-270m", stream=True, messages=follow_up, max_tokens=12, temperature=0,
            extra_headers={"X-Offgrid-Conversation": cid}) if c.choices]
        client.chat.completions.create(model="gemma3-270m", **CHAT)  # not opted in: not kept
        kept = json.loads(http("GET", f"{daemon.url}/api/v1/conversations/{cid}")[2])
        assert [(m["role"], m["content"]) for m in kept["messages"]] == [
            ("user", "Name a river in France."), ("assistant", first), ("user", "And one in Spain?"),
            ("assistant", "".join(pieces))]
        assert kept["source"] == "api" and kept["title"] == "Name a river in France."
        assert json.loads(http("GET", f"{daemon.url}/api/v1/conversations")[2])["total"] == 1
        status, _, body = http("POST", f"{daemon.url}/v1/chat/completions", CHAT,
                               headers={"X-Offgrid-Conversation": "no-such-conversation"})
        assert status == 404 and json.loads(body)["error"]["code"] == "conversation_not_found"
        health = json.loads(http("GET", f"{daemon.url}/health")[2])
        # the bound is this machine's board profile's ([storage] max_db_bytes)
        profile = detect(Path("/"), load_profiles(profiles_dir(None))).profile
        assert health["database"]["file_bytes"] > 0
        assert health["database"]["max_bytes"] == profile.values["storage"]["max_db_bytes"]
    finally:
        daemon.stop()
    found = subprocess.run([sys.executable, "-m", "offgridd", "history", "search", "Spain", "--state", str(state)],
                           capture_output=True, text=True)
    assert found.returncode == 0 and cid in found.stdout and "[Spain]" in found.stdout


def test_a_daemon_killed_mid_write_loses_at_most_the_message_being_written(model_state, tmp_path):
    state = private_state(model_state, tmp_path / "state")
    daemon = start_daemon(state, tmp_path / "daemon.log")
    acknowledged: list[str] = []
    try:
        daemon.wait_ready()
        cid = json.loads(http("POST", f"{daemon.url}/api/v1/conversations", {"title": "power cut"})[2])["id"]
        stop = threading.Event()

        def write() -> None:
            n = 0
            while not stop.is_set():
                text = f"note {n} " + "words " * 200
                try:
                    status, _, _ = http("POST", f"{daemon.url}/api/v1/conversations/{cid}/messages",
                                        {"role": "user", "content": text}, timeout=5)
                except OSError:
                    return
                if status == 201:
                    acknowledged.append(text)
                n += 1

        writers = [threading.Thread(target=write) for _ in range(3)]
        for w in writers:
            w.start()
        time.sleep(3)
        daemon.proc.send_signal(signal.SIGKILL)  # as a power cut would, mid-write
        daemon.proc.wait(10)
        stop.set()
        for w in writers:
            w.join(10)
    finally:
        if daemon.proc.poll() is None:
            daemon.stop()
    assert len(acknowledged) > 10
    db = sqlite3.connect(state / "offgridd.db")
    assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    stored = {row[0] for row in db.execute("SELECT content FROM messages WHERE conversation_id = ?", [cid])}
    assert set(acknowledged) <= stored  # every write the daemon answered is there
    assert len(stored - set(acknowledged)) <= 3  # at most the one each writer had in flight
    db.close()
