"""Cutting a streamed reply at stop strings: a partial match is held back until it is decided,
and the stop string itself is never emitted."""
from __future__ import annotations

from typing import Sequence


class StopStringFilter:
    def __init__(self, stop: Sequence[str]):
        self.stop = tuple(s for s in stop if s)
        self.pending = ""     # text that could still turn out to start a stop string
        self.stopped = False

    def push(self, text: str) -> str:
        """Feed newly decoded text; → the part that is safe to emit now."""
        if self.stopped or not self.stop:
            return "" if self.stopped else text
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            emit, self.pending = self.pending[:min(hits)], ""
            return emit
        keep = self._longest_partial_match()
        emit = self.pending[:len(self.pending) - keep]
        self.pending = self.pending[len(self.pending) - keep:]
        return emit

    def flush(self) -> str:
        """The reply ended without a stop string: release what was held back."""
        emit, self.pending = ("" if self.stopped else self.pending), ""
        return emit

    def _longest_partial_match(self) -> int:
        """Length of the longest suffix of pending that is a proper prefix of a stop string."""
        for length in range(min(len(self.pending), max(map(len, self.stop)) - 1), 0, -1):
            suffix = self.pending[-length:]
            if any(s.startswith(suffix) for s in self.stop):
                return length
        return 0
