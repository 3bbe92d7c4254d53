"""Stop strings over streamed text: print what is safe, hold back what could begin a stop string."""

from __future__ import annotations


class StopMatcher:
    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in dict.fromkeys(stops) if s]  # unique, non-empty, in order
        self._longest = max((len(s) for s in self.stops), default=0)
        self._held = ""
        self.stopped = False

    def _held_back(self, text: str) -> int:
        """Length of the longest tail of `text` that is the start of some stop string."""
        for n in range(min(len(text), self._longest - 1), 0, -1):
            tail = text[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0

    def feed(self, text: str) -> tuple[str, bool]:
        """Add streamed text; return (text safe to print now, whether a stop string was hit).

        On a hit the text before the stop string is returned and the rest is discarded; afterwards
        every call returns ("", True)."""
        if self.stopped:
            return "", True
        if not self.stops:
            return text, False
        buf = self._held + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self._held, self.stopped = "", True
            return buf[:min(hits)], True
        keep = self._held_back(buf)
        self._held = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep], False

    def flush(self) -> str:
        """At the end of generation, the held-back text was not a stop string after all."""
        held, self._held = self._held, ""
        return held
