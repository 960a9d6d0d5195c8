"""The inference worker: a child process that owns one llama.cpp model and serves every request it is given at once.

Started by the daemon as `python -m offgridd.inference.worker --fd N ...` with one end of a socketpair. One thread
runs the scheduler (batch.py): each loop takes the frames that arrived (requests, cancels, thread changes), starts
requests while slots are free, runs one decode step for all of them, sends their text, and reads the socket until the
daemon has acked that text, so the daemon's work runs between decode steps. If the daemon goes away, the worker exits.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
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


class Worker:
    def __init__(self, channel: BlockingChannel, args: argparse.Namespace):
        from .engine import Engine

        self.channel = channel
        self.args = args
        self.llm = Engine(
            model_path=args.model_path, n_ctx=args.ctx * args.sequences, n_threads=args.threads,
            n_threads_batch=args.threads, n_batch=args.batch, n_gpu_layers=args.gpu_layers,
            flash_attn=bool(args.flash_attn), verbose=False, safe=bool(args.safe), n_seq=args.sequences,
        )
        if args.threads_now != args.threads:
            self.set_threads(args.threads_now)
        self.embedder = None
        self.n_ctx = self.llm.n_ctx() // args.sequences  # each sequence's own cells
        meta = self.llm.metadata
        self.template = meta.get("tokenizer.chat_template")
        self.bos = self._token_text(self.llm.token_bos())
        self.eos = self._token_text(self.llm.token_eos())
        self.scheduler = None  # made once the self-test is done with the context
        self.cancelled: set[int] = set()
        self.unacked: set[int] = set()  # requests whose last text the daemon has not passed on yet
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

    def pump(self, timeout: float | None) -> bool:
        """Take one frame off the socket: acks, cancels and thread changes at once, requests into the inbox.

        Returns False when no frame came within the timeout (or the daemon left)."""
        try:
            frame = self.channel.receive(timeout)
        except (OSError, FrameError) as e:  # a broken daemon end: the worker has no one to serve
            log.error("worker channel failed: %s", e)
            frame = None
        if frame is None:
            self.closed = True
            return False
        if frame is TIMED_OUT:
            return False
        op = frame["op"]
        if op == "ack":
            self.unacked.discard(frame["id"])
        elif op == "cancel":
            self.cancelled.add(frame["id"])
            self.unacked.discard(frame["id"])
        elif op == "threads":
            self.set_threads(int(frame["n"]))
        else:
            self.inbox.append(frame)
        return True

    def serve(self, checked: dict) -> None:
        from .batch import Scheduler

        self.scheduler = Scheduler(self.llm, self.n_ctx, self.args.batch)
        self.channel.send({"op": "ready", "version": VERSION, "model": self.args.model_name, "n_ctx": self.n_ctx,
                           "sequences": self.args.sequences, "pid": os.getpid(), "chat_template": bool(self.template),
                           "self_test": checked})
        while not self.closed:
            if not self.scheduler.running and not self.inbox:
                self.pump(None)
                continue
            while self.pump(0):  # whatever arrived during the last step
                pass
            self.admit()
            try:
                frames = self.scheduler.step(self.cancelled)
            except (ValueError, RuntimeError, KeyError, TypeError) as e:
                log.exception("a decode step failed")
                frames = self.scheduler.fail_all(f"inference failed: {e}")
            for frame in frames:
                self.send(frame)
            # wait for the daemon to pass the text on: its work then runs between decode steps, not during one, where
            # on a small board it would stall llama.cpp's spinning threads (a slow daemon costs at most ACK_WAIT_S)
            deadline = time.monotonic() + ACK_WAIT_S
            while self.unacked and not self.closed and (left := deadline - time.monotonic()) > 0:
                self.pump(left)

    def send(self, frame: dict) -> None:
        rid = frame["id"]
        if frame["op"] == "token":
            self.unacked.add(rid)
        elif frame["op"] in ("done", "error"):
            self.unacked.discard(rid)
            self.cancelled.discard(rid)
        self.channel.send(frame)

    def admit(self) -> None:
        """Start waiting requests while the scheduler has free slots; embeddings run here, between steps."""
        while self.inbox and self._can_start(self.inbox[0]):
            frame = self.inbox.popleft()
            rid = frame.get("id", 0)
            try:
                if rid in self.cancelled:
                    self.send({"op": "done", "id": rid, "finish_reason": "cancelled", "prompt_tokens": 0,
                               "completion_tokens": 0})
                elif frame["op"] == "generate":
                    self.start(rid, frame)
                elif frame["op"] == "embed":
                    self.embed(rid, frame["input"])
                    self.cancelled.discard(rid)
                else:
                    raise RequestError(400, f"unknown operation {frame['op']!r}")
            except RequestError as e:
                self.send({"op": "error", "id": rid, "status": e.status, "message": str(e)})
            except (ValueError, RuntimeError, KeyError, TypeError) as e:
                log.exception("request %s failed", rid)
                self.send({"op": "error", "id": rid, "status": 500, "message": f"inference failed: {e}"})

    def _can_start(self, frame: dict) -> bool:
        """A generation waits for a slot for each choice (one asking for more than there are starts, to be refused)."""
        return frame["op"] != "generate" or self.scheduler.has_room(min(_choices(frame), len(self.scheduler.slots)))

    def prompt_for(self, frame: dict) -> ChatPrompt:
        if frame.get("messages") is not None:
            tools = (frame.get("params") or {}).get("tools")  # OpenAI's list, for the prompt only
            if self.template:
                return render_template(self.template, self.bos, self.eos, frame["messages"], tools)
            return render_transcript(frame["messages"], tools)
        return ChatPrompt(frame["prompt"], (), add_bos=True)

    def start(self, rid: int, frame: dict) -> None:
        params = frame.get("params") or {}
        if _choices(frame) > len(self.scheduler.slots):
            raise RequestError(400, f"n={_choices(frame)} is more choices than this box decodes at once "
                                    f"({len(self.scheduler.slots)})")
        from jinja2 import TemplateError

        try:
            prompt = self.prompt_for(frame)
        except (ValueError, TemplateError) as e:  # the template's raise_exception, e.g. roles that do not alternate
            raise RequestError(400, f"the model's chat template refused these messages: {e}") from None
        tokens = self.llm.tokenize(prompt.text.encode("utf-8"), add_bos=prompt.add_bos, special=True)
        if len(tokens) >= self.n_ctx:
            raise RequestError(400, f"the prompt is {len(tokens)} tokens; this model's context holds {self.n_ctx}")
        from .batch import InvalidParams
        from .engine import InvalidGrammar

        try:
            self.scheduler.start(rid, tokens, params, prompt.stops + tuple(params.get("stop") or ()),
                                 lead=frame.get("messages") is not None)
        except (InvalidParams, InvalidGrammar) as e:
            raise RequestError(400, str(e)) from None
        self.send({"op": "start", "id": rid, "prompt_tokens": len(tokens)})

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



def _choices(frame: dict) -> int:
    """How many sequences a generation needs: OpenAI's n."""
    return int((frame.get("params") or {}).get("n") or 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="offgridd-worker")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--model-name", required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--ctx", type=int, required=True)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--sequences", type=int, default=1, help="requests decoded together")
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
