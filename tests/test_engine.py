"""The worker's Llama: its greedy shortcut picks exactly the tokens llama.cpp's own greedy sampler picks."""

from __future__ import annotations

import itertools

import llama_cpp
import pytest

from offgridd.inference.engine import Engine
from offgridd.store import ModelStore

PROMPTS = (b"The capital of France is", b"def fibonacci(n):\n", b"Once upon a time, in a village by the sea,")


@pytest.fixture(scope="module")
def model_path(model_state):
    store = ModelStore(model_state / "models")
    return str(store.path_of(store.get("gemma3-270m")))


def tokens(llm: llama_cpp.Llama, prompt: bytes, n: int, **sampling) -> list[int]:
    stream = llm.generate(llm.tokenize(prompt, add_bos=True), reset=True, **sampling)
    return list(itertools.islice(stream, n))


def test_greedy_shortcut_picks_the_same_tokens_as_llama_cpp(model_path):
    params = {"model_path": model_path, "n_ctx": 512, "n_threads": 2, "verbose": False}
    ours, theirs = Engine(**params), llama_cpp.Llama(**params)
    for prompt in PROMPTS:
        assert tokens(ours, prompt, 48, temp=0.0) == tokens(theirs, prompt, 48, temp=0.0)


def test_penalties_and_sampling_still_go_through_llama_cpp(model_path):
    llm = Engine(model_path=model_path, n_ctx=512, n_threads=2, verbose=False)
    greedy = tokens(llm, PROMPTS[0], 32, temp=0.0)
    penalised = tokens(llm, PROMPTS[0], 32, temp=0.0, repeat_penalty=1.5, presence_penalty=1.0)
    assert len(penalised) == 32 and penalised != greedy
    runs = []
    for _ in range(2):
        llm.reset()  # from scratch, as the worker runs a seeded request
        llm.set_seed(7)
        runs.append(tokens(llm, PROMPTS[2], 32, temp=0.9))
    assert runs[0] == runs[1] != tokens(llm, PROMPTS[2], 32, temp=0.0)
