"""The HTTP layer in-process (pytest-aiohttp): request parsing, error shapes, keys and routing decisions, on the real
app and runtime with an empty store and no model loaded. What needs the model is tested against a real daemon."""

import pytest
from aiohttp import web

from offgridd.api.app import init_app
from offgridd.api.keys import RUNTIME
from offgridd.daemon import build_runtime
from offgridd.settings import load_settings
from offgridd.web import ELSEWHERE

CHAT = {"messages": [{"role": "user", "content": "hi"}]}


def runtime(tmp_path, **settings):
    rt = build_runtime(load_settings(env={}, flags={"state": str(tmp_path), **settings}))
    rt.store.open()
    return rt


@pytest.fixture
async def client(aiohttp_client, tmp_path):
    rt = runtime(tmp_path)
    yield await aiohttp_client(init_app(rt))
    rt.db.close()


def assert_error(body: dict, kind: str, param: str | None = None) -> None:
    assert set(body) == {"error"}
    assert body["error"]["type"] == kind and body["error"]["message"]
    if param is not None:
        assert body["error"]["param"] == param


@pytest.mark.parametrize(("body", "param"), [
    ({}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content"),
    ({**CHAT, "temperature": 3}, "temperature"),
    ({**CHAT, "n": 9}, "n"),
    ({**CHAT, "max_tokens": 0}, "max_tokens"),
    ({**CHAT, "stop": ["a"] * 9}, "stop"),
    ({**CHAT, "stream": "yes"}, "stream"),
    ({**CHAT, "model": ""}, "model"),
])
async def test_a_bad_chat_request_is_a_400_naming_its_parameter(client, body, param):
    resp = await client.post("/v1/chat/completions", json=body)
    assert resp.status == 400
    assert_error(await resp.json(), "invalid_request_error", param)


@pytest.mark.parametrize("raw", [b"{", b"[1, 2]", b"\xff\xfe", b""])
async def test_a_body_that_is_not_a_json_object_is_a_400(client, raw):
    resp = await client.post("/v1/completions", data=raw, headers={"Content-Type": "application/json"})
    assert resp.status == 400
    assert_error(await resp.json(), "invalid_request_error")


async def test_a_body_over_the_limit_is_a_413(aiohttp_client, tmp_path):
    rt = runtime(tmp_path, max_body_bytes=2048)
    client = await aiohttp_client(init_app(rt))
    resp = await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x" * 4096}]})
    assert resp.status == 413
    assert (await resp.json())["error"]["code"] == "request_too_large"
    rt.db.close()


async def test_unknown_routes_and_methods_answer_in_the_same_shape(client):
    resp = await client.get("/v1/nothing-here")
    assert resp.status == 404 and (await resp.json())["error"]["code"] == "not_found"
    resp = await client.get("/v1/chat/completions")
    assert resp.status == 405 and (await resp.json())["error"]["code"] == "method_not_allowed"


async def test_while_starting_a_valid_request_is_a_503_with_retry_after(client):
    resp = await client.post("/v1/chat/completions", json=CHAT)
    assert resp.status == 503
    assert int(resp.headers["Retry-After"]) >= 1
    assert "starting" in (await resp.json())["error"]["message"]
    health = await client.get("/health")
    assert health.status == 503 and (await health.json())["status"] == "starting"


async def test_a_model_this_box_lacks_is_a_404_when_no_peer_takes_it(client):
    client.server.app[RUNTIME].phase = "ready"
    resp = await client.post("/v1/chat/completions", json={**CHAT, "model": "not-here"})
    assert resp.status == 404
    body = await resp.json()
    assert body["error"]["code"] == "model_not_found" and body["error"]["param"] == "model"


async def test_routing_is_asked_with_the_parsed_model_only_when_this_node_cannot_serve(aiohttp_client, tmp_path):
    rt = runtime(tmp_path)
    app = init_app(rt)
    asked = []

    async def elsewhere(request: web.Request, model: str) -> web.StreamResponse | None:
        asked.append(model)
        return web.json_response({"served": "elsewhere"}) if model == "theirs" else None

    app[ELSEWHERE] = [elsewhere]
    rt.phase = "ready"
    client = await aiohttp_client(app)
    resp = await client.post("/v1/chat/completions", json={**CHAT, "model": "theirs"})
    assert resp.status == 200 and await resp.json() == {"served": "elsewhere"}
    resp = await client.post("/v1/embeddings", json={"input": "x", "model": "nobody-has-it"})
    assert resp.status == 404  # every place declined: this node's own answer stands
    resp = await client.post("/v1/chat/completions", json={**CHAT, "model": "theirs", "n": 99})
    assert resp.status == 400  # a bad request is answered here, never passed on
    rt.phase = "starting"
    resp = await client.post("/v1/chat/completions", json=CHAT)  # the default model, while this node starts
    assert resp.status == 503
    assert asked == ["theirs", "nobody-has-it", rt.settings.model]
    rt.db.close()


async def test_with_an_api_key_every_api_path_needs_it(aiohttp_client, tmp_path):
    rt = runtime(tmp_path, api_key="k1", admin_key="admin")
    client = await aiohttp_client(init_app(rt))
    for path in ("/v1/models", "/api/v1/status", "/api/v1/models"):
        resp = await client.get(path)
        assert resp.status == 401
        assert_error(await resp.json(), "authentication_error")
        resp = await client.get(path, headers={"Authorization": "Bearer wrong"})
        assert resp.status == 401
        resp = await client.get(path, headers={"Authorization": "Bearer k1"})
        assert resp.status == 200
    assert (await client.get("/health")).status == 503  # monitors need no key; it is not ready
    resp = await client.delete("/api/v1/models/x", headers={"Authorization": "Bearer k1"})
    assert resp.status == 403 and (await resp.json())["error"]["code"] == "admin_key_required"
    resp = await client.delete("/api/v1/models/x", headers={"Authorization": "Bearer admin"})
    assert resp.status == 404  # past the key check: there is no such model
    rt.db.close()


async def test_disabled_subsystems_say_so(aiohttp_client, tmp_path):
    rt = runtime(tmp_path)
    rt.usb = rt.peers = None
    client = await aiohttp_client(init_app(rt))
    resp = await client.get("/api/v1/usb")
    assert resp.status == 503 and (await resp.json())["error"]["code"] == "usb_disabled"
    assert await (await client.get("/api/v1/peers")).json() == {"enabled": False, "node": None, "peers": []}
    resp = await client.get("/fleet/v2/hello", headers={"X-Offgrid-Challenge": "0" * 32})
    assert resp.status == 404
    rt.db.close()


async def test_a_routed_request_is_refused_where_peers_are_not_running(client):
    """A request another node routed here is served only as a fleet call, which needs this node's peers running
    (tests/test_fleet_trust.py checks the signature between real daemons)."""
    resp = await client.post("/v1/chat/completions", json=CHAT, headers={"X-Offgrid-Hop": "somebody"})
    assert resp.status == 404
    assert (await resp.json())["error"]["code"] == "peers_disabled"


MINIMUM = {"type": "object", "properties": {"age": {"type": "integer", "minimum": 0}}, "required": ["age"]}
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}


@pytest.mark.parametrize(("body", "param"), [
    ({**CHAT, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": MINIMUM}}},
     "response_format.json_schema.schema/properties/age/minimum"),
    ({**CHAT, "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format.json_schema.schema"),
    ({**CHAT, "response_format": {"type": "yaml"}}, "response_format"),
    ({**CHAT, "tools": [{**TOOL, "function": {"name": "f", "parameters": MINIMUM}}]},
     "tools[0].function.parameters/properties/age/minimum"),
    ({**CHAT, "tools": [{"type": "code_interpreter"}]}, "tools[0]"),
    ({**CHAT, "tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "g"}}}, "tool_choice"),
    ({**CHAT, "tool_choice": "required"}, "tool_choice"),
    ({**CHAT, "tools": [TOOL], "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ({**CHAT, "tools": [TOOL], "response_format": {"type": "json_object"}}, "response_format"),
    ({**CHAT, "functions": [{"name": "f"}]}, "functions"),
    ({**CHAT, "function_call": "auto"}, "function_call"),
    ({"messages": [{"role": "tool", "content": "42"}]}, "messages[0].tool_call_id"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": []}]}, "messages[0].tool_calls"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": {}}}]}]},
     "messages[0].tool_calls[0]"),
    ({**CHAT, "top_logprobs": 2}, "top_logprobs"),
    ({**CHAT, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({**CHAT, "logprobs": 3}, "logprobs"),
])
async def test_structured_output_tools_and_logprobs_that_cannot_be_honoured_are_a_400_naming_the_part(
        client, body, param):
    resp = await client.post("/v1/chat/completions", json=body)
    assert resp.status == 400
    assert_error(await resp.json(), "invalid_request_error", param)


@pytest.mark.parametrize(("body", "param"), [
    ({"prompt": "x", "logprobs": 21}, "logprobs"),
    ({"prompt": "x", "logprobs": True}, "logprobs"),
    ({"prompt": "x", "tools": [TOOL]}, "tools"),
    ({"prompt": "x", "response_format": {"type": "json_schema", "json_schema": {"schema": MINIMUM}}},
     "response_format.json_schema.schema/properties/age/minimum"),
])
async def test_a_bad_completion_request_is_a_400_naming_its_parameter(client, body, param):
    resp = await client.post("/v1/completions", json=body)
    assert resp.status == 400
    assert_error(await resp.json(), "invalid_request_error", param)


@pytest.mark.parametrize(("body", "param"), [
    ({"input": "hi", "store": True}, "store"),
    ({"input": "hi", "previous_response_id": "resp_1"}, "previous_response_id"),
    ({"input": "hi", "background": True}, "background"),
    ({"input": []}, "input"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
     "input[0].content[0].type"),
    ({"input": [{"type": "reasoning", "summary": []}]}, "input[0].type"),
    ({"input": [{"type": "function_call_output", "output": "x"}]}, "input[0].call_id"),
    ({"input": "hi", "tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"input": "hi", "tools": [{"type": "function", "name": "f", "parameters": MINIMUM}]},
     "tools[0].parameters/properties/age/minimum"),
    ({"input": "hi", "text": {"format": {"type": "json_schema", "name": "x", "schema": MINIMUM}}},
     "text.format.schema/properties/age/minimum"),
    ({"input": "hi", "max_output_tokens": 0}, "max_output_tokens"),
    ({"input": "hi", "instructions": 3}, "instructions"),
])
async def test_a_responses_request_this_box_cannot_honour_is_a_400_naming_the_part(client, body, param):
    resp = await client.post("/v1/responses", json=body)
    assert resp.status == 400
    assert_error(await resp.json(), "invalid_request_error", param)


async def test_requests_using_the_new_fields_parse_and_reach_the_model(client):
    """Valid bodies get past parsing: while the box starts they are a 503, not a 400."""
    tool_turns = [{"role": "user", "content": "weather?"},
                  {"role": "assistant", "content": None, "tool_calls": [
                      {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                  {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    for path, body in [
        ("/v1/chat/completions", {"messages": tool_turns, "tools": [TOOL], "tool_choice": "auto", "logprobs": True,
                                  "top_logprobs": 20}),
        ("/v1/chat/completions", {**CHAT, "response_format": {"type": "json_schema", "json_schema": {
            "name": "x", "strict": True, "schema": {"type": "object", "properties": {"a": {"enum": [1, 2]}}}}}}),
        ("/v1/completions", {"prompt": "x", "logprobs": 5, "response_format": {"type": "json_object"}}),
        ("/v1/responses", {"input": [{"role": "user", "content": [{"type": "input_text", "text": "hi"}]},
                                     {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"},
                                     {"type": "function_call_output", "call_id": "c", "output": "ok"}],
                           "instructions": "be brief", "store": False, "tool_choice": {"type": "function", "name": "f"},
                           "tools": [{"type": "function", "name": "f", "parameters": TOOL["function"]["parameters"]}]}),
    ]:
        resp = await client.post(path, json=body)
        assert resp.status == 503, (path, await resp.text())
