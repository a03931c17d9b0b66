"""Stop strings on streamed text.

Text arrives in deltas whose boundaries have nothing to do with the stop
strings, so a stop string can be split over any number of deltas.  To never
show a client a piece of a stop string, `StopChecker` holds back the longest
tail of the text that is still the beginning of some stop string, and releases
it as soon as the next delta proves it is not (or through `flush` when
generation ends for another reason).

When several stop strings match, the one that is complete first in the text
wins (earliest end; on a tie, the earliest start, i.e. the longest).  That is
the one a token-by-token stream would have seen first, so the result does not
depend on how the text was cut into deltas.
"""

from __future__ import annotations

from typing import Sequence


class StopChecker:
    """Watch one request's detokenized output for stop strings.

    feed(delta) -> (emit, stopped, matched): `emit` is the text that may be shown
    now; once `stopped`, `matched` is the stop string found, the text emitted in
    total is everything before it (plus the stop string itself when
    include_stop_str_in_output) and later feeds emit nothing.
    """

    def __init__(self, stop: Sequence[str], include_stop_str_in_output: bool = False) -> None:
        self.stop = list(stop)
        if not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop strings must be non-empty strings, got {self.stop!r}")
        self.include_stop_str_in_output = include_stop_str_in_output
        # A new match always ends in the newest delta, so it starts at most
        # len(longest) - 1 characters before it: that much old text is enough.
        self._window_size = max((len(s) for s in self.stop), default=1) - 1
        self._window = ""  # the last _window_size characters seen
        self._held = 0  # how many characters at the end of _window are not emitted yet
        self.stopped = False
        self.matched: str | None = None

    def feed(self, delta: str) -> tuple[str, bool, str | None]:
        if self.stopped:
            return "", True, self.matched
        text = self._window + delta
        first_unemitted = len(self._window) - self._held

        match = self._first_match(text)
        if match is not None:
            start, stop_str = match
            cut = start + len(stop_str) if self.include_stop_str_in_output else start
            # Holding back every possible stop prefix guarantees the match lies in
            # the unemitted part; nothing of it has leaked.
            assert cut >= first_unemitted
            self.stopped, self.matched = True, stop_str
            self._window, self._held = "", 0
            return text[first_unemitted:cut], True, stop_str

        # When the stop string will be emitted anyway, a partial one can be too.
        hold = 0 if self.include_stop_str_in_output else self._partial_stop_len(text)
        hold = min(hold, len(text) - first_unemitted)
        emit = text[first_unemitted : len(text) - hold]
        self._window = text[max(0, len(text) - self._window_size) :]
        self._held = hold
        return emit, False, None

    def flush(self) -> str:
        """Release the held-back text; call when generation ends without a stop string."""
        if self.stopped or not self._held:
            return ""
        held = self._window[len(self._window) - self._held :]
        self._held = 0
        return held

    def _first_match(self, text: str) -> tuple[int, str] | None:
        """(start, stop string) of the match ending first in text, or None."""
        best = None
        for stop_str in self.stop:
            start = text.find(stop_str)
            if start < 0:
                continue
            key = (start + len(stop_str), start)
            if best is None or key < best[0]:
                best = (key, stop_str)
        return None if best is None else (best[0][1], best[1])

    def _partial_stop_len(self, text: str) -> int:
        """Length of the longest tail of text that is a proper prefix of a stop string."""
        for length in range(min(len(text), self._window_size), 0, -1):
            tail = text[len(text) - length :]
            if any(s.startswith(tail) for s in self.stop):
                return length
        return 0
