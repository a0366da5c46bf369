"""What generate/chat return, and what a finished stream leaves behind."""
from __future__ import annotations

from dataclasses import dataclass, field

FINISH_REASONS = ("eos", "stop_string", "length", "cancelled", "degenerate")


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str                     # one of FINISH_REASONS
    usage: Usage
    token_ids: list[int] = field(default_factory=list)
    overrides: list = field(default_factory=list)  # what the guard changed (field, asked, applied, reason)
    degenerate: bool = False               # the degeneration monitor saw a repetition loop

    def __str__(self) -> str:
        return self.text
