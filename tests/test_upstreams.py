"""A fallback upstream and CORS (issue #16 items 5 and 6): off unless configured; when configured, a request neither
this box nor a peer can serve goes to the upstream, streamed back as it comes, with the upstream's own key. The
upstream here is a second real offgridd: an OpenAI-compatible server that holds a model this box lacks."""

import json

import openai
import pytest
from conftest import http, private_state, running_daemon

from offgridd.api.app import init_app
from offgridd.daemon import build_runtime
from offgridd.settings import load_settings
from offgridd.store import ModelStore
from offgridd.web import ELSEWHERE

CHAT = {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8, "temperature": 0}


@pytest.fixture
def upstream(model_state, tmp_path):
    state = private_state(model_state, tmp_path / "upstream")
    store = ModelStore(state / "models")
    store.import_file(store.path_of(store.get("gemma3-270m")), name="upstream-only")
    with running_daemon(state, tmp_path / "upstream.log", env={"OFFGRID_API_KEY": "sk-upstream"}) as daemon:
        yield daemon


def test_a_model_only_the_upstream_has_is_served_from_it_with_its_own_key(model_state, tmp_path, upstream):
    config = tmp_path / "config.toml"
    config.write_text(f'[[upstreams]]\nurl = "{upstream.url}/v1"\nkey = "sk-upstream"\nmodels = ["upstream-*"]\n')
    with running_daemon(model_state, tmp_path / "box.log", env={"OFFGRID_CONFIG": str(config)}) as box:
        status, headers, body = http("POST", f"{box.url}/v1/chat/completions", {**CHAT, "model": "upstream-only"},
                                     headers={"Authorization": "Bearer a-client-key-the-upstream-never-sees"})
        assert status == 200, body
        assert json.loads(body)["model"] == "upstream-only"
        assert headers["X-Offgrid-Upstream"] == f"{upstream.url}/v1"
        client = openai.OpenAI(base_url=f"{box.url}/v1", api_key="none", max_retries=0)
        pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="upstream-only", stream=True, **CHAT) if c.choices]
        assert "".join(pieces) == json.loads(body)["choices"][0]["message"]["content"]
        with pytest.raises(openai.NotFoundError):  # not among the models the upstream may serve: never sent there
            client.chat.completions.create(model="somewhere-else", **CHAT)
        health = json.loads(http("GET", f"{box.url}/health")[2])
        assert health["upstreams"] == [{"url": f"{upstream.url}/v1", "models": ["upstream-*"]}]
        assert "sk-upstream" not in json.dumps(json.loads(http("GET", f"{box.url}/api/v1/status")[2]))
        assert box.metric("offgridd_requests_routed_total", peer="upstream 127.0.0.1") == 2
        # the local model is still served here
        assert client.chat.completions.create(model="gemma3-270m", **CHAT).model == "gemma3-270m"
    assert upstream.metric("offgridd_requests_total", route="/v1/chat/completions", status="200") == 2


def test_an_unreachable_upstream_leaves_this_box_s_own_answer(model_state, tmp_path):
    config = tmp_path / "config.toml"
    config.write_text('[[upstreams]]\nurl = "http://127.0.0.1:9/v1"\nmodels = ["*"]\n')
    with running_daemon(model_state, tmp_path / "box.log", env={"OFFGRID_CONFIG": str(config)}) as box:
        status, _, body = http("POST", f"{box.url}/v1/chat/completions", {**CHAT, "model": "nowhere"})
        assert status == 404 and json.loads(body)["error"]["code"] == "model_not_found"


async def test_without_upstreams_nothing_is_registered_to_reach_one(aiohttp_client, tmp_path):
    rt = build_runtime(load_settings(env={}, flags={"state": str(tmp_path)}))
    rt.peers = None
    app = init_app(rt)
    assert app.get(ELSEWHERE, []) == []
    rt.db.close()


@pytest.fixture
async def cors_client(aiohttp_client, tmp_path):
    rt = build_runtime(load_settings(env={}, flags={"state": str(tmp_path), "cors_origins": "http://chat.lan:3000"}))
    rt.store.open()
    yield await aiohttp_client(init_app(rt))
    rt.db.close()


async def test_cors_answers_allowed_origins_only(cors_client, aiohttp_client, tmp_path):
    preflight = {"Origin": "http://chat.lan:3000", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    resp = await cors_client.options("/v1/chat/completions", headers=preflight)
    assert resp.status == 204
    assert resp.headers["Access-Control-Allow-Origin"] == "http://chat.lan:3000"
    assert "Authorization" in resp.headers["Access-Control-Allow-Headers"]
    resp = await cors_client.get("/v1/models", headers={"Origin": "http://chat.lan:3000"})
    assert resp.status == 200 and resp.headers["Access-Control-Allow-Origin"] == "http://chat.lan:3000"
    resp = await cors_client.post("/v1/chat/completions", json=CHAT, headers={"Origin": "http://chat.lan:3000"})
    assert resp.status == 503 and resp.headers["Access-Control-Allow-Origin"] == "http://chat.lan:3000"
    resp = await cors_client.get("/v1/models", headers={"Origin": "http://evil.example"})
    assert "Access-Control-Allow-Origin" not in resp.headers
    resp = await cors_client.options("/v1/models", headers={**preflight, "Origin": "http://evil.example"})
    assert resp.status == 405 and "Access-Control-Allow-Origin" not in resp.headers


async def test_without_cors_origins_no_browser_origin_is_allowed(aiohttp_client, tmp_path):
    rt = build_runtime(load_settings(env={}, flags={"state": str(tmp_path)}))
    client = await aiohttp_client(init_app(rt))
    resp = await client.options("/v1/models", headers={"Origin": "http://chat.lan:3000",
                                                       "Access-Control-Request-Method": "GET"})
    assert resp.status == 405 and "Access-Control-Allow-Origin" not in resp.headers
    rt.db.close()
