"""Measures of repetition, shared by the degeneration monitor and the drift report."""
from __future__ import annotations

from typing import Sequence


def seq_rep_n(token_ids: Sequence[int], n: int = 4) -> float:
    """Fraction of the sequence's n-grams that repeat an earlier one: 1 - unique/total (0 if too short)."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    total = len(token_ids) - n + 1
    if total <= 0:
        return 0.0
    grams = {tuple(token_ids[i:i + n]) for i in range(total)}
    return 1.0 - len(grams) / total


class DegenerationMonitor:
    """Flags a repetition loop: seq-rep-n over the last `window` tokens reaching `threshold`,
    judged once at least `min_tokens` have been seen.

    Natural text repeats some 4-grams (names, phrases) but seldom more than a fifth of them
    within 64 tokens; a model stuck in a loop repeats nearly all of them.
    """

    def __init__(self, window: int = 64, n: int = 4, threshold: float = 0.5, min_tokens: int = 32):
        self.window, self.n, self.threshold, self.min_tokens = window, n, threshold, min_tokens
        self.tokens: list[int] = []
        self.flagged = False

    def push(self, token: int) -> bool:
        """Add a token; → whether the reply is (now or already) flagged as degenerate."""
        self.tokens.append(token)
        if not self.flagged and len(self.tokens) >= self.min_tokens:
            self.flagged = seq_rep_n(self.tokens[-self.window:], self.n) >= self.threshold
        return self.flagged
