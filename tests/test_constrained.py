"""Structured output: a request with a grammar gets text the grammar accepts, even from the 270M base model, and the
requests decoded beside it get the text they get alone."""

from __future__ import annotations

import ctypes
import json
import re
import socket
import subprocess
import sys
import time

import llama_cpp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from offgridd.inference.engine import _TOKEN_DATA, Engine, SequenceSampler, logits_of
from offgridd.inference.grammar import (
    TOOL_MARKER,
    GrammarError,
    grammar_for_json_object,
    grammar_for_schema,
    grammar_for_tools,
    parse_tool_calls,
)
from offgridd.inference.protocol import BlockingChannel
from offgridd.store import ModelStore


class WorkerLink:
    """The daemon's side of a real worker process on the built-in model, without HTTP."""

    def __init__(self, model_path: str, log_path, sequences: int = 4, ctx: int = 1024):
        ours, theirs = socket.socketpair()
        self.log = open(log_path, "wb")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "offgridd.inference.worker", "--fd", str(theirs.fileno()), "--model-path",
             model_path, "--model-name", "gemma3-270m", "--threads", "2", "--ctx", str(ctx), "--sequences",
             str(sequences)], pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, stdout=self.log,
            stderr=self.log)
        theirs.close()
        self.channel = BlockingChannel(ours)
        self.next_id = 1
        while (frame := self.channel.receive(300))["op"] != "ready":
            assert frame["op"] == "loaded", frame

    def run(self, *requests: dict) -> list[dict]:
        """Send every request at once; each result has its text, token frames and done (or error) frame."""
        ids = []
        for request in requests:
            ids.append(self.next_id)
            self.channel.send({"op": "generate", "id": self.next_id, **request})
            self.next_id += 1
        results = {rid: {"text": "", "frames": [], "end": None} for rid in ids}
        while any(r["end"] is None for r in results.values()):
            frame = self.channel.receive(300)
            assert isinstance(frame, dict) and frame.get("op") != "timed-out", "the worker went quiet"
            result = results.get(frame.get("id"))
            if frame["op"] == "token":
                self.channel.send({"op": "ack", "id": frame["id"]})
                result["frames"].append(frame)
                result["text"] += frame["text"]
            elif frame["op"] in ("done", "error"):
                result["end"] = frame
        return [results[rid] for rid in ids]

    def close(self) -> None:
        self.channel.sock.close()
        self.proc.wait(30)
        self.log.close()


@pytest.fixture(scope="module")
def worker(model_state, tmp_path_factory):
    store = ModelStore(model_state / "models")
    link = WorkerLink(str(store.path_of(store.get("gemma3-270m"))), tmp_path_factory.mktemp("worker") / "log")
    yield link
    link.close()


def validate(value, schema: dict, root: dict | None = None, path: str = "$") -> None:
    """A small JSON Schema check of the keywords these tests use; raises AssertionError naming the place."""
    root = root or schema
    if "$ref" in schema:
        target = root
        for part in schema["$ref"][2:].split("/"):
            target = target[part]
        return validate(value, target, root, path)
    if "anyOf" in schema:
        errors = []
        for option in schema["anyOf"]:
            try:
                return validate(value, option, root, path)
            except AssertionError as e:
                errors.append(str(e))
        raise AssertionError(f"{path}: matches no anyOf option: {errors}")
    if "enum" in schema:
        assert value in schema["enum"], f"{path}: {value!r} not in {schema['enum']}"
    if "const" in schema:
        assert value == schema["const"], f"{path}: {value!r} is not {schema['const']!r}"
    kinds = schema.get("type")
    if kinds is not None:
        kinds = kinds if isinstance(kinds, list) else [kinds]
        assert any(_is(value, kind) for kind in kinds), f"{path}: {value!r} is not {kinds}"
    if isinstance(value, dict):
        props = schema.get("properties", {})
        for name in schema.get("required", []):
            assert name in value, f"{path}: lacks required {name!r}"
        for name, item in value.items():
            if name in props:
                validate(item, props[name], root, f"{path}.{name}")
            else:
                assert schema.get("additionalProperties", True) is not False, f"{path}: extra property {name!r}"
    if isinstance(value, list) and "items" in schema:
        assert schema.get("minItems", 0) <= len(value) <= schema.get("maxItems", len(value)), f"{path}: item count"
        for i, item in enumerate(value):
            validate(item, schema["items"], root, f"{path}[{i}]")
    if isinstance(value, str):
        assert len(value) <= schema.get("maxLength", len(value)), f"{path}: too long"
        if "pattern" in schema:
            assert re.search(schema["pattern"], value), f"{path}: {value!r} does not match {schema['pattern']}"


def _is(value, kind: str) -> bool:
    if kind in ("integer", "number") and isinstance(value, bool):
        return False
    return isinstance(value, {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None),
                              "integer": int, "number": int | float}[kind])


ADDRESS = {"type": "object", "properties": {"street": {"type": "string", "maxLength": 40},
                                            "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
           "required": ["street", "zip"], "additionalProperties": False}
SCHEMAS = {
    "person": {"type": "object", "additionalProperties": False, "required": ["name", "age", "home"],
               "properties": {"name": {"type": "string", "maxLength": 30}, "age": {"type": "integer"},
                              "home": {"$ref": "#/$defs/address"},
                              "nickname": {"type": ["string", "null"], "maxLength": 20}},
               "$defs": {"address": ADDRESS}},
    "order": {"type": "object", "required": ["status", "items", "paid"], "additionalProperties": False,
              "properties": {"status": {"enum": ["open", "shipped", "cancelled"]}, "paid": {"type": "boolean"},
                             "items": {"type": "array", "minItems": 1, "maxItems": 2,
                                       "items": {"$ref": "#/definitions/line"}}},
              "definitions": {"line": {"type": "object", "additionalProperties": False,
                                       "required": ["sku", "quantity"],
                                       "properties": {"sku": {"type": "string", "maxLength": 12},
                                                      "quantity": {"type": "integer"},
                                                      "price": {"type": "number"}}}}},
    "choice": {"anyOf": [{"type": "object", "properties": {"answer": {"const": "yes"}}, "required": ["answer"]},
                         {"type": "object", "properties": {"answer": {"enum": ["no", "maybe"]},
                                                           "why": {"type": "string", "maxLength": 40}},
                          "required": ["answer", "why"]}]},
}
PLAIN_PROMPTS = ("The capital of France is", "1, 2, 3, 4,", "Once upon a time")


def constrained(schema: dict, **params) -> dict:
    prompt = "A JSON document, as the API returned it:\n"
    return {"prompt": prompt, "params": {"max_tokens": 300, "grammar": grammar_for_schema(schema), **params}}


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_output_under_a_schema_parses_and_validates_greedy_and_sampled(worker, name):
    schema = SCHEMAS[name]
    runs = worker.run(constrained(schema, temperature=0), constrained(schema, temperature=0.9, seed=11),
                      constrained(schema, temperature=1.2, seed=12, top_k=100))
    for run in runs:
        assert run["end"]["op"] == "done" and run["end"]["finish_reason"] == "stop", run
        validate(json.loads(run["text"]), schema)


def test_a_json_object_grammar_gives_each_choice_an_object_and_ends_when_it_closes(worker):
    run, = worker.run({"prompt": "Settings file:\n", "params": {"grammar": grammar_for_json_object(), "n": 2,
                                                                "max_tokens": 200, "temperature": 0.7, "seed": 3}})
    assert run["end"]["finish_reasons"] == ["stop", "stop"]
    for index in (0, 1):  # each choice has a grammar of its own
        text = "".join(f["text"] for f in run["frames"] if f["index"] == index)
        assert isinstance(json.loads(text), dict)


def test_a_constrained_request_beside_three_plain_ones_leaves_their_text_unchanged(worker):
    greedy = {"max_tokens": 40, "temperature": 0}
    plain = [{"prompt": p, "params": greedy} for p in PLAIN_PROMPTS]
    worker.run(*plain, constrained(SCHEMAS["person"], temperature=0))  # a fresh context's first batch differs
    alone = [worker.run(request)[0]["text"] for request in plain]
    constrained_alone = worker.run(constrained(SCHEMAS["person"], temperature=0))[0]["text"]
    together = worker.run(plain[0], constrained(SCHEMAS["person"], temperature=0), *plain[1:])
    assert [together[0]["text"], together[2]["text"], together[3]["text"]] == alone
    assert together[1]["text"] == constrained_alone
    validate(json.loads(together[1]["text"]), SCHEMAS["person"])


def test_a_constrained_sequence_that_runs_out_of_tokens_ends_with_length(worker):
    run, = worker.run(constrained(SCHEMAS["person"], temperature=0, max_tokens=6))
    assert run["end"]["finish_reason"] == "length" and run["end"]["completion_tokens"] == 6
    assert run["text"].startswith("{")


def test_a_grammar_llama_cpp_cannot_parse_is_refused_and_takes_no_slot(worker):
    bad = [{"prompt": "x", "params": {"grammar": grammar, "n": 2}}
           for grammar in ("root ::= undefined-rule", "rule ::= \"a\"", "root ::= root \"a\"", "  ", 42)]
    for run in worker.run(*bad):
        assert run["end"]["op"] == "error" and run["end"]["status"] == 400, run
    # all four slots are still free
    runs = worker.run(*[{"prompt": p, "params": {"max_tokens": 4}} for p in PLAIN_PROMPTS + ("Hi",)])
    assert [r["end"]["finish_reason"] for r in runs] == ["length"] * 4


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
                                            "parameters": {"type": "object", "additionalProperties": False,
                                                           "properties": {"city": {"type": "string",
                                                                                   "maxLength": 30},
                                                                          "unit": {"enum": ["C", "F"]}},
                                                           "required": ["city", "unit"]}}}
CLOCK = {"type": "function", "function": {"name": "current_time"}}


@pytest.mark.parametrize(("choice", "parallel"), [("required", False), ("get_weather", False), ("required", True)])
def test_a_tool_grammar_yields_calls_whose_arguments_validate(worker, choice, parallel):
    grammar = grammar_for_tools([WEATHER, CLOCK], choice, parallel=parallel, max_calls=2)
    run, = worker.run({"prompt": "Call a tool to learn the weather in Paris:\n",
                       "params": {"grammar": grammar, "max_tokens": 200, "temperature": 0.8, "seed": 5}})
    assert run["end"]["finish_reason"] == "stop"
    calls = parse_tool_calls(run["text"])
    assert 1 <= len(calls) <= (2 if parallel else 1)
    for call in calls:
        assert call["name"] in (("get_weather",) if choice == "get_weather" else ("get_weather", "current_time"))
        params = WEATHER["function"]["parameters"] if call["name"] == "get_weather" else {
            "type": "object", "additionalProperties": False}
        validate(call["arguments"], params)


def test_with_tool_choice_auto_the_reply_is_text_or_a_marked_call(worker):
    grammar = grammar_for_tools([WEATHER], "auto")
    runs = worker.run({"prompt": "The weather in Paris is", "params": {"grammar": grammar, "max_tokens": 12,
                                                                      "temperature": 0}},
                      {"prompt": f"To get the weather, call the tool:\n{TOOL_MARKER}",
                       "params": {"grammar": grammar, "max_tokens": 60, "temperature": 0}})
    assert parse_tool_calls(runs[0]["text"], "auto") is None and not runs[0]["text"].startswith("<")
    assert runs[0]["end"]["finish_reason"] == "length"
    # a prompt that ends with the marker makes the model repeat it; the call after it must then validate
    text = runs[1]["text"]
    if text.startswith(TOOL_MARKER):
        call, = parse_tool_calls(text, "auto")
        validate(call["arguments"], WEATHER["function"]["parameters"])


@pytest.mark.parametrize(("schema", "path", "words"), [
    ({"type": "integer", "minimum": 1}, "#/minimum", "'minimum' is not supported"),
    ({"type": "object", "properties": {"a": {"oneOf": [{"type": "string"}]}}}, "#/properties/a/oneOf", "oneOf"),
    ({"$ref": "https://example.com/s.json"}, "#/$ref", "only local references"),
    ({"properties": {"a": {"$ref": "#/$defs/missing"}}}, "#/properties/a/$ref", "points to nothing"),
    ({"$defs": {"node": {"type": "object", "properties": {"next": {"$ref": "#/$defs/node"}}}},
      "$ref": "#/$defs/node"}, "#/$defs/node/properties/next/$ref", "recursive reference"),
    ({"type": "object", "properties": {"a": {"type": "string"}}, "required": ["b"]}, "#/required", "['b']"),
    ({"type": "string", "format": "email"}, "#/format", "format 'email'"),
    ({"type": "string", "pattern": "(?=lookahead)"}, "#/pattern", "cannot be turned into a grammar"),
    ({"allOf": [{"type": "object"}, {"required": []}]}, "#/allOf", "only with one subschema"),
    ({"type": "array", "items": {"type": "string"}, "uniqueItems": True}, "#/uniqueItems", "not supported"),
    ({"$ref": "#/$defs/a", "maxLength": 3, "$defs": {"a": {"type": "string"}}}, "#", "beside '$ref'"),
    ({"anyOf": [{"type": "string"}], "type": "object"}, "#", "beside 'anyOf'"),
    ({"type": "decimal"}, "#/type", "unknown type"),
    ({"type": "object", "properties": {"a": True, "b": False}}, "#/properties/b", "boolean schemas"),
])
def test_a_schema_the_grammar_cannot_guarantee_is_refused_naming_the_part(schema, path, words):
    with pytest.raises(GrammarError) as e:
        grammar_for_schema(schema)
    assert e.value.path == path and words in e.value.message


def test_tool_errors_name_the_tool():
    with pytest.raises(GrammarError) as e:
        grammar_for_tools([WEATHER, {"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "properties": {"n": {"type": "integer", "maximum": 3}}}}}])
    assert e.value.path == "#/tools/1/function/parameters/properties/n/maximum"
    with pytest.raises(GrammarError, match="not among the tools"):
        grammar_for_tools([WEATHER], "get_time")
    with pytest.raises(GrammarError, match="at least one function"):
        grammar_for_tools([], "required")


def test_what_the_converter_mishandles_is_normalised_before_it_sees_it():
    # a $defs entry named like a built-in rule ("string", "value") must not alias it
    schema = {"type": "object", "required": ["v"], "properties": {"v": {"$ref": "#/$defs/value"}},
              "$defs": {"value": {"enum": [1, 2]}}}
    assert 'v-kv ::= "\\"v\\"" space ":" space v' in grammar_for_schema(schema)
    assert "\n".join(line for line in grammar_for_schema(schema).splitlines() if line.startswith("v ::=")) == \
        'v ::= "1" | "2"'
    # a type list keeps the keywords beside it
    nullable = grammar_for_schema({"type": ["string", "null"], "enum": ["a", None]})
    assert '"\\"a\\""' in nullable and "char" not in nullable
    # strings may not hold raw control characters
    assert "\\x00-\\x1F" in grammar_for_json_object()


def test_grammar_checks_take_little_time():
    began = time.perf_counter()
    for _ in range(20):
        grammar_for_schema(SCHEMAS["order"])
    assert time.perf_counter() - began < 1.0


KEYWORDS = ("type", "properties", "required", "additionalProperties", "items", "prefixItems", "minItems", "maxItems",
            "enum", "const", "anyOf", "oneOf", "allOf", "$ref", "$defs", "pattern", "minLength", "maxLength", "format",
            "minimum", "title", "x")
_scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 2000), st.sampled_from(
    ["object", "array", "string", "integer", "number", "null", "date", "#/$defs/a", "#/$defs", "#", "^a{2}$", "a"]))
_values = st.recursive(_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.one_of(st.sampled_from(KEYWORDS), st.text(max_size=3)), inner,
                                                 max_size=4)), max_leaves=12)


@pytest.fixture(scope="module")
def vocab(model_state):
    store = ModelStore(model_state / "models")
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(str(store.path_of(store.get("gemma3-270m"))).encode(), params)
    yield llama_cpp.llama_model_get_vocab(model)
    llama_cpp.llama_model_free(model)


@settings(max_examples=300, deadline=None)
@given(schema=st.dictionaries(st.sampled_from(KEYWORDS), _values, max_size=5))
def test_any_schema_gives_a_grammar_llama_cpp_parses_or_a_grammar_error_and_nothing_else(vocab, schema):
    try:
        grammar = grammar_for_schema(schema)
    except GrammarError as e:
        assert e.path.startswith("#")
        return
    sampler = llama_cpp.llama_sampler_init_grammar(vocab, grammar.encode(), b"root")
    assert sampler, grammar
    llama_cpp.llama_sampler_free(sampler)


def test_greedy_under_a_grammar_is_the_best_allowed_token_of_the_whole_vocabulary(model_state):
    store = ModelStore(model_state / "models")
    llm = Engine(model_path=str(store.path_of(store.get("gemma3-270m"))), n_ctx=512, n_threads=2, verbose=False)
    grammar, vocab = grammar_for_schema(SCHEMAS["order"]), llm._model.vocab
    ours = SequenceSampler(llm.vocab_size, 0, temperature=0.0, grammar=grammar, vocab=vocab)
    reference = llama_cpp.llama_sampler_init_grammar(vocab, grammar.encode(), b"root")
    everything = np.arange(llm.vocab_size, dtype=np.int32)
    llm.eval(llm.tokenize(b"A JSON document, as the API returned it:\n", add_bos=True))
    for _ in range(60):
        logits = logits_of(llm.ctx, -1, llm.vocab_size)
        candidates = np.empty(llm.vocab_size, _TOKEN_DATA)
        candidates["id"], candidates["logit"], candidates["p"] = everything, logits, 0.0
        array = llama_cpp.llama_token_data_array(data=candidates.ctypes.data_as(llama_cpp.llama_token_data_p),
                                                 size=llm.vocab_size, selected=-1, sorted=False)
        llama_cpp.llama_sampler_apply(reference, ctypes.byref(array))
        expected = int(np.argmax(candidates["logit"]))
        token = ours.pick(llm.ctx, -1)
        assert token == expected
        if llama_cpp.llama_vocab_is_eog(vocab, token):
            break
        llama_cpp.llama_sampler_accept(reference, token)
        llm.eval([token])
    ours.close()
    llama_cpp.llama_sampler_free(reference)
