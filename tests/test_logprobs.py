"""logprobs: every token frame of a request that asks carries each token's text, bytes, logprob and the likeliest
alternatives, aligned with the frame's text, computed from the logits the pick read."""

from __future__ import annotations

import math

import numpy as np
import pytest
import test_constrained
from test_constrained import SCHEMAS, constrained, validate

from offgridd.inference.logprobs import LogprobTrail, strip_lead, token_logprobs
from offgridd.inference.text import StopScanner

worker = test_constrained.worker  # the fixture: a real inference worker of the built-in model, one for this module


def entries_of(run: dict) -> list[dict]:
    for frame in run["frames"]:
        assert "".join(e["token"] for e in frame["logprobs"]) == frame["text"], frame
    return [e for frame in run["frames"] for e in frame["logprobs"]]


def test_at_temperature_zero_each_token_is_the_top_alternative_and_the_texts_line_up(worker):
    run, = worker.run({"prompt": "The capital of France is", "params": {"max_tokens": 30, "temperature": 0,
                                                                       "logprobs": 5}})
    entries = entries_of(run)
    assert len(entries) == run["end"]["completion_tokens"] == 30
    for e in entries:
        lps = [lp for _, lp in e["top"]]
        assert len(lps) == 5 and lps == sorted(lps, reverse=True) and lps[0] <= 0.0
        assert sum(math.exp(lp) for lp in lps) <= 1.0 + 1e-6
        assert e["logprob"] == lps[0]  # greedy: the pick is the best
        assert e["top"][0][0] == bytes(e["bytes"]).decode("utf-8", errors="replace")


def test_logprobs_do_not_change_what_a_seed_samples_and_zero_means_the_chosen_token_only(worker):
    sampled = {"max_tokens": 24, "temperature": 0.9, "seed": 99}
    plain, scored = worker.run({"prompt": "Once upon a time", "params": sampled},
                               {"prompt": "Once upon a time", "params": {**sampled, "logprobs": 0}})
    assert scored["text"] == plain["text"]
    entries = entries_of(scored)
    assert len(entries) == 24 and all(e["top"] == [] and e["logprob"] <= 0.0 for e in entries)
    assert "logprobs" not in plain["frames"][0]


def test_a_stop_string_cuts_the_entries_where_it_cuts_the_text(worker):
    run, = worker.run({"prompt": "1, 2, 3, 4,", "params": {"max_tokens": 30, "temperature": 0, "logprobs": 1,
                                                          "stop": [" 8"]}})
    assert run["text"] == " 5, 6, 7,"
    assert "".join(e["token"] for e in entries_of(run)) == run["text"]


def test_a_chat_reply_drops_leading_whitespace_from_its_entries_too(worker):
    run, = worker.run({"messages": [{"role": "user", "content": "Say hello."}],
                       "params": {"max_tokens": 12, "temperature": 0, "logprobs": 2}})
    entries = entries_of(run)
    assert run["text"] and not run["text"][0].isspace() and entries[0]["token"] == entries[0]["token"].lstrip()


def test_logprobs_under_a_grammar_score_the_allowed_pick_against_the_whole_vocabulary(worker):
    run, = worker.run(constrained(SCHEMAS["choice"], temperature=0, logprobs=3))
    validate(__import__("json").loads(run["text"]), SCHEMAS["choice"])
    for e in entries_of(run):
        assert e["logprob"] <= e["top"][0][1] + 1e-9


@pytest.mark.parametrize("k", [21, -1, "5", True, 2.5])
def test_logprobs_out_of_range_are_refused(worker, k):
    run, = worker.run({"prompt": "x", "params": {"logprobs": k}})
    assert run["end"]["op"] == "error" and run["end"]["status"] == 400 and "logprobs" in run["end"]["message"]


def test_the_top_alternatives_match_a_full_sort_of_the_log_softmax():
    rng = np.random.default_rng(1)
    for spread in (0.5, 40.0):  # most tokens near the best, and almost none
        logits = (rng.standard_normal(262_144) * spread).astype(np.float32)
        chosen, top = token_logprobs(logits, 7, 20)
        exact = logits.astype(np.float64) - np.log(np.exp(logits.astype(np.float64)).sum())
        assert chosen == pytest.approx(exact[7], abs=1e-4)
        assert [t for t, _ in top] == list(np.argsort(-exact, kind="stable")[:20])
        assert [lp for _, lp in top] == pytest.approx(list(np.sort(exact)[::-1][:20]), abs=1e-4)


def test_entries_wait_while_the_stop_scanner_holds_their_text_and_travel_with_it():
    scanner, trail, sent = StopScanner(("\nUser:",)), LogprobTrail(0), []
    for text in ("Hi", " there\n", "Us", "ually", "\nUser: more"):
        piece, hit = scanner.feed(text)
        trail.scored = (-1.0, [])
        trail.add(text, text.encode(), [])
        entries = trail.release(len(piece), cut=hit)
        sent.append(("".join(e["token"] for e in entries), [e["token"] for e in entries]))
    assert sent == [("Hi", ["Hi"]), ("", []), ("", []), (" there\nUsually", [" there\n", "Us", "ually"]),
                    ("", [])]
    lead = [{"token": "  "}, {"token": " Hello"}, {"token": " world"}]
    assert strip_lead(lead) is False and [e["token"] for e in lead] == ["", "Hello", " world"]


def test_multibyte_text_cut_at_any_length_keeps_text_and_entries_equal(worker):
    # a cut inside a character split across tokens leaves it to the decoder's final flush, on the last entry
    for max_tokens in range(1, 7):
        run, = worker.run({"prompt": "Japanese: 日本語の文章を書きます。", "params": {
            "max_tokens": max_tokens, "temperature": 0, "logprobs": 1}})
        assert "".join(e["token"] for e in entries_of(run)) == run["text"]


def test_a_reply_cut_inside_a_character_ends_with_one_replacement_character_on_its_last_entry(worker):
    # a rare character has no token of its own: the grammar makes the model spell it in byte tokens, and max_tokens
    # cuts it in the middle, leaving the decoder's final flush
    run, = worker.run({"prompt": "A clef:", "params": {"grammar": 'root ::= "\U0001d11e\U0001d11e"', "max_tokens": 2,
                                                       "temperature": 0, "logprobs": 1}})
    entries = entries_of(run)
    assert run["end"]["finish_reason"] == "length" and run["text"] == "\ufffd"
    assert [e["token"] for e in entries] == ["", "\ufffd"] and [len(e["bytes"]) for e in entries] == [1, 1]
