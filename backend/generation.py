"""Prefill, one-token decode, and the token loop that every front end streams from."""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from trimtab.backend.kv_cache import KVCache
from trimtab.backend.models.base import Transformer
from trimtab.backend.sampling import SamplingSettings, sample


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """→ tokens [B, S] left-padded to the longest, and each row's padding count [B]."""
    longest = max(len(s) for s in sequences)
    pad = torch.tensor([longest - len(s) for s in sequences], dtype=torch.int64)
    tokens = torch.tensor([[pad_id] * (longest - len(s)) + list(s) for s in sequences], dtype=torch.int64)
    return tokens, pad


def prefill(model: Transformer, sequences: Sequence[Sequence[int]], max_len: int, *,
            last_only: bool = True) -> tuple[KVCache, torch.Tensor]:
    """Run the prompts of a batch; → the filled cache and logits [B, S or 1, V]."""
    tokens, pad = left_pad(sequences)
    cache = model.new_cache(len(sequences), max_len)
    cache.pad.copy_(pad)
    logits = model.forward(tokens.to(model.device), cache, last_only=last_only)
    return cache, logits


def decode_one_token(model: Transformer, cache: KVCache, tokens: torch.Tensor) -> torch.Tensor:
    """tokens: [B] → logits of the following token [B, V]."""
    return model.forward(tokens[:, None].to(model.device), cache)[:, -1]


@dataclass
class TokenEvent:
    token: int
    is_eos: bool


def generate_tokens(model: Transformer, prompt: Sequence[int], *, max_new_tokens: int,
                    sampling: SamplingSettings, eos_ids: Sequence[int],
                    cancel: threading.Event | None = None) -> Iterator[TokenEvent]:
    """Yield one sequence's new tokens until EOS, `max_new_tokens`, or `cancel` is set."""
    generator = None
    if sampling.seed is not None:
        generator = torch.Generator(device=model.device).manual_seed(sampling.seed)
    eos = set(eos_ids)
    cache, logits = prefill(model, [prompt], len(prompt) + max_new_tokens)
    logits = logits[:, -1]
    for step in range(max_new_tokens):
        if cancel is not None and cancel.is_set():
            return
        token = int(sample(logits, sampling, generator)[0])
        yield TokenEvent(token, token in eos)
        if token in eos or step == max_new_tokens - 1:
            return
        logits = decode_one_token(model, cache, torch.tensor([token]))
