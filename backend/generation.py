"""Prefill, one-token decode, and the generation loop that every front end streams from.

One loop serves a single streamed reply and a batch of replies alike: all rows decode together
(left-padded, see kv_cache.py); each row ends on its own — EOS, a stop string, the degeneration
monitor, `max_new_tokens` — and a cancel event ends them all.
"""
from __future__ import annotations

import threading
from contextlib import closing
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from trimtab.backend.completion import Completion, Usage
from trimtab.backend.errors import TrimtabError
from trimtab.backend.kv_cache import KVCache
from trimtab.backend.models.base import Transformer
from trimtab.backend.repetition import DegenerationMonitor
from trimtab.backend.sampling import Sampler
from trimtab.backend.settings import GenerationSettings
from trimtab.backend.stop_strings import StopStringFilter


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


class SamplingOnDevice:
    """The sampler choosing each token of a batch-1 reply on the GPU behind the decode step that gives its
    logits (a CudaGraphDecoder TokenChooser). Everything it reads and writes stays on the device in buffers
    of fixed size: the history right-aligned in a window as long as the whole reply can make it (each token
    shifts it), the reply's length (for min_new_tokens; the history's follows from it) and the generator's
    draws for the reply, taken up front in the order the sampler's loop takes them. So nothing waits for the device, and
    on a GPU the whole choice is one CUDA graph, captured at the first call: the sampler's ~90 torch ops
    cost the host a replay instead of ~2 ms of launches, and the host queues the next step before it reads
    this one's token."""

    def __init__(self, sampler: Sampler, history: torch.Tensor, max_new_tokens: int, min_new_tokens: int):
        """history [1, T]: the prompt (checked) and the reply's first token, which the first step decodes;
        the reply may grow to `max_new_tokens` tokens, EOS allowed once it holds `min_new_tokens`."""
        device, T = sampler.device, history.shape[1]
        self.sampler, self.min_new_tokens = sampler, min_new_tokens
        self.window = torch.zeros(1, T + max_new_tokens, dtype=torch.int64, device=device)  # [1, W]
        self.window[:, -T:] = history.to(device)
        self.before_reply = T - 1                              # the history's tokens before the reply's
        self.replied = torch.tensor([1], device=device)       # the reply's tokens
        self.draws = None if sampler.settings.greedy else sampler.uniforms(max_new_tokens).to(device)  # [max_new]
        self.logits = torch.zeros(1, sampler.vocab_size, device=device)                # [1, V] float32
        self.chosen: torch.Tensor | None = None                                        # [2] (token, problem)
        self.graph = None

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [V] → [2] int64 on the device: the sampled token (now in the history) and its problem;
        valid until the next call."""
        self.logits.copy_(logits[None])
        if self.logits.device.type != "cuda":
            return self._choose()
        self.prepare()
        self.graph.replay()
        return self.chosen

    def prepare(self) -> None:
        """On a GPU, capture the choice's graph now, if not yet (the first call does otherwise): one warm-up
        run off the default stream, as capture needs (the buffers it advanced are put back), then the
        capture, which runs nothing."""
        if self.graph is not None or self.logits.device.type != "cuda":
            return
        device = self.logits.device
        state = [t.clone() for t in (self.window, self.replied)]
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            self._choose()
        torch.cuda.current_stream(device).wait_stream(stream)
        for buffer, saved in zip((self.window, self.replied), state):
            buffer.copy_(saved)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.chosen = self._choose()

    def error(self, problem: int) -> TrimtabError:
        return Sampler.problem_error(problem, [0])

    @property
    def length(self) -> torch.Tensor:
        """[1] on the device: the history's tokens (right-aligned in the window)."""
        return self.replied + self.before_reply

    def _choose(self) -> torch.Tensor:
        """One choice from the buffers, advancing them → [2] int64 (token, problem)."""
        uniform = None                                       # the draw for reply token `replied` [1]
        if self.draws is not None:
            uniform = self.draws.index_select(0, (self.replied - 1).clamp_(max=self.draws.shape[0] - 1))
        tokens, problems = self.sampler.choose(self.logits, self.window, self.length, uniform=uniform,
                                               allow_eos=self.replied >= self.min_new_tokens)
        self.window.copy_(torch.cat([self.window[:, 1:], tokens[:, None]], dim=1))
        self.replied.add_(1)
        return torch.cat([tokens, problems])


@dataclass
class _Reply:
    """One row's reply as it grows: ids, emitted text, and why it ended."""

    prompt_tokens: int
    decoder: object                 # the tokenizer's StreamDecoder
    stops: StopStringFilter
    monitor: DegenerationMonitor
    token_ids: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    finish: str | None = None

    def emit(self, piece: str) -> str:
        if piece:
            self.text.append(piece)
        return piece

    def completion(self, overrides: list) -> Completion:
        return Completion(text="".join(self.text), finish_reason=self.finish, token_ids=self.token_ids,
                          usage=Usage(self.prompt_tokens, len(self.token_ids)), overrides=list(overrides),
                          degenerate=self.monitor.flagged)


class Generation:
    """Iterate for (row, text piece) as they decode; afterwards `.completions` has one per row."""

    def __init__(self, model: Transformer, tokenizer, prompts: Sequence[Sequence[int]],
                 settings: GenerationSettings, *, overrides: Sequence = (), max_new_tokens: int | None = None,
                 cancel: threading.Event | None = None):
        self.model, self.tokenizer, self.settings = model, tokenizer, settings
        self.prompts = [list(p) for p in prompts]
        self.max_new_tokens = max_new_tokens or settings.max_new_tokens
        self.overrides = list(overrides)
        self.cancel = cancel or threading.Event()
        self.completions: list[Completion] | None = None
        self._replies = [
            _Reply(len(p), tokenizer.stream_decoder(), StopStringFilter(settings.stop), DegenerationMonitor())
            for p in self.prompts
        ]

    def __iter__(self) -> Iterator[tuple[int, str]]:
        eos = set(self.tokenizer.eos_token_ids)
        for tokens in self._token_steps():
            for row, token in enumerate(tokens):
                reply = self._replies[row]
                if reply.finish is None:
                    piece = self._advance(reply, token, eos)
                    if piece:
                        yield row, piece
        for row, reply in enumerate(self._replies):
            if reply.finish is None:
                reply.finish = "cancelled" if self.cancel.is_set() else "length"
            if reply.finish != "stop_string":
                tail = reply.emit(reply.stops.push(reply.decoder.flush()) + reply.stops.flush())
                if tail:
                    yield row, tail
        self.completions = [reply.completion(self.overrides) for reply in self._replies]

    def _advance(self, reply: _Reply, token: int, eos: set[int]) -> str:
        """Take one sampled token into a row's reply; → the text now safe to show."""
        if token in eos:
            reply.finish = "eos"
            return ""
        reply.token_ids.append(token)
        piece = reply.emit(reply.stops.push(reply.decoder.push(token)))
        if reply.stops.stopped:
            reply.finish = "stop_string"
        elif reply.monitor.push(token) and self.settings.stop_on_degenerate:
            reply.finish = "degenerate"
        return piece

    def _pipelined(self, cache: KVCache) -> bool:
        """Whether the model's CUDA graph decoder runs this cache: then the tokens after the first are chosen
        on the GPU and read while the next step runs (_pipelined_steps)."""
        model = self.model
        return getattr(model, "cuda_decoder", None) is not None and cache.batch_size == 1 and not model.tp.active

    def _pipelined_steps(self, cache: KVCache, token: int, choose: SamplingOnDevice | None,
                         steps: int) -> Iterator[list[int]]:
        """Up to `steps` tokens after `token` from CudaGraphDecoder.pipelined_tokens: picked by `choose` (the
        sampler on the GPU) or, where every token is the argmax of the logits as they come (None), by the
        decode graph itself, so no logits reach the host."""
        with closing(self.model.cuda_decoder.pipelined_tokens(token, cache, choose)) as tokens:
            for _, token in zip(range(steps), tokens):
                if self.cancel.is_set():
                    return
                yield [token]
                if self._replies[0].finish is not None:
                    return

    def _token_steps(self) -> Iterator[list[int]]:
        """Sample every row's next token until all rows end, max_new_tokens, or cancel."""
        settings, model = self.settings, self.model
        breakers = self.tokenizer.ids_containing(settings.dry_sequence_breakers) if settings.dry_multiplier else ()
        sampler = Sampler(settings, vocab_size=model.args.vocab_size, eos_token_ids=self.tokenizer.eos_token_ids,
                          sequence_breaker_ids=[i for i in breakers if i < model.args.vocab_size], device=model.device)
        longest = max(len(p) for p in self.prompts)
        cache, logits = prefill(model, self.prompts, longest + self.max_new_tokens)
        logits = logits[:, -1]                                           # [B, V]
        history, pad = left_pad(self.prompts)                            # [B, S], [B]
        history = torch.cat([history, torch.zeros(len(self.prompts), self.max_new_tokens, dtype=torch.int64)], 1)
        mask = torch.arange(history.shape[1])[None, :] >= pad[:, None]   # [B, S + max_new]
        for step in range(self.max_new_tokens):
            length = longest + step
            tokens = sampler(logits, history[:, :length].to(model.device), mask[:, :length].to(model.device),
                             allow_eos=step >= settings.min_new_tokens).cpu()
            # under tensor parallelism every rank takes rank 0's tokens and cancel decision
            tokens, cancelled = model.tp.agree(tokens, self.cancel.is_set())
            if cancelled:
                return
            history[:, length] = tokens
            yield tokens.tolist()
            if all(reply.finish is not None for reply in self._replies) or step == self.max_new_tokens - 1:
                return
            if step == 0 and self._pipelined(cache):
                argmax = sampler.takes_argmax(allow_eos=settings.min_new_tokens <= 1)
                choose = None if argmax else SamplingOnDevice(sampler, history[:, :length + 1], self.max_new_tokens,
                                                              settings.min_new_tokens)
                yield from self._pipelined_steps(cache, int(tokens[0]), choose, self.max_new_tokens - 1)
                return
            logits = decode_one_token(model, cache, tokens)
