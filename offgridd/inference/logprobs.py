"""Log probabilities of the tokens a sequence produced, as OpenAI reports them, and the text each token produced.

The distribution is the model's own: a log-softmax of the raw logits over the whole vocabulary, before penalties,
temperature, top-k/top-p or a grammar shape the pick. It costs a sum of exponentials over the vocabulary (0.24 ms for
Gemma 3's 262k tokens) and a small sort: the top k lie among the tokens within SPREADS[0] of the best whenever there
are at least k of them (a few hundred, typically), else a partition of the whole vocabulary finds them.

Each entry travels in the token frame that carries its text, so the entries' "token" strings concatenate to exactly
the frame's text: an entry waits while the stop scanner holds back any of its text, the leading whitespace a chat
reply drops is dropped from the entries too, and a stop string cuts the entry it starts in and drops the ones after.
"""

from __future__ import annotations

import math

import numpy as np

from .engine import SPREADS

MAX_TOP = 20  # OpenAI's bound on top_logprobs


def token_logprobs(logits: np.ndarray, token: int, k: int) -> tuple[float, list[tuple[int, float]]]:
    """The chosen token's logprob and the k likeliest tokens with theirs, best first (lower id first on ties)."""
    best = float(logits.max())
    norm = best + math.log(float(np.exp(logits - best).sum(dtype=np.float64)))
    chosen = float(logits[token]) - norm
    if k <= 0:
        return chosen, []
    pool = np.flatnonzero(logits >= best - SPREADS[0])
    if pool.size < k:
        pool = np.sort(np.argpartition(logits, -k)[-k:])
    top = pool[np.argsort(-logits[pool], kind="stable")[:k]]
    return chosen, [(int(t), float(logits[t]) - norm) for t in top]


class LogprobTrail:
    """One sequence's entries: {"token": str, "bytes": [int], "logprob": float, "top": [[str, float], ...]}."""

    def __init__(self, k: int):
        self.k = k
        self.scored: tuple[float, list[tuple[int, float]]] | None = None  # the last pick's, until its text is known
        self.pending: list[dict] = []  # entries whose text the stop scanner has not all released
        self.credit = 0  # characters released beyond the entries already released
        self.ready: list[dict] = []  # released entries, for the next token frame

    def add(self, text: str, raw: bytes, top: list[list]) -> None:
        logprob, _ = self.scored
        self.pending.append({"token": text, "bytes": list(raw), "logprob": logprob, "top": top})
        self.scored = None

    def release(self, n: int, cut: bool = False) -> list[dict]:
        """The entries whose text is now wholly out, given that the stop scanner released `n` more characters; when
        `cut` (a stop string), the text ended there: the entry it ends in is cut short and the rest dropped."""
        self.credit += n
        out = []
        while self.pending and len(self.pending[0]["token"]) <= self.credit:
            entry = self.pending.pop(0)
            self.credit -= len(entry["token"])
            out.append(entry)
        if cut:
            if self.pending and self.credit:
                entry = self.pending[0]
                entry["token"] = entry["token"][:self.credit]
                out.append(entry)
            self.pending.clear()
            self.credit = 0
        return out

    def take(self) -> list[dict]:
        out, self.ready = self.ready, []
        return out


def strip_lead(entries: list[dict]) -> bool:
    """Drop a chat reply's leading whitespace from its first entries; True while no visible text has come."""
    for entry in entries:
        entry["token"] = entry["token"].lstrip()
        if entry["token"]:
            return False
    return True
