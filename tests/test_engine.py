"""The worker's Llama: its shortcuts pick exactly the tokens llama.cpp's own samplers pick."""

from __future__ import annotations

import itertools

import llama_cpp
import pytest

from offgridd.inference.engine import Engine
from offgridd.store import ModelStore

PROMPTS = (b"The capital of France is", b"def fibonacci(n):\n", b"Once upon a time, in a village by the sea,")


@pytest.fixture(scope="module")
def models(model_state) -> tuple[Engine, llama_cpp.Llama]:
    """The worker's Llama and llama-cpp-python's own, on the built-in model."""
    store = ModelStore(model_state / "models")
    params = {"model_path": str(store.path_of(store.get("gemma3-270m"))), "n_ctx": 512, "n_threads": 2,
              "verbose": False}
    return Engine(**params), llama_cpp.Llama(**params)


def tokens(llm: llama_cpp.Llama, prompt: bytes, n: int, **sampling) -> list[int]:
    stream = llm.generate(llm.tokenize(prompt, add_bos=True), reset=True, **sampling)
    return list(itertools.islice(stream, n))


def test_greedy_shortcut_picks_the_same_tokens_as_llama_cpp(models):
    ours, theirs = models
    for prompt in PROMPTS:
        assert tokens(ours, prompt, 48, temp=0.0) == tokens(theirs, prompt, 48, temp=0.0)


def test_penalties_still_go_through_llama_cpp_and_seeds_repeat(models):
    llm = models[0]
    greedy = tokens(llm, PROMPTS[0], 32, temp=0.0)
    penalised = tokens(llm, PROMPTS[0], 32, temp=0.0, repeat_penalty=1.5, presence_penalty=1.0)
    assert len(penalised) == 32 and penalised != greedy
    runs = []
    for _ in range(2):
        llm.reset()  # from scratch, as the worker runs a seeded request
        llm.set_seed(7)
        runs.append(tokens(llm, PROMPTS[2], 32, temp=0.9))
    assert runs[0] == runs[1] != tokens(llm, PROMPTS[2], 32, temp=0.0)


@pytest.mark.parametrize("sampling", [{"temp": 0.8}, {"temp": 1.3, "top_k": 100, "min_p": 0.0, "top_p": 1.0},
                                      {"temp": 0.7, "top_k": 1000, "top_p": 0.9}])
def test_sampling_from_the_tokens_near_the_top_picks_what_the_whole_vocabulary_gives(models, sampling):
    for seed, prompt in enumerate(PROMPTS, start=1):
        runs = []
        for llm in models:
            llm.reset()
            llm.set_seed(seed)
            runs.append(tokens(llm, prompt, 40, **sampling))
        assert runs[0] == runs[1]
