"""The inference worker: a child process that owns one llama.cpp model and runs requests one at a time.

Started by the daemon as `python -m offgridd.inference.worker --fd N ...` with one end of a socketpair. One thread:
after sending text it reads the socket until the daemon's ack, so cancels, thread changes and new requests are taken
in between tokens. If the daemon goes away, the worker exits.
"""

from __future__ import annotations

import argparse
import codecs
import ctypes
import logging
import os
import random
import resource
import signal
import socket
import sys
import time
from collections import deque

from .prompts import ChatPrompt, render_template, render_transcript
from .protocol import TIMED_OUT, VERSION, BlockingChannel, FrameError

log = logging.getLogger("offgridd.worker")

ACK_WAIT_S = 0.05
# Text waits at most this long to travel with the next tokens': every frame costs the daemon and the client a wake-up
# and ~0.3 ms of CPU taken from decoding, and 50 ms is half of the 0.1 s under which a reader sees a change as
# instantaneous. At 11 ms a token this sends five tokens a frame; at 50 ms or more a token, each goes alone.
HOLD_S = 0.05
_SAMPLING = ("temperature", "top_p", "top_k", "min_p", "repeat_penalty", "presence_penalty", "frequency_penalty")


class RequestError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _die_with_parent() -> None:
    """Ask the kernel for SIGKILL when the daemon dies, so no orphan keeps a model in memory."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class StopScanner:
    """Finds stop strings in streamed text, holding back only what could still become one."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = tuple(s for s in stops if s)
        self.held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to emit, whether a stop string was hit)."""
        buf = self.held + text
        hits = [i for s in self.stops if (i := buf.find(s)) >= 0]
        if hits:
            self.held = ""
            return buf[: min(hits)], True
        keep = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(buf)), keep, -1):
                if s.startswith(buf[-k:]):
                    keep = k
                    break
        self.held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out


class TextBatch:
    """Holds decoded text so that tokens decoded close together travel in one frame, but none waits past HOLD_S.

    The first text goes at once (time to first token); after that, text is held while it can wait for the next token,
    judged by how long the last step took.
    """

    def __init__(self, hold_s: float = HOLD_S):
        self.hold_s = hold_s
        self.held: list[str] = []
        self.since = 0.0  # when the oldest held text was decoded
        self.last: float | None = None
        self.sent = False

    def add(self, piece: str, now: float) -> str:
        """Text to send now ("" to hold it)."""
        step = now - self.last if self.last is not None else 0.0
        self.last = now
        if piece:
            if not self.held:
                self.since = now
            self.held.append(piece)
        if self.held and (not self.sent or now - self.since + step > self.hold_s):
            self.sent = True
            return self.take()
        return ""

    def take(self) -> str:
        out = "".join(self.held)
        self.held.clear()
        return out


class Worker:
    def __init__(self, channel: BlockingChannel, args: argparse.Namespace):
        from .engine import Engine

        self.channel = channel
        self.args = args
        self.llm = Engine(
            model_path=args.model_path, n_ctx=args.ctx, n_threads=args.threads, n_threads_batch=args.threads,
            n_batch=args.batch, n_gpu_layers=args.gpu_layers, flash_attn=bool(args.flash_attn), verbose=False,
            safe=bool(args.safe),
        )
        if args.threads_now != args.threads:
            self.set_threads(args.threads_now)
        self.embedder = None
        self.n_ctx = self.llm.n_ctx()
        meta = self.llm.metadata
        self.template = meta.get("tokenizer.chat_template")
        self.bos = self._token_text(self.llm.token_bos())
        self.eos = self._token_text(self.llm.token_eos())
        self.cancelled: set[int] = set()
        self.inbox: deque[dict] = deque()  # requests not started yet, in order
        self.closed = False

    def set_threads(self, n: int) -> None:
        """Takes effect at the next decode step, also mid-generation: this is how heat slows us down."""
        import llama_cpp

        llama_cpp.llama_set_n_threads(self.llm.ctx, n, n)
        self.llm.context_params.n_threads = self.llm.context_params.n_threads_batch = n

    def _token_text(self, token: int) -> str:
        if token < 0:
            return ""
        return self.llm.detokenize([token], special=True).decode("utf-8", errors="ignore")

    def pump(self, timeout: float | None, until_ack: bool = False) -> None:
        """Take frames off the socket: cancels and thread changes at once, requests into the inbox.

        Returns at the daemon's ack (until_ack), once a request is waiting, at the timeout, or when the daemon left.
        """
        while not self.closed:
            try:
                frame = self.channel.receive(timeout)
            except (OSError, FrameError) as e:  # a broken daemon end: the worker has no one to serve
                log.error("worker channel failed: %s", e)
                frame = None
            if frame is None:
                self.closed = True
            elif frame is TIMED_OUT:
                return
            elif frame["op"] == "ack":
                if until_ack:
                    return
            elif frame["op"] == "cancel":
                self.cancelled.add(frame["id"])
            elif frame["op"] == "threads":
                self.set_threads(int(frame["n"]))
            else:
                self.inbox.append(frame)
                if not until_ack:
                    return

    def serve(self, checked: dict) -> None:
        self.channel.send({"op": "ready", "version": VERSION, "model": self.args.model_name, "n_ctx": self.n_ctx,
                           "pid": os.getpid(), "chat_template": bool(self.template), "self_test": checked})
        while not self.closed:
            if not self.inbox:
                self.pump(None)
                continue
            frame = self.inbox.popleft()
            rid = frame.get("id", 0)
            try:
                if rid in self.cancelled:
                    self.channel.send({"op": "done", "id": rid, "finish_reason": "cancelled", "prompt_tokens": 0,
                                       "completion_tokens": 0})
                elif frame["op"] == "generate":
                    self.generate(rid, frame)
                elif frame["op"] == "embed":
                    self.embed(rid, frame["input"])
                else:
                    raise RequestError(400, f"unknown operation {frame['op']!r}")
            except RequestError as e:
                self.channel.send({"op": "error", "id": rid, "status": e.status, "message": str(e)})
            except (ValueError, RuntimeError, KeyError, TypeError) as e:
                log.exception("request %s failed", rid)
                self.channel.send({"op": "error", "id": rid, "status": 500, "message": f"inference failed: {e}"})
            finally:
                self.cancelled.discard(rid)

    def prompt_for(self, frame: dict) -> ChatPrompt:
        if frame.get("messages") is not None:
            if self.template:
                return render_template(self.template, self.bos, self.eos, frame["messages"])
            return render_transcript(frame["messages"])
        return ChatPrompt(frame["prompt"], (), add_bos=True)

    def generate(self, rid: int, frame: dict) -> None:
        import llama_cpp

        params = frame.get("params") or {}
        prompt = self.prompt_for(frame)
        tokens = self.llm.tokenize(prompt.text.encode("utf-8"), add_bos=prompt.add_bos, special=True)
        if len(tokens) >= self.n_ctx:
            raise RequestError(400, f"the prompt is {len(tokens)} tokens; this model's context holds {self.n_ctx}")
        room = self.n_ctx - len(tokens)
        limit = min(params.get("max_tokens") or room, room)
        stops = StopScanner(prompt.stops + tuple(params.get("stop") or ()))
        if params.get("seed") is not None:
            # reusing a cached prefix evaluates the prompt in other batch shapes, which moves the logits a little:
            # a seeded request evaluates from scratch so the same request samples the same text
            self.llm.reset()
            self.llm.set_seed(params["seed"])
        else:
            self.llm.set_seed(random.getrandbits(31))
        sampling = {k: params[k] for k in _SAMPLING if params.get(k) is not None}
        if "temperature" in sampling:
            sampling["temp"] = sampling.pop("temperature")
        vocab = self.llm._model.vocab
        text = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.channel.send({"op": "start", "id": rid, "prompt_tokens": len(tokens)})
        produced, finish = 0, "length"
        lead = frame.get("messages") is not None  # a chat reply starts at its first visible character
        batch = TextBatch()
        for token in self.llm.generate(tokens, reset=True, **sampling):
            if self.closed or rid in self.cancelled:
                finish = "cancelled"
                break
            if llama_cpp.llama_vocab_is_eog(vocab, token):
                finish = "stop"
                break
            produced += 1
            piece, hit = stops.feed(text.decode(self.llm.detokenize([token])))
            if lead:
                piece = piece.lstrip()
                lead = not piece
            if out := batch.add(piece, time.monotonic()):
                self.channel.send({"op": "token", "id": rid, "text": out, "n": produced})
                # wait for the daemon to pass the text on: its work then runs between decode steps, not during
                # one, where on a small board it would stall llama.cpp's spinning threads (a slow daemon costs
                # at most ACK_WAIT_S); cancels arrive here too
                self.pump(ACK_WAIT_S, until_ack=True)
            if hit:
                finish = "stop"
                break
            if produced >= limit:
                break
        if finish != "cancelled" and (tail := batch.take() + stops.flush() + text.decode(b"", final=True)):
            self.channel.send({"op": "token", "id": rid, "text": tail, "n": produced})
        self.channel.send({"op": "done", "id": rid, "finish_reason": finish, "prompt_tokens": len(tokens),
                           "completion_tokens": produced})

    def embed(self, rid: int, inputs: list[str]) -> None:
        from llama_cpp import LLAMA_POOLING_TYPE_MEAN, Llama

        if self.embedder is None:
            self.embedder = Llama(
                model_path=self.args.model_path, n_ctx=self.args.ctx, n_threads=self.args.threads,
                n_batch=self.args.ctx, n_ubatch=self.args.ctx, embedding=True, pooling_type=LLAMA_POOLING_TYPE_MEAN,
                verbose=False,
            )
        counts = [len(self.embedder.tokenize(s.encode("utf-8"), add_bos=True)) for s in inputs]
        if max(counts, default=0) > self.args.ctx:
            raise RequestError(400, f"an input is {max(counts)} tokens; embeddings take at most {self.args.ctx}")
        data = [self.embedder.embed(s, normalize=True) for s in inputs]
        self.channel.send({"op": "embedding", "id": rid, "data": data, "prompt_tokens": sum(counts)})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="offgridd-worker")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--model-name", required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--ctx", type=int, required=True)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--gpu-layers", type=int, default=0)
    parser.add_argument("--flash-attn", type=int, default=1)
    parser.add_argument("--threads-now", type=int, default=0, help="threads to use now (lowered when hot)")
    parser.add_argument("--memory-limit", type=int, default=0, help="address-space limit in bytes")
    parser.add_argument("--safe", type=int, default=0, help="load without repacked weights (after an engine fault)")
    args = parser.parse_args(argv)
    args.threads_now = args.threads_now or args.threads
    if args.memory_limit:
        resource.setrlimit(resource.RLIMIT_AS, (args.memory_limit, args.memory_limit))
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="worker %(levelname)s %(message)s")
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the daemon decides when the worker stops
    channel = BlockingChannel(socket.socket(fileno=args.fd))
    try:
        worker = Worker(channel, args)
    except (ValueError, RuntimeError, OSError, MemoryError) as e:
        channel.send({"op": "error", "id": 0, "status": 500, "message": f"model failed to load: {e}"})
        return 1
    # From here a failure is the engine's, not the model's: the daemon may load again on the safe path.
    from .engine import SelfTestFailed, self_test

    channel.send({"op": "loaded", "safe": bool(args.safe)})
    try:
        checked = self_test(worker.llm).to_dict()
    except (SelfTestFailed, ValueError, RuntimeError) as e:
        channel.send({"op": "error", "id": 0, "status": 500, "message": f"engine self-test failed: {e}"})
        return 3
    worker.serve(checked)
    return 0


if __name__ == "__main__":
    sys.exit(main())
