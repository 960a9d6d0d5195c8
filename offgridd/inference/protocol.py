"""Worker frames: a 4-byte big-endian length, then one msgpack map. Version 1.

Daemon -> worker:
  {"op": "generate", "id": int, "prompt": str | None, "messages": list | None, "params": {...}}
  {"op": "embed", "id": int, "input": [str, ...]}
  {"op": "cancel", "id": int}
Worker -> daemon:
  {"op": "ready", "model": str, "n_ctx": int, "pid": int, "version": 1}
  {"op": "start", "id": int, "prompt_tokens": int}            generation began (the queue wait is over)
  {"op": "token", "id": int, "text": str, "n": int}           n tokens produced so far
  {"op": "done", "id": int, "finish_reason": "stop" | "length" | "cancelled", "prompt_tokens": int,
   "completion_tokens": int}
  {"op": "embedding", "id": int, "data": [[float, ...], ...], "prompt_tokens": int}
  {"op": "error", "id": int, "status": int, "message": str}
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading

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


async def read_frame(reader: asyncio.StreamReader) -> dict:
    """Read one frame; raises asyncio.IncompleteReadError at end of stream."""
    (n,) = _LEN.unpack(await reader.readexactly(_LEN.size))
    if n > MAX_FRAME:
        raise FrameError(f"frame of {n} bytes exceeds {MAX_FRAME}")
    return decode(await reader.readexactly(n))


class BlockingChannel:
    """The worker's end: blocking reads on one thread, locked writes from any thread."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self._file = sock.makefile("rb")
        self._lock = threading.Lock()

    def send(self, obj: dict) -> None:
        data = encode(obj)
        with self._lock:
            self.sock.sendall(data)

    def receive(self) -> dict | None:
        """The next frame, or None when the daemon has gone away."""
        head = self._file.read(_LEN.size)
        if len(head) < _LEN.size:
            return None
        (n,) = _LEN.unpack(head)
        if n > MAX_FRAME:
            raise FrameError(f"frame of {n} bytes exceeds {MAX_FRAME}")
        body = self._file.read(n)
        if len(body) < n:
            return None
        return decode(body)
