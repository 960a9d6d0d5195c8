"""Structured output, tools, logprobs and the Responses API as LAN clients use them (issue #16): the official openai
client against the real daemon and the 270M model, whose replies are valid only because decoding is constrained."""

from __future__ import annotations

import json
from typing import Literal

import openai
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel, Field
from test_constrained import validate

from offgridd.api.tools import ReplyReader, ToolUse

MODEL = "gemma3-270m"
PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "pets"],
          "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer"},
                         "pets": {"type": "array", "maxItems": 2, "items": {"$ref": "#/$defs/pet"}}},
          "$defs": {"pet": {"type": "object", "additionalProperties": False, "required": ["kind"],
                            "properties": {"kind": {"enum": ["cat", "dog", "fish"]}}}}}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather now in a city",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
                   "properties": {"city": {"type": "string", "maxLength": 30},
                                  "unit": {"enum": ["celsius", "fahrenheit"]}}}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The local time in a city",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city"],
                   "properties": {"city": {"type": "string", "maxLength": 30}}}}}
ASK_WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]
SCHEMAS = {"get_weather": WEATHER["function"]["parameters"], "get_time": TIME["function"]["parameters"]}


@pytest.fixture
def client(daemon):
    return openai.OpenAI(base_url=f"{daemon.url}/v1", api_key="unused", max_retries=0)


class Pet(BaseModel):
    kind: Literal["cat", "dog", "fish"]
    name: str = Field(max_length=20)


class Person(BaseModel):
    name: str = Field(max_length=20)
    age: int
    pets: list[Pet] = Field(max_length=2)


def test_a_json_schema_response_format_makes_the_small_model_write_json_that_validates(client):
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Describe a person who has a cat."}], max_tokens=120,
        temperature=0, response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON,
                                                                               "strict": True}})
    assert r.choices[0].finish_reason == "stop"
    validate(json.loads(r.choices[0].message.content), PERSON)


def test_the_sdk_parse_helper_returns_a_pydantic_object(client):
    r = client.chat.completions.parse(
        model=MODEL, messages=[{"role": "user", "content": "Make up a person with one pet."}], max_tokens=200,
        temperature=0, response_format=Person)
    person = r.choices[0].message.parsed
    assert isinstance(person, Person) and len(person.pets) <= 2


def test_json_object_works_on_plain_completions_too(client):
    r = client.completions.create(model=MODEL, prompt='Paris as a JSON object with the keys "city" and "country":\n',
                                  max_tokens=40, temperature=0, extra_body={"response_format": {"type": "json_object"}})
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(r.choices[0].text), dict)


def test_a_schema_the_grammar_cannot_guarantee_is_a_400_naming_the_keyword(client):
    schema = {"type": "object", "properties": {"age": {"type": "integer", "minimum": 0}}, "required": ["age"]}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=ASK_WEATHER, max_tokens=5, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
    assert e.value.body["param"] == "response_format.json_schema.schema/properties/age/minimum"


def _calls(message) -> list[tuple[str, dict]]:
    out = []
    for call in message.tool_calls:
        assert call.id.startswith("call_") and call.type == "function"
        assert isinstance(call.function.arguments, str)
        arguments = json.loads(call.function.arguments)
        validate(arguments, SCHEMAS[call.function.name])
        out.append((call.function.name, arguments))
    return out


def test_a_named_tool_choice_calls_exactly_that_function_once(client):
    r = client.chat.completions.create(
        model=MODEL, messages=ASK_WEATHER, tools=[WEATHER, TIME], max_tokens=60, temperature=0,
        tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert [name for name, _ in _calls(r.choices[0].message)] == ["get_time"]


def test_parallel_tool_calls_true_lets_one_reply_hold_several_calls(client):
    r = client.chat.completions.create(model=MODEL, messages=ASK_WEATHER, tools=[WEATHER, TIME],
                                       tool_choice="required", parallel_tool_calls=True, max_tokens=200,
                                       temperature=0)
    assert r.choices[0].finish_reason == "tool_calls"
    calls = _calls(r.choices[0].message)
    assert 1 <= len(calls) <= 8  # the grammar's bound
    assert len({c.id for c in r.choices[0].message.tool_calls}) == len(calls)


def test_tool_choice_none_never_calls_and_auto_answers_one_way_or_the_other(client):
    r = client.chat.completions.create(model=MODEL, messages=ASK_WEATHER, tools=[WEATHER], tool_choice="none",
                                       max_tokens=16, temperature=0)
    assert r.choices[0].message.tool_calls is None and r.choices[0].message.content
    r = client.chat.completions.create(model=MODEL, messages=ASK_WEATHER, tools=[WEATHER], max_tokens=60,
                                       temperature=0)
    message = r.choices[0].message
    if message.tool_calls:
        assert r.choices[0].finish_reason == "tool_calls" and _calls(message)
    else:
        assert message.content and not message.content.startswith("<tool_call>")


def test_tool_choice_required_calls_one_tool_streamed_as_openai_streams_it_or_whole(client):
    kwargs = dict(model=MODEL, messages=ASK_WEATHER, tools=[WEATHER, TIME], tool_choice="required",
                  parallel_tool_calls=False, max_tokens=60, temperature=0)
    r = client.chat.completions.create(**kwargs)
    assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content is None
    assert len(_calls(r.choices[0].message)) == 1
    whole = r.choices[0].message.tool_calls
    chunks = [c for c in client.chat.completions.create(**kwargs, stream=True) if c.choices]
    deltas = [d for c in chunks for d in c.choices[0].delta.tool_calls or ()]
    first = deltas[0]
    assert first.index == 0 and first.id.startswith("call_") and first.type == "function"
    assert first.function.name == whole[0].function.name and first.function.arguments == ""
    assert len(deltas) > 2  # the arguments came in pieces
    assert "".join(d.function.arguments or "" for d in deltas) == whole[0].function.arguments
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not "".join(c.choices[0].delta.content or "" for c in chunks)


def test_tool_results_go_back_into_the_conversation(client):
    messages = [*ASK_WEATHER, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21, "sky": "clear"}'}]
    r = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], tool_choice="none",
                                       max_tokens=24, temperature=0)
    assert r.choices[0].message.content.strip()
    assert r.usage.prompt_tokens > 60  # the tool's description, the call and its result were all in the prompt


def test_chat_logprobs_pick_the_top_token_at_temperature_zero_streamed_or_not(client):
    kwargs = dict(model=MODEL, messages=[{"role": "user", "content": "Name a fruit."}], max_tokens=12,
                  temperature=0, logprobs=True, top_logprobs=3)
    r = client.chat.completions.create(**kwargs)
    content = r.choices[0].logprobs.content
    assert "".join(e.token for e in content) == r.choices[0].message.content
    for e in content:
        assert len(e.top_logprobs) == 3 and e.logprob <= 0
        assert e.logprob == pytest.approx(e.top_logprobs[0].logprob, abs=1e-4)  # the pick is the likeliest
        assert e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob >= e.top_logprobs[2].logprob
    chunks = [c for c in client.chat.completions.create(**kwargs, stream=True) if c.choices]
    streamed = [e for c in chunks if c.choices[0].logprobs for e in c.choices[0].logprobs.content or ()]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == r.choices[0].message.content
    assert [(e.token, round(e.logprob, 4)) for e in streamed] == [(e.token, round(e.logprob, 4)) for e in content]


def test_completion_logprobs_come_in_the_legacy_shape_streamed_or_not(client):
    prompt = "The capital of France is"
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert "".join(lp.tokens) == r.choices[0].text
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 8
    assert lp.text_offset[0] == len(prompt)
    assert all(len(top) <= 2 and max(top.values()) == pytest.approx(p, abs=1e-4)
               for top, p in zip(lp.top_logprobs, lp.token_logprobs, strict=True))
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0, logprobs=2,
                                            stream=True))
    tokens = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    offsets = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.text_offset]
    assert tokens == lp.tokens and offsets == lp.text_offset


def test_the_responses_api_answers_text_streamed_and_not_and_keeps_nothing(client):
    kwargs = dict(model=MODEL, instructions="Answer briefly.", input="What is the capital of France?",
                  max_output_tokens=16, temperature=0)
    r = client.responses.create(**kwargs)
    assert r.output_text.strip() and r.store is False and r.object == "response"
    assert r.status in ("completed", "incomplete")
    assert r.usage.input_tokens > 5 and r.usage.output_tokens <= 16
    assert r.usage.output_tokens_details.reasoning_tokens == 0
    if r.status == "incomplete":
        assert r.incomplete_details.reason == "max_output_tokens"
    events = list(client.responses.create(**kwargs, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:5] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added", "response.output_text.delta"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          f"response.{r.status}"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == r.output_text
    assert events[-1].response.output_text == r.output_text
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=MODEL, input="hi", previous_response_id="resp_1")
    assert e.value.body["param"] == "previous_response_id"


def test_the_responses_api_calls_tools_and_takes_their_results_back(client):
    tool = {"type": "function", "name": "get_weather", "description": "The weather now in a city",
            "parameters": WEATHER["function"]["parameters"], "strict": True}
    r = client.responses.create(model=MODEL, input="What is the weather in Paris?", tools=[tool],
                                tool_choice="required", parallel_tool_calls=False, max_output_tokens=60,
                                temperature=0)
    (call,) = r.output
    assert call.type == "function_call" and call.name == "get_weather" and call.call_id.startswith("call_")
    validate(json.loads(call.arguments), tool["parameters"])
    events = list(client.responses.create(model=MODEL, input="What is the weather in Paris?", tools=[tool],
                                          tool_choice="required", parallel_tool_calls=False, max_output_tokens=60,
                                          temperature=0, stream=True))
    deltas = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    assert deltas == call.arguments
    assert [e.arguments for e in events if e.type == "response.function_call_arguments.done"] == [call.arguments]
    after = client.responses.create(
        model=MODEL, tools=[tool], max_output_tokens=16, temperature=0, tool_choice="none",
        input=[{"role": "user", "content": "What is the weather in Paris?"},
               {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
               {"type": "function_call_output", "call_id": call.call_id, "output": '{"temperature": 21}'}])
    assert after.output_text.strip()


def test_the_responses_api_writes_json_for_a_text_format_schema(client):
    r = client.responses.create(model=MODEL, input="Describe a person who has a dog.", max_output_tokens=120,
                                temperature=0, text={"format": {"type": "json_schema", "name": "person",
                                                                "schema": PERSON, "strict": True}})
    assert r.status == "completed"
    validate(json.loads(r.output_text), PERSON)


CALLS = ('<tool_call> [{"name": "get_weather", "arguments": {"city": "Pa\\"ri}s", "n": [1, {"a": "]"}]}}, '
         '{"name": "get_time", "arguments": {}}] ')


@given(st.lists(st.integers(1, len(CALLS) - 1), max_size=20))
def test_tool_calls_are_cut_from_the_text_the_same_however_it_arrives(cuts):
    reader, events, edges = ReplyReader(ToolUse(tools=[], choice="auto", parallel=True)), [], [0, *sorted(cuts)]
    for start, end in zip(edges, [*edges[1:], len(CALLS)], strict=True):
        events += reader.feed(CALLS[start:end])
    assert reader.complete and [c.name for c in reader.calls] == ["get_weather", "get_time"]
    assert json.loads(reader.calls[0].arguments) == {"city": 'Pa"ri}s', "n": [1, {"a": "]"}]}
    assert reader.calls[1].arguments == "{}"
    assert "".join(e[2] for e in events if e[0] == "arguments" and e[1] == 0) == reader.calls[0].arguments
    assert not [e for e in events if e[0] == "content"]


@pytest.mark.parametrize("text", ["<tool", "<tool_cal> hi", "Hello <tool_call>", ""])
def test_with_tool_choice_auto_text_that_is_not_a_call_is_content(text):
    reader = ReplyReader(ToolUse(tools=[], choice="auto", parallel=False))
    events = reader.feed(text) + reader.finish()
    assert "".join(e[1] for e in events if e[0] == "content") == text and not reader.calls
