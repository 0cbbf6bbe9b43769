"""Token ids to printable text, piece by piece, for streaming a completion."""

from collections.abc import Callable, Sequence


class Detokenizer:
    """Turns one row's growing token list into text pieces that are safe to print.

    Text is re-decoded from all ids each time (a byte-level BPE token can end mid-character), a
    trailing replacement character waits for the rest of its bytes, and the last few characters
    wait until they cannot be the start of a stop string. `push` returns the new printable text
    and sets `stopped` once a stop string appears (the stop string itself is never printed).
    """

    def __init__(self, decode: Callable[[list[int]], str], stop_strings: Sequence[str] = ()):
        self._decode = decode
        self.stop_strings = [s for s in stop_strings if s]
        self._hold = max((len(s) for s in self.stop_strings), default=1) - 1
        self.ids: list[int] = []
        self.text = ""  # what has been handed out so far
        self.stopped = False

    def _full_text(self) -> str:
        text = self._decode(self.ids)
        for stop in self.stop_strings:
            at = text.find(stop)
            if at >= 0:
                text, self.stopped = text[:at], True
        return text

    def push(self, ids: Sequence[int]) -> str:
        if self.stopped:
            return ""
        self.ids.extend(ids)
        text = self._full_text()
        if not self.stopped:
            text = text.rstrip("\ufffd")
            text = text[:max(len(self.text), len(text) - self._hold)]
        new = text[len(self.text):] if text.startswith(self.text) else ""
        self.text += new
        return new

    def finish(self) -> str:
        """Whatever was held back, once no more tokens will come."""
        if self.stopped:
            return ""
        text = self._full_text()
        new = text[len(self.text):] if text.startswith(self.text) else ""
        self.text += new
        return new
