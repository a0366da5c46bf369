"""Choosing the next token of every row of a batch from its logits and its history.

`Sampler(settings, vocab_size=..., eos_token_ids=...)` is built once per generation call; calling
it with logits [B, V] and the history [B, T] (prompt + tokens generated so far, left-padded, with
`history_mask` True at real tokens) returns the next tokens [B]. Everything is vectorised over the
batch. The steps, always in this order (a step whose setting is neutral is skipped):

1. Bias and bans. `logit_bias` is added; `custom_token_bans`, and the EOS ids when `ban_eos_token`
   is set or the call passes `allow_eos=False` (or False in that row of a [B] bool tensor, for
   `min_new_tokens`), are set to -inf.
2. Repetition penalty, Hugging Face semantics: a penalised token's logit is divided by the
   penalty when positive and multiplied by it when negative; each token is penalised once, however
   often it occurs. Only the range counts: the last `repetition_penalty_range` real tokens of the
   history (0 = all of them). Decay, precisely: let L be the range length (the setting, or the
   row's number of real tokens when the setting is 0) and D = min(repetition_penalty_decay, L). A
   history token of age a (0 = the newest) has weight
       w(a) = 1                  for a < L - D,
       w(a) = (L - a) / (D + 1)  for L - D <= a < L    (D/(D+1), ..., 2/(D+1), 1/(D+1)),
       w(a) = 0                  for a >= L            (outside the range),
   so the oldest D tokens of the range fade in equal steps towards no penalty. A vocabulary
   token's weight is the largest over its occurrences (its newest one counts), and its penalty is
   1 + w * (repetition_penalty - 1): the full penalty at w = 1, none at w = 0. With D = 0 this is
   exactly Hugging Face's RepetitionPenaltyLogitsProcessor applied to the range.
3. Presence and frequency penalties, OpenAI semantics, over the same range (by count, undecayed:
   the decay belongs to the repetition penalty): logit -= count * frequency_penalty
   + (count > 0) * presence_penalty, where count is the token's occurrences in the range.
4. `no_repeat_ngram_size` n: over the whole history (real tokens only, the prompt included), any
   token that would complete an n-gram already present is set to -inf (n = 1 bans every token seen).
4b. DRY ("don't repeat yourself", `dry_multiplier` > 0), webui's semantics: for every earlier
   position of the history, the length n of the longest run of tokens ending there that equals
   the run ending at the newest token (runs never cross a sequence-breaker token, and are counted
   up to `DRY_MAX_MATCH`); the token that followed that earlier run would extend the repeat, so
   when n >= `dry_allowed_length` its logit loses
       dry_multiplier * dry_base ** (n - dry_allowed_length)
   (the largest such penalty when several runs lead to the same token). The range is the same
   as the repetition penalty's (`repetition_penalty_range`, 0 = all). Unlike the token penalties,
   DRY leaves single repeated words and punctuation alone and acts only on verbatim loops. EOS
   ids are never penalised: ending the answer is how a model leaves a loop. Sequence breakers are
   token ids given at construction (`sequence_breaker_ids`: tokens whose text holds one of
   `dry_sequence_breakers`; see `Tokenizer.ids_containing`).
5. Greedy (`temperature == 0` or `do_sample` off): the argmax of these logits, exact and without
   randomness; on ties, the lowest id. Steps 6-11 do not run.
6. Temperature: logits / temperature.
7. top_k: keep the tokens whose logit is at least the k-th largest (ties at the k-th all stay,
   as in Hugging Face's TopKLogitsWarper).
8. top_p: rank tokens by probability (descending; ties by lower id first) and keep each one
   whose higher-ranked tokens hold less than top_p of the mass — the smallest prefix that reaches
   top_p; the top token always stays (also at top_p = 0). Same rule as Hugging Face's
   TopPLogitsWarper (remove where the ascending cumulative mass <= 1 - top_p), up to rounding of the
   cumulative sums and the order among tied tokens.
9. typical_p: Hugging Face's TypicalLogitsWarper rule: rank tokens by |-log p - H| (H the entropy
   of the current distribution), walk that ranking until the cumulative mass reaches typical_p and
   keep every token whose score is at most that of the token where it stopped (ties included).
   Difference from Hugging Face: the most likely token is always kept as well (HF keeps the most
   *typical* token instead, which can drop the most likely one).
10. min_p: drop tokens whose probability is below min_p times the top probability (Hugging
    Face's MinPLogitsWarper); the top token (and any tied with it) always stays, also at min_p = 1.
11. Draw from the softmax by inverse CDF with one uniform number per call from a CPU
    torch.Generator seeded with `seed` (None: seeded nondeterministically). Every row uses the same
    uniform, so a row's tokens depend on the seed, the step number and its own distribution only,
    not on its position in the batch or the batch size (nor on the device's RNG): the same prompt
    gives the same tokens alone or anywhere in a batch, and identical rows give identical tokens.

Filters 7-10 each act on the distribution left by the ones before (renormalised), and none of them
removes the most likely token. (On CPU, top_p and typical_p first rank only the best
`Sampler.CPU_CANDIDATES` tokens and fall back to ranking the whole vocabulary when those cannot
decide; the result is the same either way, and a full sort of a large vocabulary is slow on CPU.)

`Sampler.probabilities` returns the distribution step 11 draws from (a one-hot of the argmax when
greedy); `apply_penalties` (steps 1-4) and `apply_filters` (steps 6-10) are exposed for tests and
tools. Errors (TrimtabError): ids outside the vocabulary in bans, biases or EOS ids (at
construction) or in the history; logits of the wrong width; a row with every token banned, or NaN.

`Sampler.choose` is the call without the host, for a history kept on the device (right-aligned, its
length a device tensor, already checked) and a draw given as a device tensor: it returns the tokens
and each row's problem (0, or NAN_LOGITS / ALL_BANNED, which `problem_error` words as the call would
raise it), never waits for the device and keeps every shape fixed, so a GPU decode loop can capture it
as a CUDA graph and queue the next step behind it before it reads the token
(generation.SamplingOnDevice, CudaGraphDecoder.pipelined_tokens). Nothing in it depends on a value read
back from the device (DRY on a GPU takes every run length at once, not offset by offset until none
is left), and softmaxes are written as reductions over the row: torch's softmax gives a row one
block, 77 us for one row of a 128k vocabulary on an H100, against a few us for these.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from trimtab.backend.errors import TrimtabError
from trimtab.backend.settings import GenerationSettings

NEG_INF = float("-inf")
NAN_LOGITS, ALL_BANNED = 1, 2  # a row's problem (Sampler.choose): its logits hold NaN; every token is banned


def _softmax(x: Tensor) -> Tensor:
    """Softmax over the last dim [B, V] as reductions over the whole row (fast on a GPU for one row)."""
    e = (x - x.amax(dim=-1, keepdim=True)).exp()
    return e / e.sum(dim=-1, keepdim=True)


def _log_softmax(x: Tensor) -> Tensor:
    shifted = x - x.amax(dim=-1, keepdim=True)
    return shifted - shifted.exp().sum(dim=-1, keepdim=True).log()


def _check_ids(name: str, ids, vocab_size: int) -> list[int]:
    out = []
    for token in ids:
        if isinstance(token, bool) or not isinstance(token, int):
            raise TrimtabError(f"sampler: {name}: token ids must be integers, got {token!r}")
        if not 0 <= token < vocab_size:
            raise TrimtabError(f"sampler: {name}: token id {token} is outside the vocabulary "
                               f"(0..{vocab_size - 1})")
        out.append(token)
    return out


def _check_settings(s: GenerationSettings) -> None:
    """The ranges the sampler relies on (build_settings checks them too; this covers direct use)."""
    problems = []
    if not s.temperature >= 0 or not math.isfinite(s.temperature):
        problems.append(f"temperature must be >= 0, got {s.temperature!r}")
    if s.top_k < 0:
        problems.append(f"top_k must be >= 0, got {s.top_k!r}")
    for name in ("top_p", "min_p", "typical_p"):
        value = getattr(s, name)
        if not 0 <= value <= 1:
            problems.append(f"{name} must be in [0, 1], got {value!r}")
    if not s.repetition_penalty > 0 or not math.isfinite(s.repetition_penalty):
        problems.append(f"repetition_penalty must be > 0, got {s.repetition_penalty!r}")
    for name in ("repetition_penalty_range", "repetition_penalty_decay", "no_repeat_ngram_size"):
        if getattr(s, name) < 0:
            problems.append(f"{name} must be >= 0, got {getattr(s, name)!r}")
    for name in ("presence_penalty", "frequency_penalty"):
        if not math.isfinite(getattr(s, name)):
            problems.append(f"{name} must be finite, got {getattr(s, name)!r}")
    if problems:
        raise TrimtabError("sampler: " + "; ".join(problems))


class Sampler:
    """Picks next tokens for a batch, in the order of the module docstring (steps 1-11)."""

    # On CPU, top_p and typical_p first rank only this many tokens, and the whole vocabulary only
    # when those do not decide the filter: a full sort of a large vocabulary is slow there. On a GPU
    # the full sort is faster than the shortcut, which is off there.
    CPU_CANDIDATES = 1024

    # DRY counts matching runs up to this length; longer runs get the penalty of this one, which
    # at webui's defaults (0.8 * 1.75 ** 62) is already far beyond any logit
    DRY_MAX_MATCH = 64

    def __init__(self, settings: GenerationSettings, *, vocab_size: int, eos_token_ids: Sequence[int],
                 sequence_breaker_ids: Sequence[int] = (), device: str | torch.device = "cpu"):
        _check_settings(settings)
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
            raise TrimtabError(f"sampler: vocab_size must be a positive integer, got {vocab_size!r}")
        self.settings = settings
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        V = vocab_size
        self.candidates = self.CPU_CANDIDATES if self.device.type == "cpu" else V

        eos = sorted(set(_check_ids("eos_token_ids", eos_token_ids, V)))
        self._eos_mask = torch.zeros(V, dtype=torch.bool, device=self.device)
        self._eos_mask[eos] = True
        self._has_eos = bool(eos)

        self._bias: Tensor | None = None
        if settings.logit_bias:
            ids = _check_ids("logit_bias", list(settings.logit_bias), V)
            bias = torch.zeros(V, dtype=torch.float32)
            bias[ids] = torch.tensor([float(settings.logit_bias[i]) for i in ids], dtype=torch.float32)
            self._bias = bias.to(self.device)

        bans = torch.zeros(V, dtype=torch.bool)
        bans[_check_ids("custom_token_bans", settings.custom_token_bans, V)] = True
        bans = bans.to(self.device)
        if settings.ban_eos_token:
            bans |= self._eos_mask
        self._bans: Tensor | None = bans if settings.custom_token_bans or (settings.ban_eos_token and eos) else None

        breakers = torch.zeros(V, dtype=torch.bool)
        breakers[_check_ids("sequence_breaker_ids", sequence_breaker_ids, V)] = True
        self._breakers = breakers.to(self.device)

        self._generator = torch.Generator(device="cpu")
        if settings.seed is None:
            self._generator.seed()
        else:
            self._generator.manual_seed(settings.seed)

    # ---- the public calls ----------------------------------------------------------------

    def __call__(self, logits: Tensor, history: Tensor, history_mask: Tensor | None = None, *,
                 allow_eos: bool | Tensor = True) -> Tensor:
        """logits [B, V], history [B, T] int64, history_mask [B, T] bool → next tokens [B] int64."""
        return self._pick(self.apply_penalties(logits, history, history_mask, allow_eos=allow_eos))

    def choose(self, logits: Tensor, history: Tensor, real: Tensor, *, allow_eos: bool | Tensor = True,
               uniform: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """As the call, for a history kept on the device: nothing waits for the device and every shape is
        the inputs' (so a CUDA graph can hold it), and a row no token can come from does not raise.
        history [B, T] int64 holds each row's `real` [B] tokens right-aligned (ids known to lie in the
        vocabulary; the columns before them are ignored); `uniform` [1] float64, on the device, is step
        11's draw instead of one from the generator. → next tokens [B] int64 and each row's problem [B]
        int64 (0, NAN_LOGITS or ALL_BANNED; such a row's token means nothing)."""
        scores, problems = self._penalised(logits, history, None, allow_eos, real)
        return self._pick(scores, uniform), problems

    def _pick(self, scores: Tensor, uniform: Tensor | None = None) -> Tensor:
        """Steps 5-11 on the penalised logits [B, V] → tokens [B]."""
        if self.settings.greedy:
            return scores.argmax(dim=-1)
        return self._draw(_softmax(self.apply_filters(scores)), uniform)

    def probabilities(self, logits: Tensor, history: Tensor, history_mask: Tensor | None = None,
                      allow_eos: bool | Tensor = True) -> Tensor:
        """The distribution [B, V] the next token is drawn from: after every filter, before the draw
        (greedy: a one-hot of the argmax). Consumes no randomness."""
        scores = self.apply_penalties(logits, history, history_mask, allow_eos=allow_eos)
        if self.settings.greedy:
            return torch.zeros_like(scores).scatter_(-1, scores.argmax(dim=-1, keepdim=True), 1.0)
        return _softmax(self.apply_filters(scores))

    def takes_argmax(self, allow_eos: bool = True) -> bool:
        """Whether the next token is the argmax of the logits as they come: greedy, and nothing changes a
        logit (no bias, ban, EOS hold-off or penalty) — a token a GPU can pick without the host."""
        s = self.settings
        return (s.greedy and self._bias is None and self._bans is None and (allow_eos or not self._has_eos)
                and not self._uses_range and s.no_repeat_ngram_size == 0)

    @property
    def _reads_back_freely(self) -> bool:
        """Whether a shortcut may read a value back (on the CPU that waits for nothing; on a GPU it would
        stop the host until the device catches up, so there every shortcut that reads is skipped)."""
        return self.device.type == "cpu"

    @property
    def _uses_range(self) -> bool:
        """Whether a penalty looks at the tokens in the penalty range."""
        s = self.settings
        return s.repetition_penalty != 1 or s.presence_penalty != 0 or s.frequency_penalty != 0 or s.dry_multiplier > 0

    def apply_penalties(self, logits: Tensor, history: Tensor, history_mask: Tensor | None = None, *,
                        allow_eos: bool | Tensor = True) -> Tensor:
        """Steps 1-4 → float32 logits [B, V] (a new tensor; the input is left alone)."""
        scores, problems = self._penalised(logits, history, history_mask, allow_eos, None)
        self.raise_problems(problems)
        return scores

    @staticmethod
    def raise_problems(problems: Tensor) -> None:
        """Raise for the first kind of problem (NaN before bans) in `problems` [B] from `choose`, if any."""
        if bool(problems.any()):
            for code in (NAN_LOGITS, ALL_BANNED):
                rows = (problems == code).nonzero().flatten().tolist()
                if rows:
                    raise Sampler.problem_error(code, rows)

    @staticmethod
    def problem_error(code: int, rows: list[int]) -> TrimtabError:
        """The error for a problem code of `choose` in batch rows `rows`."""
        if code == NAN_LOGITS:
            return TrimtabError(f"sampler: the logits of batch row(s) {rows} hold NaN")
        return TrimtabError(f"sampler: every token is banned in batch row(s) {rows} "
                            "(bans, EOS ban and no_repeat_ngram_size together leave nothing)")

    def _penalised(self, logits: Tensor, history: Tensor, history_mask: Tensor | None, allow_eos: bool | Tensor,
                   real: Tensor | None) -> tuple[Tensor, Tensor]:
        """Steps 1-4 → float32 logits [B, V] and each row's problem [B] (see `choose`, and its `real`)."""
        s = self.settings
        V = self.vocab_size
        if logits.dim() != 2 or logits.shape[-1] != V:
            raise TrimtabError(f"sampler: logits must be [batch, {V}], got {list(logits.shape)}")
        B = logits.shape[0]
        scores = logits.to(device=self.device, dtype=torch.float32)

        # 1. bias, bans, EOS
        if self._bias is not None:
            scores = scores + self._bias
        bans = self._bans
        if isinstance(allow_eos, Tensor):
            allow = allow_eos.to(device=self.device, dtype=torch.bool).reshape(-1)
            if allow.shape[0] != B:
                raise TrimtabError(f"sampler: allow_eos must have one entry per row ({B}), got {allow.shape[0]}")
            if self._has_eos:
                eos_bans = self._eos_mask[None, :] & ~allow[:, None]
                bans = eos_bans if bans is None else bans | eos_bans
        elif not allow_eos and self._has_eos:
            bans = self._eos_mask if bans is None else bans | self._eos_mask
        if bans is not None:
            scores = scores.masked_fill(bans, NEG_INF)
        elif scores is logits:
            scores = scores.clone()

        uses_range = self._uses_range
        if uses_range or s.no_repeat_ngram_size > 0:
            if real is None:
                tokens, n_real = self._compact(history, history_mask, B)
            else:
                tokens, n_real = history, real
            T = tokens.shape[1]
            age = torch.arange(T - 1, -1, -1, device=self.device)[None, :]            # [1, T]
            real = age < n_real[:, None]                                              # [B, T]
            if uses_range:
                in_range = real if s.repetition_penalty_range == 0 else real & (age < s.repetition_penalty_range)
                if s.repetition_penalty != 1:                                         # 2.
                    scores = self._repetition_penalty(scores, tokens, age, in_range, n_real)
                if s.presence_penalty != 0 or s.frequency_penalty != 0:               # 3.
                    counts = torch.zeros_like(scores).scatter_add_(1, tokens, in_range.to(scores.dtype))
                    present = (counts > 0).to(scores.dtype)
                    scores = scores - (counts * s.frequency_penalty + present * s.presence_penalty)
            if s.no_repeat_ngram_size > 0:                                            # 4.
                scores = self._no_repeat_ngram(scores, tokens, n_real)
            if s.dry_multiplier > 0:                                                  # 4b.
                scores = self._dry(scores, tokens, in_range)

        top = scores.amax(dim=-1)                                                     # [B]: NaN if any is
        problems = torch.where(top.isnan(), NAN_LOGITS, torch.where(top == NEG_INF, ALL_BANNED, 0))
        return scores, problems

    def apply_filters(self, scores: Tensor) -> Tensor:
        """Steps 6-10 on logits [B, V] from `apply_penalties` → logits with removed tokens at -inf."""
        s = self.settings
        V = scores.shape[-1]
        x = scores
        if s.temperature != 1 and s.temperature > 0:                                  # 6.
            x = x / s.temperature
        if 0 < s.top_k < V:                                                           # 7.
            kth = x.topk(s.top_k, dim=-1).values[:, -1:]
            x = x.masked_fill(x < kth, NEG_INF)
        if s.top_p < 1:                                                               # 8.
            x = self._top_p(x)
        if s.typical_p < 1:                                                           # 9.
            x = self._typical_p(x)
        if s.min_p > 0:                                                               # 10.
            probs = _softmax(x)
            x = x.masked_fill(probs < s.min_p * probs.amax(dim=-1, keepdim=True), NEG_INF)
        return x

    # ---- the pieces ------------------------------------------------------------------------

    def _ranked(self, key: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """The k best entries of each row by (key descending, id ascending) → (keys, ids) [B, k]."""
        if k >= key.shape[-1]:
            return key.sort(dim=-1, descending=True, stable=True)
        values, ids = key.topk(k, dim=-1)
        ids, order = ids.sort(dim=-1)
        values, order2 = values.gather(-1, order).sort(dim=-1, descending=True, stable=True)
        return values, ids.gather(-1, order2)

    def _top_p(self, x: Tensor) -> Tensor:
        """Step 8. Ranks only the best `candidates` tokens when they decide it (they hold top_p of
        the mass before the last candidate's value), else the whole vocabulary; same result."""
        top_p = self.settings.top_p
        B, V = x.shape
        probs = _softmax(x)
        values, ids = self._ranked(x, min(self.candidates, V))
        p = probs.gather(-1, ids)
        mass = p.cumsum(dim=-1)
        if ids.shape[-1] < V and not bool(((mass >= top_p) & (values > values[:, -1:])).any(dim=-1).all()):
            values, ids = self._ranked(x, V)
            p = probs.gather(-1, ids)
            mass = p.cumsum(dim=-1)
        mass_before = torch.cat([torch.zeros_like(mass[:, :1]), mass[:, :-1]], dim=-1)
        keep = mass_before < top_p
        keep[:, 0] = True
        kept = torch.zeros(B, V, dtype=torch.bool, device=x.device).scatter_(-1, ids, keep)
        return x.masked_fill(~kept, NEG_INF)

    def _typical_p(self, x: Tensor) -> Tensor:
        """Step 9. Like `_top_p`, ranks only the most typical `candidates` tokens when the walk
        stops among them at a score below the last candidate's, else the whole vocabulary."""
        typical_p = self.settings.typical_p
        V = x.shape[-1]
        logp = _log_softmax(x)
        p = logp.exp()
        entropy = -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(dim=-1, keepdim=True)
        atypicality = (-logp - entropy).abs()                                         # +inf where p == 0
        for k in (min(self.candidates, V), V):
            negated, ids = self._ranked(-atypicality, k)
            score = -negated                                                          # ascending
            mass = p.gather(-1, ids).cumsum(dim=-1)
            stop = (mass < typical_p).sum(dim=-1, keepdim=True).clamp_(max=k - 1)
            threshold = score.gather(-1, stop)
            if k == V or bool((threshold < score[:, -1:]).all()):
                break
        drop = atypicality > threshold
        drop.scatter_(-1, x.argmax(dim=-1, keepdim=True), False)
        return x.masked_fill(drop, NEG_INF)

    def _compact(self, history: Tensor, mask: Tensor | None, B: int) -> tuple[Tensor, Tensor]:
        """→ the history with its real tokens moved to the right end in order (masked ids set to 0),
        and each row's real-token count [B]. Left-padded input comes back unchanged. Ids outside the
        vocabulary raise."""
        if history.dim() != 2 or history.shape[0] != B:
            raise TrimtabError(f"sampler: history must be [{B}, T], got {list(history.shape)}")
        tokens = history.to(device=self.device, dtype=torch.int64)
        T = tokens.shape[1]
        if mask is None:
            n_real = torch.full((B,), T, dtype=torch.int64, device=self.device)
        else:
            if mask.shape != history.shape:
                raise TrimtabError(f"sampler: history_mask must match history {list(history.shape)}, "
                                   f"got {list(mask.shape)}")
            mask = mask.to(device=self.device, dtype=torch.bool)
            order = mask.to(torch.uint8).sort(dim=-1, stable=True).indices           # pads first, order kept
            tokens = tokens.gather(-1, order)
            n_real = mask.sum(dim=-1)
            real = torch.arange(T - 1, -1, -1, device=self.device)[None, :] < n_real[:, None]
            tokens = tokens.masked_fill(~real, 0)
        bad = (tokens < 0) | (tokens >= self.vocab_size)
        if bool(bad.any()):
            raise TrimtabError(f"sampler: history holds token ids outside the vocabulary "
                               f"(0..{self.vocab_size - 1}): {sorted(set(tokens[bad].tolist()))[:5]}")
        return tokens, n_real

    def _repetition_penalty(self, scores: Tensor, tokens: Tensor, age: Tensor, in_range: Tensor,
                            n_real: Tensor) -> Tensor:
        s = self.settings
        if s.repetition_penalty_decay == 0:
            weight = in_range.to(scores.dtype)
        else:
            if s.repetition_penalty_range > 0:
                length = torch.full_like(n_real, s.repetition_penalty_range)[:, None]
            else:
                length = n_real[:, None]
            fade = length.clamp(max=s.repetition_penalty_decay)                       # D per row
            weight = torch.where(age < length - fade, 1.0,
                                 (length - age).to(scores.dtype) / (fade + 1).to(scores.dtype))
            weight = weight.masked_fill(~in_range, 0.0)
        weight = torch.zeros_like(scores).scatter_reduce_(1, tokens, weight, reduce="amax", include_self=True)
        p = s.repetition_penalty
        factor = torch.where(weight >= 1, torch.full_like(weight, p), 1 + weight * (p - 1))
        penalised = torch.where(scores < 0, scores * factor, scores / factor)
        return torch.where(weight > 0, penalised, scores)

    def _no_repeat_ngram(self, scores: Tensor, tokens: Tensor, n_real: Tensor) -> Tensor:
        n = self.settings.no_repeat_ngram_size
        B, T = tokens.shape
        if T < n:
            return scores
        starts = T - n + 1                                   # n-grams start at 0 .. T - n
        # an n-gram counts when all of it is real; it matches when its first n-1 tokens equal the
        # history's last n-1 tokens, and then its last token is banned
        match = torch.arange(starts, device=self.device)[None, :] >= (T - n_real)[:, None]
        for j in range(n - 1):
            match &= tokens[:, j:j + starts] == tokens[:, T - n + 1 + j:T - n + 2 + j]
        V = scores.shape[-1]
        target = torch.where(match, tokens[:, n - 1:], V)    # non-matches go to a spare column
        banned = torch.zeros(B, V + 1, dtype=torch.bool, device=self.device).scatter_(1, target, True)
        return scores.masked_fill(banned[:, :V], NEG_INF)

    def _dry(self, scores: Tensor, tokens: Tensor, in_range: Tensor) -> Tensor:
        """Step 4b. tokens [B, T] right-aligned real tokens, in_range [B, T] → penalised scores."""
        s = self.settings
        B, T = tokens.shape
        if T < 2:
            return scores
        length = self._run_lengths(tokens, in_range & ~self._breakers[tokens])  # [B, T-1]
        hit = length >= s.dry_allowed_length
        if self._reads_back_freely and not bool(hit.any()):
            return scores
        penalty = s.dry_multiplier * s.dry_base ** (length - s.dry_allowed_length).to(scores.dtype)
        penalty = torch.where(hit, penalty, torch.zeros_like(penalty))
        V = scores.shape[-1]
        # the token that followed each earlier run (position j + 1) gets that run's penalty
        per_token = torch.zeros(B, V, dtype=scores.dtype, device=self.device).scatter_reduce_(
            1, tokens[:, 1:], penalty, reduce="amax", include_self=True)
        per_token = per_token.masked_fill(self._eos_mask, 0.0)
        return scores - per_token

    def _run_lengths(self, tokens: Tensor, usable: Tensor) -> Tensor:
        """tokens [B, T], usable [B, T] (may be part of a run) → [B, T-1]: for each earlier end j, the
        length (up to DRY_MAX_MATCH) of the longest run of usable tokens ending at j that equals the run
        ending at the newest token, T - 1. Offset k compares position j - k with T - 1 - k, a block of
        offsets at a time (views of the history, no copies): a GPU takes them all in one block (nothing
        waits for the device); a CPU takes blocks of 1, 2, 4, ... offsets and stops once no run reaches
        the next block (most end at once)."""
        B, T = tokens.shape
        K = min(self.DRY_MAX_MATCH, T - 1)
        # windows of the K positions before each j + 1, left-padded with -1 (no token, never usable):
        # earlier[b, j, K-1-k] = tokens[b, j - k]; newest[b, K-1-k] = tokens[b, T-1-k]
        earlier = F.pad(tokens, (K, 0), value=-1).unfold(1, K, 1)[:, 1:T]            # [B, T-1, K]
        earlier_usable = F.pad(usable, (K, 0), value=False).unfold(1, K, 1)[:, 1:T]  # [B, T-1, K]
        newest, newest_usable = tokens[:, None, T - K:], usable[:, None, T - K:]    # [B, 1, K]
        length = torch.zeros(B, T - 1, dtype=torch.int64, device=tokens.device)
        alive = torch.ones(B, T - 1, 1, dtype=torch.int64, device=tokens.device)    # matched every offset so far
        first, block = 0, (1 if self._reads_back_freely else K)
        while first < K:
            m = slice(K - min(first + block, K), K - first)                        # offsets first .. + block
            same = ((earlier[..., m] == newest[..., m]) & earlier_usable[..., m]
                    & newest_usable[..., m]).flip(-1)                               # [B, T-1, block], k ascending
            run = same.to(torch.int64).cumprod(dim=-1) * alive
            length += run.sum(dim=-1)
            alive = run[:, :, -1:]
            first, block = first + block, block * 2
            if self._reads_back_freely and not bool(alive.any()):
                break
        return length

    def uniforms(self, n: int) -> Tensor:
        """The generator's next `n` draws for step 11 [n] float64 (as n calls would take them)."""
        return torch.rand(n, dtype=torch.float64, generator=self._generator)

    def _draw(self, probs: Tensor, u: float | Tensor | None = None) -> Tensor:
        """Inverse-CDF draw with one uniform u in [0, 1) shared by every row (drawn from the
        generator unless given; a float or a [1] tensor on the device) → [B] int64."""
        if u is None:
            u = self.uniforms(1).item()
        cdf = probs.to(torch.float64).cumsum(dim=-1)
        total = cdf[:, -1:]
        # strictly below the total, so the token found always has probability > 0
        target = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
        return torch.searchsorted(cdf, target, right=True)[:, 0].clamp_(max=probs.shape[-1] - 1)
