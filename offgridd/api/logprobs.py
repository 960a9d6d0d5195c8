"""Log probabilities in OpenAI's two shapes, from the worker's per-token entries ({"token", "bytes", "logprob",
"top": [[text, logprob], ...]}; docs/structured-output.md)."""

from __future__ import annotations


def chat_content(entries: list[dict]) -> list[dict]:
    """Chat's `logprobs.content`: one object per token, its alternatives best first."""
    return [{"token": e["token"], "logprob": e["logprob"], "bytes": e["bytes"],
             "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode("utf-8", "replace"))}
                              for t, lp in e["top"]]} for e in entries]


def chat(entries: list[dict]) -> dict:
    return {"content": chat_content(entries), "refusal": None}


class Legacy:
    """/v1/completions' `logprobs`: parallel lists, and each token's offset in the prompt and completion together."""

    def __init__(self, prompt: str):
        self.offset = len(prompt)

    def shape(self, entries: list[dict]) -> dict:
        tokens, offsets = [], []
        for e in entries:
            tokens.append(e["token"])
            offsets.append(self.offset)
            self.offset += len(e["token"])
        return {"tokens": tokens, "token_logprobs": [e["logprob"] for e in entries],
                "top_logprobs": [dict(e["top"]) for e in entries], "text_offset": offsets}
