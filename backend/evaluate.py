"""Quality of a model on held-out text: perplexity, and KL divergence from a reference model.

    ids = evaluation_tokens(model, text, max_tokens=4096)
    ppl = perplexity(model, ids, ctx=512)
    kld = kl_divergence(model, reference, ids, ctx=512)

The tokens are cut into consecutive, non-overlapping windows of `ctx` tokens (a shorter last window
is dropped, so every figure comes from full windows); each window is scored on its own, from an
empty cache. Perplexity is exp of the mean negative log-likelihood of every token after a window's
first. KL divergence is KL(reference ‖ model) of the next-token distributions, in nats, averaged over
every position of every window, along with how often both models rank the same token first.

A "model" here is anything with `name`, `context_length`, `vocab_size` and `logits(ids) → [len(ids), V]`
float32: a trimtab Model, or another engine's adapter (bench/llamacpp_models.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F

from trimtab.backend.errors import TrimtabError


@dataclass(frozen=True)
class KLDivergence:
    mean: float                 # nats per position
    top1_agreement: float       # fraction of positions where both models' most likely token is the same
    positions: int


def evaluation_tokens(model, text: str, max_tokens: int | None = None) -> list[int]:
    ids = model.tokenizer.encode(text)
    return ids[:max_tokens] if max_tokens else ids


def windows(ids: list[int], ctx: int) -> list[list[int]]:
    """Consecutive full windows of `ctx` tokens; TrimtabError if there is not even one."""
    if ctx < 2:
        raise TrimtabError(f"the context must be at least 2 tokens, got {ctx}")
    count = len(ids) // ctx
    if count == 0:
        raise TrimtabError(f"the text has {len(ids)} tokens, fewer than one window of {ctx}; "
                           "use more text or a shorter context")
    return [ids[i * ctx:(i + 1) * ctx] for i in range(count)]


def _window_logits(model, ids: list[int], ctx: int, progress: bool,
                   what: str) -> Iterator[tuple[list[int], torch.Tensor]]:
    from tqdm.auto import tqdm

    if ctx > model.context_length:
        raise TrimtabError(f"a context of {ctx} tokens is longer than {model.name}'s ({model.context_length})")
    for window in tqdm(windows(ids, ctx), desc=what, unit="window", disable=not progress, leave=False):
        yield window, model.logits(window)                                           # [ctx, V]


def perplexity(model, ids: list[int], ctx: int = 512, *, progress: bool = True) -> float:
    total, count = 0.0, 0
    for window, logits in _window_logits(model, ids, ctx, progress, "Perplexity"):
        targets = torch.tensor(window[1:])
        total += F.cross_entropy(logits[:-1].double(), targets, reduction="sum").item()
        count += len(targets)
    return math.exp(total / count)


def kl_divergence(model, reference, ids: list[int], ctx: int = 512, *, progress: bool = True) -> KLDivergence:
    if model.vocab_size != reference.vocab_size:
        raise TrimtabError(f"{model.name} and {reference.name} have different vocabularies "
                           f"({model.vocab_size} and {reference.vocab_size} tokens)")
    total, agree, count = 0.0, 0, 0
    for window, logits in _window_logits(model, ids, ctx, progress, "KL divergence"):
        ref_logits = reference.logits(window)                                        # [ctx, V]
        log_p, log_q = ref_logits.double().log_softmax(-1), logits.double().log_softmax(-1)
        total += (log_p.exp() * (log_p - log_q)).sum().item()
        agree += int((ref_logits.argmax(-1) == logits.argmax(-1)).sum())
        count += len(window)
    return KLDivergence(total / count, agree / count, count)
