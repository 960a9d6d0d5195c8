"""Continuous batching: every request the worker takes is a sequence of one llama.cpp context, and each decode step
carries one token for every generating sequence plus a chunk of a newcomer's prompt.

On a CPU a decode step is bound by reading the weights, so a step that carries a token for four sequences costs
little more than one for a single sequence. A sequence lives in a slot (llama.cpp's seq_id) whose n_ctx KV cells it
owns. A finished sequence leaves its tokens in the slot, so a later request that starts with the same tokens (a
system prompt, a conversation's history) takes that slot and evaluates only what is new.

A request for n choices is n sequences of one prompt: the first evaluates it, the others copy its cells and take
their first token from its logits, each with a sampler of its own. The request is done when all of them are.
"""

from __future__ import annotations

import codecs
import random
import time
from dataclasses import dataclass, field

import llama_cpp

from .engine import Engine, SequenceSampler, logits_of
from .logprobs import MAX_TOP, LogprobTrail, strip_lead, token_logprobs
from .text import StopScanner, TextBatch

SAMPLING = ("temperature", "top_p", "top_k", "min_p", "repeat_penalty", "presence_penalty", "frequency_penalty")
# While others generate, a newcomer's prompt goes in chunks of this many tokens, so a long prompt delays their next
# token by one short step instead of one long one; alone, it goes in chunks of the whole batch.
PREFILL_CHUNK = 128
MAX_GRAMMAR_CHARS = 1 << 20


class DecodeError(RuntimeError):
    pass


class InvalidParams(ValueError):
    """A request parameter the worker cannot honour; the request is refused with status 400."""


@dataclass(eq=False)
class Slot:
    seq_id: int
    cached: list[int] = field(default_factory=list)  # the tokens whose KV cells the slot holds, from position 0
    busy: bool = False


@dataclass(eq=False)
class Request:
    """The choices of one request, and what its done frame reports."""

    rid: int
    prompt_tokens: int
    reasons: list[str | None]
    produced: int = 0


@dataclass(eq=False)
class Sequence:
    request: Request
    index: int  # the choice it produces
    slot: Slot
    prompt: list[int]
    limit: int
    sampler: SequenceSampler
    stops: StopScanner
    lead: bool  # a chat reply starts at its first visible character
    decoder: codecs.IncrementalDecoder = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace"))
    held: TextBatch = field(default_factory=TextBatch)
    produced: int = 0
    pending: int | None = None  # sampled, not yet in the KV cache
    row: int = -1  # the output row of this step's decode that holds its logits
    chunk: int = 0  # prompt tokens in this step's batch
    follows: Sequence | None = None  # the sequence evaluating the prompt this one shares, until it has
    trail: LogprobTrail | None = None  # when the request asked for logprobs

    @property
    def rid(self) -> int:
        return self.request.rid

    @property
    def prefilling(self) -> bool:
        return self.follows is None and len(self.slot.cached) < len(self.prompt)


class Scheduler:
    def __init__(self, engine: Engine, n_ctx: int, n_batch: int):
        self.engine = engine
        self.ctx = engine.ctx
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.n_ctx = n_ctx  # cells per sequence
        self.n_batch = n_batch
        self.n_swa = llama_cpp.llama_model_n_swa(engine.model)
        self.vocab = engine._model.vocab
        self.slots = [Slot(i) for i in range(engine.n_seq)]
        self.running: list[Sequence] = []  # in the order they arrived
        self.batch = llama_cpp.llama_batch_init(n_batch + len(self.slots), 0, 1)
        llama_cpp.llama_memory_clear(self.memory, True)

    def has_room(self, n: int = 1) -> bool:
        return len(self.running) + n <= len(self.slots)

    def start(self, rid: int, tokens: list[int], params: dict, stops: tuple[str, ...], lead: bool) -> None:
        """Put a request's n choices in free slots, the first in the one holding the longest prefix of its prompt."""
        n = params.get("n") or 1
        seeded = params.get("seed") is not None
        room = self.n_ctx - len(tokens)
        sampling = {k: params[k] for k in SAMPLING if params.get(k) is not None}
        grammar, top = _grammar_of(params), _logprobs_of(params)
        samplers: list[SequenceSampler] = []
        try:  # every sampler first: a grammar llama.cpp refuses must leave no slot taken
            for index in range(n):
                seed = (params["seed"] + index) % (1 << 32) if seeded else random.getrandbits(31)
                samplers.append(SequenceSampler(self.engine.vocab_size, seed, grammar=grammar, vocab=self.vocab,
                                                **sampling))
        except ValueError:
            for sampler in samplers:
                sampler.close()
            raise
        request = Request(rid, len(tokens), [None] * n)
        first = None
        for index, sampler in enumerate(samplers):
            slot = self._slot_for(tokens, reuse=not seeded and index == 0)
            slot.busy = True
            seq = Sequence(request=request, index=index, slot=slot, prompt=tokens,
                           limit=min(params.get("max_tokens") or room, room), sampler=sampler,
                           stops=StopScanner(stops), lead=lead, follows=first,
                           trail=LogprobTrail(top) if top is not None else None)
            first = first or seq
            self.running.append(seq)

    def _slot_for(self, tokens: list[int], reuse: bool) -> Slot:
        """A free slot with its cells cut back to the prefix of `tokens` it can reuse (none unless `reuse`)."""
        free = [s for s in self.slots if not s.busy]
        if reuse:
            slot = max(free, key=lambda s: _common_prefix(s.cached, tokens))
            # the last prompt token is evaluated again: its logits pick the first new token
            common = min(_common_prefix(slot.cached, tokens), len(tokens) - 1)
        else:
            # a seeded request evaluates its prompt from scratch (a cached prefix was evaluated in other batch shapes,
            # which moves the logits a little, and the same request must sample the same text); the other choices
            # of a request get the first choice's cells copied in
            slot, common = min(free, key=lambda s: len(s.cached)), 0
        mem, seq_id = self.memory, slot.seq_id
        if common > 0:
            # sliding-window layers keep only the last n_swa positions: a prefix older than that cannot be reused
            pos_min = llama_cpp.llama_memory_seq_pos_min(mem, seq_id)
            if pos_min > max(0, common - self.n_swa) or not llama_cpp.llama_memory_seq_rm(mem, seq_id, common, -1):
                common = 0
        if common == 0:
            llama_cpp.llama_memory_seq_rm(mem, seq_id, -1, -1)
        del slot.cached[common:]
        return slot

    def step(self, cancelled: set[int]) -> list[dict]:
        """One decode step over every running sequence; returns the frames to send."""
        out: list[dict] = []
        for seq in [s for s in self.running if s.rid in cancelled]:
            if seq in self.running:  # a cancelled choice takes the rest of its request with it
                out += self._finish(seq, "cancelled")
        in_batch = self._fill_batch()
        if not in_batch:
            return out
        code = llama_cpp.llama_decode(self.ctx, self.batch)
        if code != 0:
            for request in {s.request: None for s in in_batch}:
                out += self._fail(request, f"llama.cpp could not decode this step (code {code})")
            return out
        now = time.monotonic()
        for seq in in_batch:
            if seq.pending is not None:
                seq.slot.cached.append(seq.pending)
                seq.pending = None
            seq.slot.cached += seq.prompt[len(seq.slot.cached):len(seq.slot.cached) + seq.chunk]
            seq.chunk = 0
            if seq.row >= 0:
                row, seq.row = seq.row, -1
                # the other choices of its request copy the prompt's cells and pick from the same logits
                for other in [s for s in self.running if s.follows is seq]:
                    llama_cpp.llama_memory_seq_cp(self.memory, seq.slot.seq_id, other.slot.seq_id, -1, -1)
                    other.slot.cached[:] = seq.slot.cached
                    other.follows = None
                    out += self._advance(other, self._pick(other, row), now)
                out += self._advance(seq, self._pick(seq, row), now)
        return out

    def _fill_batch(self) -> list[Sequence]:
        b, n, members = self.batch, 0, []

        def add(token: int, pos: int, seq: Sequence, logits: bool) -> None:
            nonlocal n
            b.token[n], b.pos[n], b.n_seq_id[n], b.logits[n] = token, pos, 1, logits
            b.seq_id[n][0] = seq.slot.seq_id
            if logits:
                seq.row = n
            n += 1

        generating = [s for s in self.running if s.pending is not None]
        for seq in generating:
            add(seq.pending, len(seq.slot.cached), seq, True)
            members.append(seq)
        budget = min(self.n_batch - n, PREFILL_CHUNK) if generating else self.n_batch
        for seq in self.running:
            if budget <= 0:
                break
            if not seq.prefilling:
                continue
            first = len(seq.slot.cached)
            seq.chunk = min(budget, len(seq.prompt) - first)
            for pos in range(first, first + seq.chunk):
                add(seq.prompt[pos], pos, seq, pos == len(seq.prompt) - 1)
            budget -= seq.chunk
            members.append(seq)
        b.n_tokens = n
        return members

    def _pick(self, seq: Sequence, row: int) -> int:
        token = seq.sampler.pick(self.ctx, row)
        if seq.trail is not None:  # from the logits the pick read, before the next decode replaces them
            seq.trail.scored = token_logprobs(logits_of(self.ctx, row, self.engine.vocab_size), token, seq.trail.k)
        return token

    def _advance(self, seq: Sequence, token: int, now: float) -> list[dict]:
        if llama_cpp.llama_vocab_is_eog(self.vocab, token):
            return self._finish(seq, "stop")
        seq.produced += 1
        raw = self.engine.detokenize([token])
        decoded = seq.decoder.decode(raw)
        piece, hit = seq.stops.feed(decoded)
        if seq.trail is not None:
            piece = self._trail(seq, decoded, raw, len(piece), hit)
        elif seq.lead:
            piece = piece.lstrip()
            seq.lead = not piece
        out = []
        if text := seq.held.add(piece, now):
            out.append(self._token_frame(seq, text))
        if hit:
            return out + self._finish(seq, "stop")
        if seq.produced >= seq.limit:
            return out + self._finish(seq, "length")
        seq.pending = token
        return out

    def _trail(self, seq: Sequence, decoded: str, raw: bytes, released: int, hit: bool) -> str:
        """Record the token's logprobs; the text to send is exactly that of the entries now released."""
        trail = seq.trail
        _, top = trail.scored
        trail.add(decoded, raw, [[self._piece(t), lp] for t, lp in top])
        entries = trail.release(released, cut=hit)
        if seq.lead:
            seq.lead = strip_lead(entries)
        trail.ready += entries
        return "".join(e["token"] for e in entries)

    def _piece(self, token: int) -> str:
        return self.engine.detokenize([token]).decode("utf-8", errors="replace")

    def _token_frame(self, seq: Sequence, text: str) -> dict:
        frame = {"op": "token", "id": seq.rid, "index": seq.index, "text": text, "n": seq.produced}
        if seq.trail is not None:
            frame["logprobs"] = seq.trail.take()
        return frame

    def _finish(self, seq: Sequence, reason: str) -> list[dict]:
        out = []
        if reason != "cancelled":
            rest, last = seq.stops.flush(), seq.decoder.decode(b"", True)
            if seq.trail is not None:
                entries = seq.trail.release(len(rest))
                rest = "".join(e["token"] for e in entries)
                seq.trail.ready += entries
                if seq.trail.ready:  # bytes of a character the reply never finished go with the last token
                    seq.trail.ready[-1]["token"] += last
                else:
                    last = ""
            if (tail := seq.held.take() + rest + last) or (seq.trail is not None and seq.trail.ready):
                out.append(self._token_frame(seq, tail))
        request = seq.request
        request.reasons[seq.index] = reason
        request.produced += seq.produced
        self._release(seq)
        if reason == "cancelled":
            for other in [s for s in self.running if s.request is request]:
                request.reasons[other.index] = reason
                request.produced += other.produced
                self._release(other)
        if None not in request.reasons:
            out.append({"op": "done", "id": request.rid, "finish_reason": request.reasons[0],
                        "finish_reasons": request.reasons, "prompt_tokens": request.prompt_tokens,
                        "completion_tokens": request.produced})
        return out

    def _fail(self, request: Request, message: str) -> list[dict]:
        for seq in [s for s in self.running if s.request is request]:
            self._release(seq)
            llama_cpp.llama_memory_seq_rm(self.memory, seq.slot.seq_id, -1, -1)  # its cells are in an unknown state
            seq.slot.cached.clear()
        return [{"op": "error", "id": request.rid, "status": 500, "message": message}]

    def fail_all(self, message: str) -> list[dict]:
        requests = {s.request: None for s in self.running}  # each once, in order
        return [frame for request in requests for frame in self._fail(request, message)]

    def _release(self, seq: Sequence) -> None:
        seq.sampler.close()
        seq.slot.busy = False
        seq.pending, seq.row, seq.chunk, seq.follows = None, -1, 0, None
        self.running.remove(seq)


def _grammar_of(params: dict) -> str | None:
    grammar = params.get("grammar")
    if grammar is not None and (not isinstance(grammar, str) or len(grammar) > MAX_GRAMMAR_CHARS):
        raise InvalidParams(f"grammar must be a GBNF string of at most {MAX_GRAMMAR_CHARS} characters")
    return grammar


def _logprobs_of(params: dict) -> int | None:
    k = params.get("logprobs")
    if k is None or k is False:
        return None
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= MAX_TOP:
        raise InvalidParams(f"logprobs must be a whole number from 0 to {MAX_TOP} (the alternatives per token)")
    return k


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
