"""Worker frames: a 4-byte big-endian length, then one msgpack map. Version 1.

Daemon -> worker:
  {"op": "generate", "id": int, "prompt": str | None, "messages": list | None, "params": {...}}
                                                              params may hold n: that many choices of one prompt
  {"op": "embed", "id": int, "input": [str, ...]}
  {"op": "cancel", "id": int}
  {"op": "ack", "id": int}                                     the token frame before this was passed on
  {"op": "threads", "id": 0, "n": int}                         use n threads from the next decode step
Worker -> daemon:
  {"op": "loaded", "safe": bool}                              the model is in memory; the engine self-test runs next
  {"op": "ready", "model": str, "n_ctx": int, "sequences": int, "pid": int, "version": 1, "self_test": {...}}
                                                              n_ctx per sequence; sequences decoded together
  {"op": "start", "id": int, "prompt_tokens": int}            generation began (the queue wait is over)
  {"op": "token", "id": int, "index": int, "text": str, "n": int}
                                                              text of one or more tokens of choice `index`; n
                                                              produced so far in that choice
  {"op": "done", "id": int, "finish_reason": "stop" | "length" | "cancelled", "finish_reasons": [str, ...],
   "prompt_tokens": int, "completion_tokens": int}            after every choice ended: finish_reason is choice 0's,
                                                              completion_tokens the sum over choices
  {"op": "embedding", "id": int, "data": [[float, ...], ...], "prompt_tokens": int}
  {"op": "error", "id": int, "status": int, "message": str}
"""

from __future__ import annotations

import select
import socket
import struct
import time
from collections import deque

import msgpack

VERSION = 1
MAX_FRAME = 64 << 20
_LEN = struct.Struct(">I")


class FrameError(Exception):
    """The peer sent something that is not a frame of this protocol."""


def encode(obj: dict) -> bytes:
    body = msgpack.packb(obj, use_bin_type=True)
    if len(body) > MAX_FRAME:
        raise FrameError(f"frame of {len(body)} bytes exceeds {MAX_FRAME}")
    return _LEN.pack(len(body)) + body


def decode(body: bytes) -> dict:
    try:
        obj = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as e:
        raise FrameError(f"undecodable frame: {e}") from None
    if not isinstance(obj, dict) or "op" not in obj:
        raise FrameError("frame is not a map with an 'op'")
    return obj


class FrameBuffer:
    """Splits a byte stream into frames, however the bytes were cut into reads."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[dict]:
        """Add bytes; returns the frames they complete, in order."""
        buf = self._buffer
        buf += data
        frames = []
        while len(buf) >= _LEN.size:
            (n,) = _LEN.unpack_from(buf)
            if n > MAX_FRAME:
                raise FrameError(f"frame of {n} bytes exceeds {MAX_FRAME}")
            if len(buf) < _LEN.size + n:
                break
            frames.append(decode(bytes(buf[_LEN.size:_LEN.size + n])))
            del buf[:_LEN.size + n]
        return frames


TIMED_OUT = {"op": "timed-out"}  # what BlockingChannel.receive returns when no frame came in time


class BlockingChannel:
    """The worker's end of the socket, used from its one thread."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self._frames = FrameBuffer()
        self._ready: deque[dict] = deque()

    def send(self, obj: dict) -> None:
        self.sock.sendall(encode(obj))

    def receive(self, timeout: float | None = None) -> dict | None:
        """The next frame; None when the daemon has gone away; TIMED_OUT when `timeout` passed first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._ready:
            if deadline is not None:
                readable, _, _ = select.select([self.sock], [], [], max(0.0, deadline - time.monotonic()))
                if not readable:
                    return TIMED_OUT
            data = self.sock.recv(1 << 16)
            if not data:
                return None
            self._ready.extend(self._frames.feed(data))
        return self._ready.popleft()
