"""The worker's text handling between llama.cpp and the socket: batching, stop strings and frame splitting."""

from __future__ import annotations

import struct

import msgpack
import pytest

from offgridd.inference.protocol import MAX_FRAME, FrameBuffer, FrameError, encode
from offgridd.inference.text import HOLD_S, StopScanner, TextBatch

MS = 0.001


def feed(batch: TextBatch, pieces: list[str], step_s: float) -> list[str]:
    """What the batch sends for one piece per step, then what is left at the end."""
    sent = [out for k, piece in enumerate(pieces) if (out := batch.add(piece, 100.0 + k * step_s))]
    return sent + ([rest] if (rest := batch.take()) else [])


def test_the_first_text_goes_at_once_and_close_tokens_travel_together():
    assert TextBatch().add("The", 100.0) == "The"
    assert feed(TextBatch(hold_s=20 * MS), list("abcde"), 11 * MS) == ["a", "bc", "de"]
    assert feed(TextBatch(hold_s=50 * MS), list("abcdefghij"), 11 * MS) == ["a", "bcdef", "ghij"]


def test_tokens_slower_than_the_hold_go_one_by_one():
    assert feed(TextBatch(), ["a", "b", "c", "d"], HOLD_S + 5 * MS) == ["a", "b", "c", "d"]


def test_fast_tokens_group_but_no_text_waits_past_the_hold():
    pieces = [str(k % 10) for k in range(40)]
    batch, step = TextBatch(), 4 * MS
    times = [100.0 + k * step for k in range(len(pieces))]
    decoded_at, waits, sent = {}, [], []
    for k, (piece, now) in enumerate(zip(pieces, times, strict=True)):
        decoded_at[k] = now
        if out := batch.add(piece, now):
            first = k - len(out) + 1
            waits.append(now - decoded_at[first])
            sent.append(out)
    sent.append(batch.take())
    assert "".join(sent) == "".join(pieces)
    assert max(len(s) for s in sent) > 1
    assert max(waits) <= HOLD_S + 1e-9


def test_text_held_back_by_the_stop_scanner_sends_nothing():
    batch = TextBatch()
    assert batch.add("Hi", 100.0) == "Hi"
    assert batch.add("", 100.05) == ""
    assert batch.take() == ""


def test_stop_scanner_holds_only_what_could_become_a_stop_and_cuts_at_it():
    scan = StopScanner(("\nUser:",))
    assert scan.feed("Paris is") == ("Paris is", False)
    assert scan.feed(" nice\nUs") == (" nice", False)
    assert scan.feed("ually") == ("\nUsually", False)
    assert scan.feed(" yes\nUser: more") == (" yes", True)
    scan = StopScanner(("\nUser:",))
    assert scan.feed("end\nUse") == ("end", False)
    assert scan.flush() == "\nUse"


def test_frames_come_out_whole_however_the_stream_is_cut():
    frames = [{"op": "token", "id": k, "text": "é" * k, "n": k} for k in range(1, 30)]
    stream = b"".join(encode(f) for f in frames)
    for cut in (1, 3, 7, len(stream)):
        buf, got = FrameBuffer(), []
        for i in range(0, len(stream), cut):
            got += buf.feed(stream[i:i + cut])
        assert got == frames


def test_a_frame_over_the_limit_or_not_a_map_is_refused():
    with pytest.raises(FrameError, match="exceeds"):
        FrameBuffer().feed(struct.pack(">I", MAX_FRAME + 1))
    body = msgpack.packb([1, 2, 3])
    with pytest.raises(FrameError, match="not a map"):
        FrameBuffer().feed(struct.pack(">I", len(body)) + body)
