"""llama-cpp-python's Llama with two shortcuts in picking a token, both giving the token llama.cpp would give.

llama.cpp's sampler copies every logit into a candidate array before choosing, and its top-k step then sorts through
all of them; with Gemma 3's 262k-token vocabulary that costs about 0.35 ms a token on a small CPU.
- A greedy pick (temperature 0, no penalties) is numpy's argmax over the logits: 0.04 ms, the first of equal maxima,
  as llama.cpp's greedy sampler takes.
- A sampled pick whose chain starts with top-k (llama-cpp-python's chain at temperature > 0, no penalties) hands the
  same chain only the tokens within 10 (else 20) logits of the best. They hold the top k whenever there are at least k
  of them, so top-k keeps the same tokens in the same order and every later step sees the same array; with fewer, the
  whole vocabulary goes in as before: about 0.07 ms instead of 0.2 ms.
Anything else (penalties, grammars, mirostat, logit processors) goes through llama.cpp's sampler chain unchanged.
A SequenceSampler with a grammar checks the likeliest tokens against it first (docs/structured-output.md).

The engine can also load on a *safe path*: no extra buffer types, so weights are not repacked into the CPU's special
layouts (AMX on x86, the Q4_0 interleave that makes ARM fast). It exists for CPUs whose repacked kernels crash
(ggml-org/llama.cpp#20824 on AMX Xeons) and is chosen only after a self-test on the normal path failed.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import time
from dataclasses import asdict, dataclass

import llama_cpp
import llama_cpp.llama_cpp as llama_lib
import numpy as np

SPREADS = (10.0, 20.0)  # logits below the best: typically a few hundred tokens within 10, thousands within 20
# A grammar is checked against the tokens within SPREADS[0] of the best first (~200 tokens, 0.17 ms), then the best
# 4096, then 32768, and only then the whole vocabulary (28 ms for Gemma 3's 262k tokens).
GRAMMAR_TIERS = (4096, 32768)
_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])  # llama_token_data


SELF_TEST_PROMPT = "The capital of France is"
SELF_TEST_TOKENS = 4
# Fault injection for tests: "self-test" crashes the normal path's self-test with SIGSEGV, as the AMX bug does;
# "self-test-always" crashes the safe path's too.
FAULT_ENV = "OFFGRID_ENGINE_FAULT"


@contextlib.contextmanager
def _defaults(which: str, **fields):
    """Set fields of llama.cpp's model or context parameters that Llama() has no argument for, inside the block."""
    original = getattr(llama_lib, which)

    def params():
        p = original()
        for key, value in fields.items():
            setattr(p, key, value)
        return p

    setattr(llama_lib, which, params)
    try:
        yield
    finally:
        setattr(llama_lib, which, original)


class Engine(llama_cpp.Llama):
    """n_seq sequences share the context, each with n_ctx / n_seq cells of its own (llama.cpp's non-unified cache)."""

    def __init__(self, *args, safe: bool = False, n_seq: int = 1, **kwargs):
        self.safe = safe
        self.n_seq = n_seq
        with (_defaults("llama_model_default_params", use_extra_bufts=False) if safe else contextlib.nullcontext(),
              _defaults("llama_context_default_params", n_seq_max=n_seq, kv_unified=False)):
            super().__init__(*args, **kwargs)
        self.vocab_size = self.n_vocab()

    def sample(self, *, top_k: int = 40, temp: float = 0.8, repeat_penalty: float = 1.0,
               frequency_penalty: float = 0.0, presence_penalty: float = 0.0, mirostat_mode: int = 0,
               idx: int | None = None, **rest) -> int:
        plain = (repeat_penalty == 1.0 and frequency_penalty == 0.0 and presence_penalty == 0.0 and mirostat_mode == 0
                 and not rest.get("grammar") and not rest.get("logits_processor"))
        row = idx - self.n_tokens if idx is not None else -1
        if plain and temp == 0.0:
            return int(np.argmax(self._logits(row)))
        if plain and temp > 0.0 and 0 < top_k < self.vocab_size and self._sampler is not None:
            token = self._sample_near_top(row, top_k)
            if token is not None:
                return token
        return super().sample(top_k=top_k, temp=temp, repeat_penalty=repeat_penalty,
                              frequency_penalty=frequency_penalty, presence_penalty=presence_penalty,
                              mirostat_mode=mirostat_mode, idx=idx, **rest)

    def _logits(self, row: int) -> np.ndarray:
        return logits_of(self.ctx, row, self.vocab_size)

    def _sample_near_top(self, row: int, k: int) -> int | None:
        return pick_near_top(self._logits(row), k, self._sampler.sampler)


def logits_of(ctx, row: int, vocab_size: int) -> np.ndarray:
    """The logits of one output row of the last decode, without a copy."""
    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, row), shape=(vocab_size,))


def pick_near_top(logits: np.ndarray, k: int, chain) -> int | None:
    """Run the sampler chain over the tokens near the best logit only; None when fewer than k are near it."""
    best = logits.max()
    for spread in SPREADS:
        near = np.flatnonzero(logits >= best - spread)
        if near.size >= k:
            break
    else:
        return None
    candidates = np.empty(near.size, _TOKEN_DATA)
    candidates["id"], candidates["logit"], candidates["p"] = near, logits[near], 0.0
    array = llama_cpp.llama_token_data_array(
        data=candidates.ctypes.data_as(llama_cpp.llama_token_data_p), size=near.size, selected=-1, sorted=False)
    llama_cpp.llama_sampler_apply(chain, ctypes.byref(array))
    token = array.data[array.selected].id  # a step may point `data` at its own buffer
    llama_cpp.llama_sampler_accept(chain, token)
    return token


PENALTY_LAST_N = 64  # llama-cpp-python's last_n_tokens_size


class InvalidGrammar(ValueError):
    """llama.cpp could not parse a request's grammar."""


class SequenceSampler:
    """One request's token picker: the chain llama-cpp-python builds for the same parameters (and defaults), with
    the greedy and near-top shortcuts above, and optionally a GBNF grammar every pick obeys. Owns llama.cpp
    samplers: close() it."""

    def __init__(self, vocab_size: int, seed: int, *, temperature: float = 0.8, top_k: int = 40, top_p: float = 0.95,
                 min_p: float = 0.05, repeat_penalty: float = 1.0, frequency_penalty: float = 0.0,
                 presence_penalty: float = 0.0, grammar: str | None = None, vocab=None):
        self.vocab_size = vocab_size
        self.grammar = None
        if grammar is not None:
            if not grammar.strip():
                raise InvalidGrammar("the grammar is empty")
            self.grammar = llama_cpp.llama_sampler_init_grammar(vocab, grammar.encode("utf-8"), b"root")
            if not self.grammar:  # llama.cpp logs the parser's reason to stderr and returns NULL
                self.grammar = None
                raise InvalidGrammar("llama.cpp could not parse the grammar (an undefined rule, no 'root' rule, "
                                     "left recursion or a syntax error)")
            self.vocab = vocab
        penalties = (repeat_penalty, frequency_penalty, presence_penalty) != (1.0, 0.0, 0.0)
        self.greedy = temperature == 0.0 and not penalties
        self.near_top = not penalties and temperature > 0.0 and 0 < top_k < vocab_size
        self.top_k = top_k
        lib = llama_cpp
        self.chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        steps = []
        if penalties:
            steps.append(lib.llama_sampler_init_penalties(vocab_size, PENALTY_LAST_N, repeat_penalty,
                                                          frequency_penalty, presence_penalty))
        if temperature == 0.0:
            steps.append(lib.llama_sampler_init_greedy())
        elif temperature < 0.0:
            steps.append(lib.llama_sampler_init_dist(seed))
        else:
            steps += [lib.llama_sampler_init_top_k(top_k), lib.llama_sampler_init_typical(1.0, 1),
                      lib.llama_sampler_init_top_p(top_p, 1), lib.llama_sampler_init_min_p(min_p, 1),
                      lib.llama_sampler_init_temp(temperature), lib.llama_sampler_init_dist(seed)]
        for step in steps:
            lib.llama_sampler_chain_add(self.chain, step)  # the chain owns them from here

    def pick(self, ctx, row: int) -> int:
        """The next token from output row `row` of the last decode."""
        if self.grammar is not None:
            return self._pick_constrained(logits_of(ctx, row, self.vocab_size))
        if self.greedy:
            return int(np.argmax(logits_of(ctx, row, self.vocab_size)))
        if self.near_top and (token := pick_near_top(logits_of(ctx, row, self.vocab_size), self.top_k,
                                                     self.chain)) is not None:
            return token
        return llama_cpp.llama_sampler_sample(self.chain, ctx, row)

    def _pick_constrained(self, logits: np.ndarray) -> int:
        """The chain's pick among the tokens the grammar allows, looking at the likeliest tokens first.

        Greedy, this is exactly the best allowed token. Sampled, it draws among the allowed tokens of the first tier
        that has any; tokens ranked below that tier are left out (see docs/structured-output.md)."""
        if self.greedy:
            best = int(np.argmax(logits))
            if self._allows(best, logits):
                return self._accept(best)
        for ids in _tiers(logits):
            candidates = _candidates(ids, logits)
            _apply(self.grammar, candidates)
            candidates = candidates[candidates["logit"] > -np.inf]
            if candidates.size:
                break
        else:  # the grammar allows nothing, not even an end: end the sequence rather than write invalid text
            return llama_cpp.llama_vocab_eos(self.vocab)
        if self.greedy:
            return self._accept(int(candidates["id"][np.argmax(candidates["logit"])]))
        array = _apply(self.chain, candidates)
        token = int(array.data[array.selected].id)
        llama_cpp.llama_sampler_accept(self.chain, token)
        return self._accept(token)

    def _allows(self, token: int, logits: np.ndarray) -> bool:
        one = _candidates(np.array([token], np.int32), logits)
        _apply(self.grammar, one)
        return bool(one["logit"][0] > -np.inf)

    def _accept(self, token: int) -> int:
        # an end of generation is never fed to the grammar: llama.cpp aborts on one it cannot end with, and the
        # sequence ends with it anyway
        if not llama_cpp.llama_vocab_is_eog(self.vocab, token):
            llama_cpp.llama_sampler_accept(self.grammar, token)
        return token

    def close(self) -> None:
        if self.chain is not None:
            llama_cpp.llama_sampler_free(self.chain)
            self.chain = None
        if self.grammar is not None:
            llama_cpp.llama_sampler_free(self.grammar)
            self.grammar = None


def _tiers(logits: np.ndarray):
    """Token ids in falling tiers of likelihood: near the best, then the best of GRAMMAR_TIERS, then all the rest."""
    near = np.flatnonzero(logits >= logits.max() - SPREADS[0])
    yield near
    seen = np.zeros(logits.size, bool)
    seen[near] = True
    sizes = [n for n in GRAMMAR_TIERS if near.size < n < logits.size]
    if sizes:
        order = np.argpartition(logits, [logits.size - n for n in reversed(sizes)])
        for n in sizes:
            tier = order[logits.size - n:]
            tier = np.sort(tier[~seen[tier]])
            yield tier
            seen[tier] = True
    yield np.flatnonzero(~seen)


def _candidates(ids: np.ndarray, logits: np.ndarray) -> np.ndarray:
    candidates = np.empty(ids.size, _TOKEN_DATA)
    candidates["id"], candidates["logit"], candidates["p"] = ids, logits[ids], 0.0
    return candidates


def _apply(sampler, candidates: np.ndarray):
    """Run a llama.cpp sampler over a candidate array in place; returns the array struct (`selected`, `data`)."""
    array = llama_cpp.llama_token_data_array(
        data=candidates.ctypes.data_as(llama_cpp.llama_token_data_p), size=candidates.size, selected=-1,
        sorted=False)
    llama_cpp.llama_sampler_apply(sampler, ctypes.byref(array))
    return array


@dataclass(frozen=True, slots=True)
class SelfTest:
    tokens: int
    seconds: float
    text: str
    safe: bool

    def to_dict(self) -> dict:
        return asdict(self)


class SelfTestFailed(RuntimeError):
    pass


def self_test(engine: Engine) -> SelfTest:
    """Decode a few tokens greedily and check the logits are numbers: proves the kernels this CPU will run."""
    fault = os.environ.get(FAULT_ENV, "")
    if fault == "self-test-always" or (fault == "self-test" and not engine.safe):
        os.kill(os.getpid(), signal.SIGSEGV)
    begun = time.perf_counter()
    tokens = engine.tokenize(SELF_TEST_PROMPT.encode(), add_bos=True)
    out: list[int] = []
    for token in engine.generate(tokens, temp=0.0, reset=True):
        if not np.isfinite(engine._logits(-1)).all():
            raise SelfTestFailed("the engine produced logits that are not numbers")
        out.append(token)
        if len(out) == SELF_TEST_TOKENS:
            break
    engine.reset()
    if not out:
        raise SelfTestFailed("the engine produced no token")
    text = engine.detokenize(out).decode("utf-8", errors="replace")
    return SelfTest(len(out), round(time.perf_counter() - begun, 3), text, engine.safe)
