"""The OpenAI API as LAN clients see it: the official openai client against the real daemon and model."""

from __future__ import annotations

import asyncio
import json

import openai
import pytest
from conftest import http

PROMPT = "The capital of France is"


@pytest.fixture
def client(daemon):
    return openai.OpenAI(base_url=f"{daemon.url}/v1", api_key="unused", max_retries=0)


@pytest.fixture
def aclient(daemon):
    return openai.AsyncOpenAI(base_url=f"{daemon.url}/v1", api_key="unused", max_retries=0)


def test_models_list_shows_the_builtin_model(client):
    models = client.models.list()
    ids = [m.id for m in models.data]
    assert "gemma3-270m" in ids
    assert client.models.retrieve("gemma3-270m").id == "gemma3-270m"


def test_chat_answers_with_text_usage_and_a_finish_reason(client):
    r = client.chat.completions.create(
        model="gemma3-270m", messages=[{"role": "system", "content": "Answer briefly."},
                                       {"role": "user", "content": "What is the capital of France?"}],
        max_tokens=48, temperature=0)
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content.strip()
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 10
    assert 0 < r.usage.completion_tokens <= 48
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_max_tokens_ends_with_finish_reason_length(client):
    r = client.completions.create(model="gemma3-270m", prompt="Count: 1, 2, 3, 4, 5,", max_tokens=7, temperature=0)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 7


def test_stop_string_ends_generation_with_finish_reason_stop(client):
    r = client.completions.create(model="gemma3-270m", prompt="Count: 1, 2, 3, 4, 5,", max_tokens=40,
                                  temperature=0, stop=[","])
    assert r.choices[0].finish_reason == "stop"
    assert "," not in r.choices[0].text


def test_temperature_zero_with_a_seed_is_deterministic(client):
    def once():
        return client.completions.create(model="gemma3-270m", prompt=PROMPT, max_tokens=24, temperature=0,
                                         seed=7).choices[0].text

    first = once()
    assert first.strip()
    assert once() == first


def test_sampling_with_the_same_seed_repeats_and_parameters_are_accepted(client):
    def once(seed):
        return client.completions.create(
            model="gemma3-270m", prompt="Once upon a time", max_tokens=24, temperature=1.0, top_p=0.9,
            presence_penalty=0.5, frequency_penalty=0.5, seed=seed).choices[0].text

    assert once(11) == once(11)


def test_chat_streams_chunks_then_usage(client):
    stream = client.chat.completions.create(
        model="gemma3-270m", messages=[{"role": "user", "content": "Name three colours."}], max_tokens=32,
        temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert content.strip()
    assert finishes in (["stop"], ["length"])
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    assert len({c.id for c in chunks}) == 1


def test_streamed_and_whole_answers_match(client):
    whole = client.completions.create(model="gemma3-270m", prompt=PROMPT, max_tokens=20, temperature=0)
    streamed = client.completions.create(model="gemma3-270m", prompt=PROMPT, max_tokens=20, temperature=0,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == whole.choices[0].text


def test_raw_sse_ends_with_done(daemon):
    status, headers, body = http("POST", f"{daemon.url}/v1/completions",
                                 {"prompt": PROMPT, "max_tokens": 5, "stream": True})
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    events = [line for line in body.decode().split("\n\n") if line]
    assert events[-1] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events)


async def test_async_client_streams_and_two_concurrent_requests_both_complete(aclient):
    async def one(i):
        stream = await aclient.chat.completions.create(
            model="gemma3-270m", messages=[{"role": "user", "content": f"Say something about the number {i}."}],
            max_tokens=24, temperature=0, stream=True)
        parts = [c.choices[0].delta.content or "" async for c in stream if c.choices]
        return "".join(parts)

    answers = await asyncio.gather(one(1), one(2))
    assert all(a.strip() for a in answers)
    r = await aclient.completions.create(model="gemma3-270m", prompt=PROMPT, max_tokens=5)
    assert r.usage.completion_tokens > 0


def test_embeddings_return_unit_vectors_in_float_and_base64(client):
    r = client.embeddings.create(model="gemma3-270m", input=["a red apple", "a green pear"])
    assert [d.index for d in r.data] == [0, 1]
    v = r.data[0].embedding
    assert len(v) == 640
    assert abs(sum(x * x for x in v) - 1.0) < 1e-3
    assert r.usage.prompt_tokens > 0
    plain = client.embeddings.create(model="gemma3-270m", input="a red apple", encoding_format="float")
    assert plain.data[0].embedding == pytest.approx(v, abs=1e-5)


def test_unknown_model_is_404_in_openai_shape(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["code"] == "model_not_found"
    assert e.value.body["param"] == "model"


@pytest.mark.parametrize("body, param", [
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": 9}, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": [1]}, "stop"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 9}, "n"),
    ({"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}, "stream"),
])
def test_bad_fields_are_400_naming_the_parameter(daemon, body, param):
    status, _, raw = http("POST", f"{daemon.url}/v1/chat/completions", body)
    assert status == 400
    error = json.loads(raw)["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param


def test_malformed_json_is_400(daemon):
    status, _, raw = http("POST", f"{daemon.url}/v1/completions", b"{not json",
                          headers={"Content-Type": "application/json"})
    assert status == 400
    assert "not valid JSON" in json.loads(raw)["error"]["message"]


def test_body_over_the_limit_is_413(daemon):
    status, _, raw = http("POST", f"{daemon.url}/v1/completions", b"x" * (5 << 20),
                          headers={"Content-Type": "application/json"})
    assert status == 413
    assert json.loads(raw)["error"]["code"] == "request_too_large"


def test_unknown_route_is_404_in_openai_shape(daemon):
    status, _, raw = http("GET", f"{daemon.url}/v1/nothing-here")
    assert status == 404
    assert json.loads(raw)["error"]["type"] == "invalid_request_error"


def test_prompt_longer_than_the_context_is_400(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="gemma3-270m", prompt="word " * 3000, max_tokens=5)
    assert "context" in e.value.message


def test_health_and_metrics_report_the_serving_daemon(daemon, client):
    client.completions.create(model="gemma3-270m", prompt=PROMPT, max_tokens=4)
    status, health = daemon.health()
    assert status == 200
    assert health["status"] == "ready"
    assert health["model"]["name"] == "gemma3-270m" and health["model"]["state"] == "ready"
    assert health["memory"]["total_bytes"] > health["memory"]["available_bytes"] > 0
    assert health["uptime_s"] > 0 and health["version"]
    assert daemon.metric("offgridd_requests_total", route="/v1/completions", status="200") >= 1
    assert daemon.metric("offgridd_completion_tokens_total", model="gemma3-270m") >= 4
    assert daemon.metric("offgridd_time_to_first_token_seconds_count", model="gemma3-270m") >= 1
    assert daemon.metric("offgridd_generation_tokens_per_second_count", model="gemma3-270m") >= 1
    assert daemon.metric("offgridd_queue_depth") == 0
    assert daemon.metric("offgridd_worker_restarts_total", model="gemma3-270m") == 0
