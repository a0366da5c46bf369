"""The sampler (backend/sampling.py), step by step, against plain per-row Python loops written here
and against transformers' logits processors; greedy exactness, seeds, EOS bans, edge values, and
the empirical distribution of draws."""
from __future__ import annotations

import math
import random
from dataclasses import replace

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper, NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper,
    TypicalLogitsWarper)

from trimtab.backend.errors import TrimtabError
from trimtab.backend.sampling import Sampler
from trimtab.backend.settings import GenerationSettings

V = 48
EOS = (46, 47)
PAD_ID = 3          # a real id, so padding that leaked into the penalties would show
BREAKERS = (5, 11)  # DRY's sequence breakers in these tests
INF = math.inf



@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tensors here are tiny: worker threads only add overhead (a lot on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# neutral apart from what a test sets
BASE = GenerationSettings()


def settings(**kw) -> GenerationSettings:
    return replace(BASE, **kw)


def sampler(**kw) -> Sampler:
    return Sampler(settings(**kw), vocab_size=V, eos_token_ids=EOS, sequence_breaker_ids=BREAKERS)


# ---- data -------------------------------------------------------------------------------


def make_rows(seed: int, lengths=(17, 9, 1, 30)) -> list[list[int]]:
    """Histories drawn from a small alphabet so tokens and n-grams repeat often."""
    rng = random.Random(seed)
    return [[rng.randrange(12) for _ in range(n)] for n in lengths]


def left_pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    tokens = torch.tensor([[PAD_ID] * (width - len(r)) + r for r in rows], dtype=torch.int64)
    mask = torch.tensor([[False] * (width - len(r)) + [True] * len(r) for r in rows])
    return tokens, mask


def make_logits(seed: int, batch: int, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, V, generator=g) * scale


# ---- plain reference loops (per row, per token, in Python floats) ----------------------


def ref_penalties(row: list[float], tokens: list[int], s: GenerationSettings, allow_eos: bool = True) -> list[float]:
    x = list(row)
    for token, bias in s.logit_bias.items():
        x[token] += bias
    for token in s.custom_token_bans:
        x[token] = -INF
    if s.ban_eos_token or not allow_eos:
        for token in EOS:
            x[token] = -INF
    # repetition penalty with range and decay
    if s.repetition_penalty != 1:
        length = s.repetition_penalty_range or len(tokens)
        fade = min(s.repetition_penalty_decay, length)
        weight: dict[int, float] = {}
        for age, token in enumerate(reversed(tokens)):
            if age >= length:
                break
            w = 1.0 if age < length - fade else (length - age) / (fade + 1)
            weight[token] = max(weight.get(token, 0.0), w)
        for token, w in weight.items():
            penalty = 1 + w * (s.repetition_penalty - 1)
            x[token] = x[token] * penalty if x[token] < 0 else x[token] / penalty
    # presence / frequency over the same range
    window = tokens[-s.repetition_penalty_range:] if s.repetition_penalty_range else tokens
    for token in set(window):
        x[token] -= window.count(token) * s.frequency_penalty + s.presence_penalty
    # no-repeat n-gram over the whole history
    n = s.no_repeat_ngram_size
    if n and len(tokens) >= n:
        prefix = tokens[len(tokens) - n + 1:]
        for start in range(len(tokens) - n + 1):
            if tokens[start:start + n - 1] == prefix:
                x[tokens[start + n - 1]] = -INF
    # DRY, the way webui describes it: for each earlier position, walk back while the tokens there
    # equal the newest ones (no breakers, inside the range); the token after a long enough run
    # is penalised by the longest such run
    if s.dry_multiplier > 0 and tokens:
        first = len(tokens) - (s.repetition_penalty_range or len(tokens))
        last = len(tokens) - 1
        dry: dict[int, float] = {}
        for end in range(max(first, 0), last):
            n = 0
            while (n < Sampler.DRY_MAX_MATCH and end - n >= max(first, 0)
                   and tokens[end - n] == tokens[last - n] and tokens[last - n] not in BREAKERS):
                n += 1
            if n >= s.dry_allowed_length:
                follower = tokens[end + 1]
                dry[follower] = max(dry.get(follower, 0.0), s.dry_multiplier * s.dry_base ** (n - s.dry_allowed_length))
        for token, penalty in dry.items():
            if token not in EOS:
                x[token] -= penalty
    return x


def softmax(x: list[float]) -> list[float]:
    top = max(x)
    e = [math.exp(v - top) if v > -INF else 0.0 for v in x]
    total = sum(e)
    return [v / total for v in e]


def ref_filters(row: list[float], s: GenerationSettings) -> list[float]:
    x = [v / s.temperature for v in row] if s.temperature != 1 else list(row)
    best = max(range(len(x)), key=lambda i: (x[i], -i))
    if 0 < s.top_k < len(x):
        kth = sorted(x, reverse=True)[s.top_k - 1]
        x = [v if v >= kth else -INF for v in x]
    if s.top_p < 1:
        p = softmax(x)
        mass = 0.0
        for rank, i in enumerate(sorted(range(len(x)), key=lambda i: (-p[i], i))):
            if rank > 0 and mass >= s.top_p:
                x[i] = -INF
            mass += p[i]
    if s.typical_p < 1:
        p = softmax(x)
        entropy = -sum(q * math.log(q) for q in p if q > 0)
        score = [abs(-math.log(q) - entropy) if q > 0 else INF for q in p]
        order = sorted(range(len(x)), key=lambda i: (score[i], i))
        mass, stop = 0.0, 0
        for i in order:
            mass += p[i]
            if mass < s.typical_p:
                stop += 1
        threshold = score[order[min(stop, len(x) - 1)]]
        x = [v if (score[i] <= threshold or i == best) else -INF for i, v in enumerate(x)]
    if s.min_p > 0:
        p = softmax(x)
        top = max(p)
        x = [v if p[i] >= s.min_p * top else -INF for i, v in enumerate(x)]
    return x


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, rtol: float, atol: float):
    """(torch.testing.assert_close costs seconds of imports on its first call.)"""
    assert actual.shape == expected.shape
    error = (actual - expected).abs()
    assert (error <= atol + rtol * expected.abs()).all(), f"max error {error.max().item():.3g}"


def assert_same_logits(actual: torch.Tensor, expected, *, rtol=1e-5, atol=1e-5):
    expected = torch.as_tensor(expected, dtype=torch.float64)
    actual = actual.double()
    assert torch.equal(torch.isinf(actual), torch.isinf(expected)), "different tokens removed"
    finite = torch.isfinite(expected)
    assert_close(actual[finite], expected[finite], rtol=rtol, atol=atol)


def check_penalties_against_loop(s: GenerationSettings, seed: int, allow_eos=True):
    rows = make_rows(seed)
    history, mask = left_pad(rows)
    logits = make_logits(seed, len(rows))
    got = Sampler(s, vocab_size=V, eos_token_ids=EOS, sequence_breaker_ids=BREAKERS).apply_penalties(
        logits, history, mask, allow_eos=allow_eos)
    for b, row in enumerate(rows):
        allowed = bool(allow_eos[b]) if isinstance(allow_eos, torch.Tensor) else allow_eos
        assert_same_logits(got[b], ref_penalties(logits[b].tolist(), row, s, allowed))


# ---- 1. bias and bans -------------------------------------------------------------------


def test_bias_and_bans_match_loop():
    s = settings(logit_bias={0: 2.5, 7: -4.0, 20: 100.0}, custom_token_bans=(1, 7, 30))
    check_penalties_against_loop(s, seed=1)
    check_penalties_against_loop(replace(s, ban_eos_token=True), seed=2)


def test_bias_matches_transformers_sequence_bias():
    bias = {0: 2.5, 7: -4.0, 20: 100.0}
    logits = make_logits(3, 4)
    history, mask = left_pad(make_rows(3))
    got = sampler(logit_bias=bias).apply_penalties(logits, history, mask)
    hf = SequenceBiasLogitsProcessor([[[t], b] for t, b in bias.items()])(history, logits.clone())
    assert torch.equal(got, hf)


def test_out_of_vocabulary_ids_are_an_error_at_construction():
    with pytest.raises(TrimtabError, match="custom_token_bans.*outside the vocabulary"):
        sampler(custom_token_bans=(V,))
    with pytest.raises(TrimtabError, match="logit_bias.*outside the vocabulary"):
        sampler(logit_bias={V + 5: 1.0})
    with pytest.raises(TrimtabError, match="eos_token_ids"):
        Sampler(BASE, vocab_size=V, eos_token_ids=[V])
    with pytest.raises(TrimtabError, match="top_p"):
        sampler(top_p=1.5)


def test_everything_banned_is_a_clear_error():
    s = sampler(custom_token_bans=tuple(range(V - 2)), ban_eos_token=True)
    with pytest.raises(TrimtabError, match=r"every token is banned in batch row\(s\) \[0, 1\]"):
        s(make_logits(0, 2), torch.zeros(2, 0, dtype=torch.int64))
    ngram = sampler(no_repeat_ngram_size=1)
    with pytest.raises(TrimtabError, match=r"every token is banned in batch row\(s\) \[1\]"):
        ngram(make_logits(0, 2), torch.stack([torch.zeros(V, dtype=torch.int64), torch.arange(V)]))
    logits = make_logits(0, 2)
    logits[1, 4] = float("nan")
    with pytest.raises(TrimtabError, match="hold NaN"):
        sampler()(logits, torch.zeros(2, 0, dtype=torch.int64))


# ---- EOS ----------------------------------------------------------------------------------


def eos_heavy_logits(batch: int) -> torch.Tensor:
    logits = make_logits(5, batch, scale=1.0)
    logits[:, EOS[0]] = 50.0
    logits[:, EOS[1]] = 49.0
    return logits


@pytest.mark.parametrize("greedy", [True, False])
def test_allow_eos_bool(greedy):
    temperature = 0.0 if greedy else 1.0
    logits = eos_heavy_logits(3)
    history = torch.zeros(3, 0, dtype=torch.int64)
    assert all(t in EOS for t in sampler(temperature=temperature)(logits, history).tolist())
    probs = sampler(temperature=temperature).probabilities(logits, history, allow_eos=False)
    assert probs[:, list(EOS)].abs().sum() == 0
    for _ in range(20):
        tokens = sampler(temperature=temperature, seed=None)(logits, history, allow_eos=False)
        assert not any(t in EOS for t in tokens.tolist())
    expected = [max((i for i in range(V) if i not in EOS), key=lambda i: logits[0, i])]
    assert sampler(temperature=0)(logits[:1], history[:1], allow_eos=False).tolist() == expected
    # ban_eos_token wins over allow_eos=True
    assert sampler(temperature=0, ban_eos_token=True)(logits[:1], history[:1]).tolist() == expected


def test_allow_eos_per_row_tensor():
    logits = eos_heavy_logits(4)
    history, mask = left_pad(make_rows(4))
    allow = torch.tensor([True, False, True, False])
    tokens = sampler(temperature=0)(logits, history, mask, allow_eos=allow)
    assert [t in EOS for t in tokens.tolist()] == [True, False, True, False]
    probs = sampler().probabilities(logits, history, mask, allow_eos=allow)
    assert (probs[1, list(EOS)] == 0).all() and (probs[3, list(EOS)] == 0).all()
    assert (probs[0, EOS[0]] > 0.5) and (probs[2, EOS[0]] > 0.5)
    check_penalties_against_loop(settings(repetition_penalty=1.3), seed=4, allow_eos=allow)
    with pytest.raises(TrimtabError, match="one entry per row"):
        sampler()(logits, history, mask, allow_eos=torch.tensor([True, False]))


# ---- 2. repetition penalty ------------------------------------------------------------------


@pytest.mark.parametrize("penalty", [1.15, 2.0, 0.7])
@pytest.mark.parametrize("rng", [0, 1, 5, 12, 100])
def test_repetition_penalty_matches_loop_and_transformers(penalty, rng):
    s = settings(repetition_penalty=penalty, repetition_penalty_range=rng)
    check_penalties_against_loop(s, seed=10 + rng)
    # transformers has no range and no padding: give it each row's in-range tokens, unpadded
    rows = make_rows(10 + rng)
    history, mask = left_pad(rows)
    logits = make_logits(10 + rng, len(rows))
    got = sampler(repetition_penalty=penalty, repetition_penalty_range=rng).apply_penalties(logits, history, mask)
    hf = RepetitionPenaltyLogitsProcessor(penalty)
    for b, row in enumerate(rows):
        in_range = row[-rng:] if rng else row
        expected = hf(torch.tensor([in_range]), logits[b:b + 1].clone())[0] if in_range else logits[b]
        assert torch.equal(got[b], expected)


@pytest.mark.parametrize("rng,decay", [(0, 3), (0, 100), (8, 3), (8, 8), (8, 20), (40, 10), (1, 1)])
def test_repetition_penalty_decay_matches_loop(rng, decay):
    s = settings(repetition_penalty=1.8, repetition_penalty_range=rng, repetition_penalty_decay=decay)
    check_penalties_against_loop(s, seed=20 + rng + decay)


def test_repetition_penalty_decay_worked_example():
    # range 4, decay 2, penalty 2: ages 0-1 full (factor 2), age 2 weight 2/3, age 3 weight 1/3, age 4 out
    s = sampler(repetition_penalty=2.0, repetition_penalty_range=4, repetition_penalty_decay=2)
    history = torch.tensor([[10, 11, 12, 13, 14]])             # ages 4, 3, 2, 1, 0
    logits = torch.ones(1, V)
    logits[0, 11] = -1.0
    got = s.apply_penalties(logits, history)[0]
    assert got[10] == 1.0                                       # outside the range
    assert math.isclose(got[11], -1.0 * (1 + 1 / 3), rel_tol=1e-6)
    assert math.isclose(got[12], 1.0 / (1 + 2 / 3), rel_tol=1e-6)
    assert got[13] == 0.5 and got[14] == 0.5
    # a token both old and new is penalised once, by its newest occurrence
    got = s.apply_penalties(torch.ones(1, V), torch.tensor([[20, 21, 22, 21]]))[0]
    assert got[21] == 0.5 and math.isclose(got[20], 1 / (1 + 1 / 3), rel_tol=1e-6)


def test_penalties_ignore_padding_and_accept_any_mask_layout():
    s = sampler(repetition_penalty=1.5, presence_penalty=0.3, frequency_penalty=0.2, no_repeat_ngram_size=2)
    rows = make_rows(30)
    history, mask = left_pad(rows)
    logits = make_logits(30, len(rows))
    left = s.apply_penalties(logits, history, mask)
    # right padding, or padding scattered through the row, gives the same result
    width = history.shape[1]
    right = torch.tensor([r + [PAD_ID] * (width - len(r)) for r in rows])
    right_mask = torch.tensor([[True] * len(r) + [False] * (width - len(r)) for r in rows])
    assert torch.equal(s.apply_penalties(logits, right, right_mask), left)
    scattered = torch.cat([history[:, :1] * 0 + 9, history], 1)
    scattered_mask = torch.cat([torch.zeros(len(rows), 1, dtype=torch.bool), mask], 1)
    assert torch.equal(s.apply_penalties(logits, scattered, scattered_mask), left)
    # no mask means every position is real
    full = history[3:]
    all_real = torch.ones_like(full, dtype=torch.bool)
    assert torch.equal(s.apply_penalties(logits[3:], full), s.apply_penalties(logits[3:], full, all_real))


# ---- 3. presence and frequency ----------------------------------------------------------------


@pytest.mark.parametrize("presence,frequency", [(0.5, 0.0), (0.0, 0.4), (0.7, -0.3), (-1.0, 1.5)])
@pytest.mark.parametrize("rng", [0, 6])
def test_presence_and_frequency_match_loop(presence, frequency, rng):
    s = settings(presence_penalty=presence, frequency_penalty=frequency, repetition_penalty_range=rng)
    check_penalties_against_loop(s, seed=40 + rng)
    check_penalties_against_loop(replace(s, repetition_penalty=1.2, repetition_penalty_decay=3), seed=41 + rng)


# ---- 4. no_repeat_ngram ------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 4, 9, 40])
def test_no_repeat_ngram_matches_loop_and_transformers(n):
    s = settings(no_repeat_ngram_size=n)
    check_penalties_against_loop(s, seed=50 + n)
    rows = make_rows(50 + n, lengths=(17, 9, 1, 30, 60))
    rows[4] = [1, 2, 3] * 20                                    # every n-gram repeats
    history, mask = left_pad(rows)
    logits = make_logits(50 + n, len(rows))
    got = sampler(no_repeat_ngram_size=n).apply_penalties(logits, history, mask)
    hf = NoRepeatNGramLogitsProcessor(n)
    for b, row in enumerate(rows):
        assert_same_logits(got[b], ref_penalties(logits[b].tolist(), row, s))
        expected = hf(torch.tensor([row]), logits[b:b + 1].clone())[0]
        assert torch.equal(got[b], expected)


# ---- 4b. DRY ------------------------------------------------------------------------------------


@pytest.mark.parametrize("multiplier,base,allowed", [(0.8, 1.75, 2), (2.0, 1.1, 1), (1.0, 3.0, 4)])
@pytest.mark.parametrize("rng", [0, 7, 25])
def test_dry_matches_loop(multiplier, base, allowed, rng):
    s = settings(dry_multiplier=multiplier, dry_base=base, dry_allowed_length=allowed, repetition_penalty_range=rng)
    for seed in (70, 71, 72):
        check_penalties_against_loop(s, seed=seed)


def test_dry_penalises_the_token_that_continues_a_loop_and_never_eos():
    loop = [20, 21, 22, 23, 24]
    rows = [loop * 3 + [20, 21],          # 20 21 seen 3 times before, each followed by 22
            loop + [40, 20, 21],          # one earlier run "20 21" → 22
            [20, 21, 46, 30, 20, 21],     # the earlier "20 21" was followed by EOS: left alone
            [20, 5, 22, 30, 20, 5]]       # the run crosses a breaker (5): no penalty
    history, mask = left_pad(rows)
    logits = torch.zeros(len(rows), V)
    got = sampler(dry_multiplier=1.0, dry_base=2.0, dry_allowed_length=2).apply_penalties(logits, history, mask)
    # row 0: the run ending at the newest token "... 23 24 20 21" is 12 long against the first
    # copy, so 22 loses 1 * 2 ** (12 - 2)
    assert got[0, 22].item() == -(2.0 ** 10)
    assert got[1, 22].item() == -1.0 and got[1].count_nonzero().item() == 1
    assert got[2].count_nonzero().item() == 0
    assert got[3].count_nonzero().item() == 0


def test_dry_caps_the_run_length():
    row = [7] * 200
    history, mask = left_pad([row])
    got = sampler(dry_multiplier=1.0, dry_base=1.1, dry_allowed_length=2).apply_penalties(torch.zeros(1, V), history, mask)
    assert got[0, 7].item() == pytest.approx(-(1.1 ** (Sampler.DRY_MAX_MATCH - 2)), rel=1e-5)


def test_dry_breaker_ids_are_checked():
    with pytest.raises(TrimtabError, match="sequence_breaker_ids: token id 48 is outside"):
        Sampler(settings(dry_multiplier=1.0), vocab_size=V, eos_token_ids=EOS, sequence_breaker_ids=[48])


def test_all_penalties_together_match_loop():
    s = settings(logit_bias={2: 1.0, 5: -2.0}, custom_token_bans=(8,), repetition_penalty=1.3,
                 repetition_penalty_range=10, repetition_penalty_decay=4, presence_penalty=0.2,
                 frequency_penalty=0.1, no_repeat_ngram_size=2, dry_multiplier=0.5)
    check_penalties_against_loop(s, seed=60)
    check_penalties_against_loop(s, seed=61, allow_eos=False)


# ---- 5. greedy ---------------------------------------------------------------------------------


@pytest.mark.parametrize("greedy", [dict(temperature=0.0), dict(do_sample=False, temperature=0.8)])
def test_greedy_is_exact_argmax_even_with_penalties(greedy):
    s = settings(repetition_penalty=1.4, presence_penalty=0.5, frequency_penalty=0.3, no_repeat_ngram_size=2,
                 top_k=3, top_p=0.5, min_p=0.2, typical_p=0.3, seed=None, **greedy)
    rows = make_rows(70)
    history, mask = left_pad(rows)
    for step in range(5):
        logits = make_logits(70 + step, len(rows))
        smp = Sampler(s, vocab_size=V, eos_token_ids=EOS)
        state = smp._generator.get_state()
        tokens = smp(logits, history, mask)
        expected = [max(range(V), key=lambda i: (ref[i], -i))
                    for ref in (ref_penalties(logits[b].tolist(), row, s) for b, row in enumerate(rows))]
        assert tokens.tolist() == expected
        assert torch.equal(smp._generator.get_state(), state)        # greedy draws nothing
        probs = smp.probabilities(logits, history, mask)
        assert probs.sum(-1).tolist() == [1.0] * len(rows) and probs.argmax(-1).tolist() == expected


def test_greedy_ties_pick_lowest_id():
    logits = torch.zeros(2, V)
    logits[0, [5, 9]] = 1.0
    logits[1, [40, 12]] = 2.0
    assert sampler(temperature=0)(logits, torch.zeros(2, 0, dtype=torch.int64)).tolist() == [5, 12]


# ---- 6-10. temperature and filters -------------------------------------------------------------

FILTER_CASES = [
    dict(temperature=0.7), dict(temperature=1.9),
    dict(top_k=1), dict(top_k=5), dict(top_k=V - 1), dict(top_k=V), dict(top_k=10 * V),
    dict(top_p=0.0), dict(top_p=0.3), dict(top_p=0.9), dict(top_p=0.999),
    dict(typical_p=0.0), dict(typical_p=0.2), dict(typical_p=0.95),
    dict(min_p=0.05), dict(min_p=0.5), dict(min_p=1.0),
    dict(temperature=0.5, top_k=20, top_p=0.8, typical_p=0.9, min_p=0.1),
    dict(temperature=1.5, top_k=30, top_p=0.95, typical_p=0.5, min_p=0.02),
]


@pytest.mark.parametrize("case", FILTER_CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_filters_match_loop(case):
    s = settings(**case)
    logits = make_logits(80, 6)
    logits[1, :10] = -INF                                       # banned tokens coming in
    logits[2] *= 0.05                                           # nearly flat
    logits[3, 17] = 25.0                                        # one dominant token
    smp = Sampler(s, vocab_size=V, eos_token_ids=EOS)
    for candidates in (Sampler.CPU_CANDIDATES, 10, 3):          # with and without the top_p/typical_p shortcut
        smp.candidates = candidates
        got = smp.apply_filters(logits)
        for b in range(len(logits)):
            assert_same_logits(got[b], ref_filters(logits[b].tolist(), s))


@pytest.mark.parametrize("temperature", [0.3, 1.0, 2.5])
def test_temperature_matches_transformers(temperature):
    logits = make_logits(90, 4)
    got = sampler(temperature=temperature).apply_filters(logits)
    assert torch.equal(got, TemperatureLogitsWarper(temperature)(None, logits))


def removed(x: torch.Tensor) -> torch.Tensor:
    return torch.isinf(x) & (x < 0)


@pytest.mark.parametrize("k", [1, 2, 7, V])
def test_top_k_matches_transformers_including_ties(k):
    logits = make_logits(91, 4)
    logits[1, [3, 8, 20, 33]] = logits[1].max() + 1           # a four-way tie at the top
    logits[2] = torch.round(logits[2])                          # many ties everywhere
    got = sampler(top_k=k).apply_filters(logits)
    assert torch.equal(removed(got), removed(TopKLogitsWarper(k)(None, logits)))
    assert (~removed(got[1])).sum() >= max(k, 4)                # the tied top four all stay


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.8, 0.95, 0.999])
def test_top_p_matches_transformers(p):
    logits = make_logits(92, 8)
    logits[1, :20] = -INF
    smp = sampler(top_p=p)
    for candidates in (Sampler.CPU_CANDIDATES, 4):
        smp.candidates = candidates
        got = smp.apply_filters(logits)
        assert torch.equal(removed(got), removed(TopPLogitsWarper(p)(None, logits)))


@pytest.mark.parametrize("mass", [1e-6, 0.1, 0.4, 0.7, 0.95])
def test_typical_p_matches_transformers_plus_the_top_token(mass):
    logits = make_logits(93, 8)
    logits[1, :20] = -INF
    logits[2, 4] = 12.0                                         # a dominant token, far from typical
    hf_kept = ~removed(TypicalLogitsWarper(mass)(None, logits))
    best = torch.nn.functional.one_hot(logits.argmax(-1), V).bool()
    smp = sampler(typical_p=mass)
    for candidates in (Sampler.CPU_CANDIDATES, 4):
        smp.candidates = candidates
        assert torch.equal(~removed(smp.apply_filters(logits)), hf_kept | best)


def test_typical_p_differs_from_transformers_only_by_keeping_the_top_token():
    # a peaked distribution where the typical set excludes the most likely token
    logits = torch.full((1, V), 0.0)
    logits[0, 0] = 3.0
    hf_kept = ~removed(TypicalLogitsWarper(1e-6)(None, logits))[0]
    assert not hf_kept[0]                                       # transformers drops it
    got = ~removed(sampler(typical_p=1e-6).apply_filters(logits))[0]
    assert got[0] and torch.equal(got, hf_kept | (torch.arange(V) == 0))


@pytest.mark.parametrize("p", [0.01, 0.1, 0.5, 0.9, 1.0])
def test_min_p_matches_transformers(p):
    logits = make_logits(94, 8)
    logits[1, :20] = -INF
    logits[2, [5, 6]] = 9.0                                     # tied top tokens: both survive min_p = 1
    got = sampler(min_p=p).apply_filters(logits)
    assert torch.equal(removed(got), removed(MinPLogitsWarper(p)(None, logits)))


@pytest.mark.parametrize("case", [dict(top_p=0.5), dict(top_p=0.95), dict(top_p=0.0), dict(typical_p=0.3),
                                  dict(typical_p=0.9), dict(top_k=50, top_p=0.9, typical_p=0.9)],
                         ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_candidate_shortcut_gives_the_full_sort_result(case):
    vocab = 6000
    g = torch.Generator().manual_seed(96)
    logits = torch.randn(6, vocab, generator=g) * 2
    logits[1] = logits[1].to(torch.bfloat16).float()             # many exact ties, as bf16 logits have
    logits[2] = torch.round(logits[2] * 2) / 2                   # ties everywhere
    logits[3, :100] += 12                                        # a peaked head
    logits[4] *= 0.01                                            # nearly flat: the shortcut cannot decide
    logits[5, 4000:] = -INF
    smp = Sampler(settings(**case), vocab_size=vocab, eos_token_ids=[0])
    full = Sampler(settings(**case), vocab_size=vocab, eos_token_ids=[0])
    full.candidates = vocab
    expected = full.apply_filters(logits)
    for candidates in (Sampler.CPU_CANDIDATES, 64, 7):
        smp.candidates = candidates
        assert torch.equal(smp.apply_filters(logits), expected)
        for b in range(len(logits)):                             # one row at a time: the shortcut decides alone
            assert torch.equal(smp.apply_filters(logits[b:b + 1]), expected[b:b + 1])


EXTREMES = [dict(top_k=1), dict(top_p=0.0), dict(top_p=1e-9), dict(min_p=1.0), dict(typical_p=0.0),
            dict(typical_p=1e-9), dict(top_k=1, top_p=0.0, typical_p=0.0, min_p=1.0),
            dict(temperature=1e-3, top_p=1e-9), dict(temperature=50.0, min_p=1.0)]


@pytest.mark.parametrize("case", EXTREMES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_extreme_filters_keep_the_most_likely_token(case):
    logits = make_logits(95, 6)
    logits[1] *= 1e-3                                           # almost flat
    logits[2, :] = -INF
    logits[2, [7, 30]] = torch.tensor([1.0, 0.5])               # two survivors
    logits[3, 11] = 80.0                                        # overwhelming
    logits[4] = torch.linspace(-5, 5, V)                        # top token at the end
    rows = [[1, 2, 3]] * 6
    history, _ = left_pad(rows)
    smp = Sampler(settings(seed=3, **case), vocab_size=V, eos_token_ids=EOS)
    best = logits.argmax(-1)
    probs = smp.probabilities(logits, history)
    assert (probs.gather(-1, best[:, None]) > 0).all()
    assert torch.allclose(probs.sum(-1), torch.ones(6))
    for _ in range(5):
        tokens = smp(logits, history)
        assert (probs.gather(-1, tokens[:, None]) > 0).all()
        if "typical_p" not in case:                             # the rest keep the top token only
            assert torch.equal(tokens, best)


# ---- the whole pipeline ---------------------------------------------------------------------------


def test_probabilities_match_loop_for_all_steps():
    s = settings(logit_bias={2: 1.0}, custom_token_bans=(8,), repetition_penalty=1.2, repetition_penalty_range=12,
                 repetition_penalty_decay=3, presence_penalty=0.1, frequency_penalty=0.05, no_repeat_ngram_size=3,
                 temperature=0.8, top_k=25, top_p=0.9, typical_p=0.95, min_p=0.03)
    rows = make_rows(100)
    history, mask = left_pad(rows)
    logits = make_logits(100, len(rows))
    allow = torch.tensor([True, False, True, True])
    probs = Sampler(s, vocab_size=V, eos_token_ids=EOS).probabilities(logits, history, mask, allow)
    for b, row in enumerate(rows):
        expected = softmax(ref_filters(ref_penalties(logits[b].tolist(), row, s, bool(allow[b])), s))
        assert_close(probs[b].double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-4, atol=1e-6)


def test_input_logits_are_left_alone():
    logits = make_logits(101, 4)
    before = logits.clone()
    history, mask = left_pad(make_rows(101))
    sampler(repetition_penalty=1.3, top_p=0.5, logit_bias={1: 2.0})(logits, history, mask)
    sampler()(logits, history, mask)
    assert torch.equal(logits, before)


# ---- 11. the draw: seeds and statistics ---------------------------------------------------------


def run_steps(smp: Sampler, logits_steps: list[torch.Tensor], rows) -> list[list[int]]:
    history, mask = left_pad(rows)
    return [smp(step, history, mask).tolist() for step in logits_steps]


def test_same_seed_same_tokens_and_batch_position_does_not_matter():
    s = settings(seed=1234, temperature=1.3, top_p=0.95, repetition_penalty=1.1)
    rows = make_rows(110)
    steps = [make_logits(200 + i, len(rows), scale=1.0) for i in range(30)]
    first = run_steps(Sampler(s, vocab_size=V, eos_token_ids=EOS), steps, rows)
    again = run_steps(Sampler(s, vocab_size=V, eos_token_ids=EOS), steps, rows)
    assert first == again
    other = run_steps(Sampler(replace(s, seed=99), vocab_size=V, eos_token_ids=EOS), steps, rows)
    assert other != first
    # row 2 alone, and the batch reversed: each row gets the tokens it got in the first batch
    alone = run_steps(Sampler(s, vocab_size=V, eos_token_ids=EOS), [x[2:3] for x in steps], rows[2:3])
    assert [t[0] for t in alone] == [t[2] for t in first]
    flipped = run_steps(Sampler(s, vocab_size=V, eos_token_ids=EOS), [x.flip(0) for x in steps], rows[::-1])
    assert [t[::-1] for t in flipped] == first
    # identical rows processed the same way give identical tokens
    same = run_steps(Sampler(s, vocab_size=V, eos_token_ids=EOS), [x[:1].expand(3, V) for x in steps], rows[:1] * 3)
    assert all(t == [t[0]] * 3 for t in same) and [t[0] for t in same] == [t[0] for t in first]


def test_no_seed_is_nondeterministic():
    steps = [make_logits(300 + i, 1, scale=0.1) for i in range(40)]
    runs = [run_steps(sampler(seed=None), steps, [[1]]) for _ in range(3)]
    assert not (runs[0] == runs[1] == runs[2])


def empirical(smp: Sampler, logits: torch.Tensor, draws: int) -> torch.Tensor:
    history = torch.zeros(logits.shape[0], 0, dtype=torch.int64)
    counts = torch.zeros(logits.shape[0], V)
    ones = torch.ones(logits.shape[0], 1)
    for _ in range(draws):
        counts.scatter_add_(1, smp(logits, history)[:, None], ones)
    return counts / draws


def test_draws_follow_the_softmax():
    logits = torch.full((2, V), -INF)
    logits[0, [0, 5, 6, 20, V - 1]] = torch.tensor([1.0, 0.5, 0.0, -1.0, 2.0])   # V-1 is an EOS id
    logits[1, 10:18] = torch.linspace(-1, 1, 8)
    draws = 5000
    freq = empirical(sampler(seed=2024), logits, draws)
    probs = logits.softmax(-1)
    sigma = (probs * (1 - probs) / draws).sqrt()
    assert ((freq - probs).abs() <= 4 * sigma + 1e-9).all(), (freq - probs).abs().max()
    assert (freq[probs == 0] == 0).all()                        # impossible tokens never drawn


def test_draws_follow_the_filtered_distribution():
    logits = torch.zeros(1, V)
    logits[0, :6] = torch.tensor([3.0, 2.5, 2.0, 1.5, 1.0, 0.5])
    smp = sampler(seed=7, top_k=4, temperature=0.7)
    draws = 3000
    freq = empirical(smp, logits, draws)
    probs = smp.probabilities(logits, torch.zeros(1, 0, dtype=torch.int64))
    assert (probs[0, 4:] == 0).all() and (freq[0, 4:] == 0).all()
    sigma = (probs * (1 - probs) / draws).sqrt()
    assert ((freq - probs).abs() <= 4 * sigma + 1e-9).all()


def test_draw_never_picks_a_zero_probability_token_at_the_edges():
    smp = sampler(seed=0)
    # the only possible tokens are the first and the last; u close to 0 and 1 must stay on them
    probs = torch.zeros(3, V)
    probs[0, 0] = 1.0
    probs[1, V - 1] = 1.0
    probs[2, [0, V - 1]] = 0.5
    for u in [0.0, 1e-300, 0.5, 1 - 1e-16, 0.999999999]:
        assert smp._draw(probs, u)[:2].tolist() == [0, V - 1]
        assert smp._draw(probs, u)[2].item() == (0 if u < 0.5 else V - 1)


@pytest.mark.parametrize("change", [{}, {"temperature": 0.7}, {"repetition_penalty": 1.05}, {"presence_penalty": 0.1},
                                    {"frequency_penalty": 0.1}, {"dry_multiplier": 0.8}, {"no_repeat_ngram_size": 3},
                                    {"logit_bias": {4: 1.0}}, {"custom_token_bans": [4]}, {"ban_eos_token": True}])
def test_takes_argmax_only_where_nothing_changes_a_logit(change):
    """takes_argmax (the GPU may pick the token itself) is true exactly where the sampler's token is the
    argmax of the raw logits: greedy, nothing banned, biased or penalised, EOS allowed."""
    s = sampler(**{"temperature": 0, **change})
    assert s.takes_argmax() == (not change)
    logits, rows = make_logits(7, 4), make_rows(7)
    history = torch.tensor([r[-9:] + [PAD_ID] * (9 - len(r[-9:])) for r in rows])
    if s.takes_argmax():   # the claim itself
        assert torch.equal(s(logits, history), logits.argmax(dim=-1))
        assert not s.takes_argmax(allow_eos=False)   # an EOS hold-off changes the EOS logits
