"""A request's text on its way out: stop strings found across token boundaries, and text held to travel together."""

from __future__ import annotations

# Text waits at most this long to travel with the next tokens': every frame costs the daemon and the client a wake-up
# and ~0.3 ms of CPU taken from decoding, and 50 ms is half of the 0.1 s under which a reader sees a change as
# instantaneous. At 11 ms a token this sends five tokens a frame; at 50 ms or more a token, each goes alone.
HOLD_S = 0.05


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
