"""Tokens in, text out: one TextStream per generation, shared by the token loop, the API, the session and the server.

It detokenizes as tokens come (a character split over tokens waits for its last byte), holds back any tail
that could still become a stop string (so a stop string is never shown, even when it spans tokens), and knows
why the text ended: "stop" at an end-of-generation token or a stop string; the caller names any other reason
(the budget, the context) when it calls finish.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class StopFilter:
    """Holds back text that might be the start of a stop string; reports a stop when one appears."""

    stops: list[str] = field(default_factory=list)
    _held: str = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text safe to emit, whether a stop string was found)."""
        buf = self._held + text
        first = min((i for i in (buf.find(s) for s in self.stops if s) if i >= 0), default=-1)
        if first >= 0:
            self._held = ""
            return buf[:first], True
        keep = max((partial_suffix(buf, s) for s in self.stops if s), default=0)
        self._held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        rest, self._held = self._held, ""
        return rest


def partial_suffix(text: str, marker: str) -> int:
    """The length of the longest end of text that begins marker (but is not all of it): what to hold back
    while marker may still be forming."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0


class TextStream:
    """The text of one generation, token by token; `finish_reason` is set once the text has ended."""

    def __init__(self, tokenizer, stops: list[str] | None = None):
        self._eog_ids = tokenizer.eog_ids
        self._detok = tokenizer.streamer()
        self._stops = StopFilter(list(stops or []))
        self.finish_reason: str | None = None

    def push(self, token: int) -> str:
        """The text this token makes safe to show. At an end-of-generation token that is everything still held;
        at a stop string the text before it. Either way finish_reason becomes "stop"."""
        if token in self._eog_ids:
            return self.finish("stop")
        text, stopped = self._stops.feed(self._detok.push(token))
        if stopped:
            self.finish_reason = "stop"
        return text

    def finish(self, reason: str) -> str:
        """End the text for `reason` (unless a stop ended it already); returns what was still held back (a
        partial character, a tail that never became a stop string), cut at a stop string."""
        if self.finish_reason == "stop":
            return ""
        self.finish_reason = reason
        return self._stops.feed(self._detok.flush())[0] + self._stops.flush()
