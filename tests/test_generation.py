"""The generator: stop strings, EOS, min/max tokens, cancellation, seeds, batches, degeneration."""
from __future__ import annotations

import threading

import pytest

import trimtab
from tiny_models import write_tiny_model_dir
from trimtab.backend.repetition import DegenerationMonitor, seq_rep_n
from trimtab.backend.stop_strings import StopStringFilter

pytest.importorskip("transformers")

PROMPT = [{"role": "user", "content": "w5 w6 w7"}]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny")
    write_tiny_model_dir("llama", directory)
    return trimtab.load(directory)


def greedy(model, **settings):
    return model.chat(PROMPT, temperature=0, max_new_tokens=12, **settings)


def test_stop_string_split_across_tokens_cuts_exactly(model):
    full = greedy(model, ban_eos_token=False)
    words = full.text.split(" ")
    assert len(words) >= 4, full.text
    stop = words[1][-1] + " " + words[2][:2]          # the end of one token, the space, the next one
    stream = model.stream(PROMPT, temperature=0, max_new_tokens=12, stop=[stop])
    pieces = list(stream)
    cut = stream.completion
    assert cut.finish_reason == "stop_string"
    assert cut.text == full.text[: full.text.index(stop)]
    assert "".join(pieces) == cut.text and stop not in "".join(pieces)


def test_stop_filter_holds_back_partial_matches():
    f = StopStringFilter(["<end>"])
    assert f.push("hello <e") == "hello "
    assert f.push("n") == ""
    assert f.push("x and more") == "<enx and more"
    assert f.push(" <end> tail") == " " and f.stopped
    assert f.flush() == ""
    g = StopStringFilter(["###"])
    assert g.push("a #") == "a " and g.flush() == "#"


def test_max_new_tokens_ends_with_length(model):
    out = model.chat(PROMPT, temperature=0, max_new_tokens=3, min_new_tokens=3)
    assert out.finish_reason == "length" and out.usage.completion_tokens == 3


def test_min_new_tokens_holds_off_eos(model):
    eos = model.tokenizer.eos_token_ids[0]
    # a huge bias makes EOS the greedy choice at once, unless min_new_tokens holds it off
    at_once = model.chat(PROMPT, temperature=0, max_new_tokens=8, logit_bias={eos: 50}, guard="off")
    assert at_once.finish_reason == "eos" and at_once.usage.completion_tokens == 0
    held = model.chat(PROMPT, temperature=0, max_new_tokens=8, logit_bias={eos: 50}, min_new_tokens=4, guard="off")
    assert held.finish_reason == "eos" and held.usage.completion_tokens == 4


def test_cancel_from_another_thread(model):
    stream = model.stream(PROMPT, temperature=0, max_new_tokens=10_000, min_new_tokens=10_000, guard="off")
    received = []
    for piece in stream:
        received.append(piece)
        if len(received) == 3:
            threading.Thread(target=stream.cancel).start()
    assert stream.completion.finish_reason == "cancelled"
    assert stream.completion.usage.completion_tokens < 50


def test_same_seed_same_text(model):
    a = model.chat(PROMPT, temperature=0.3, top_p=0.9, seed=11, max_new_tokens=10)
    b = model.chat(PROMPT, temperature=0.3, top_p=0.9, seed=11, max_new_tokens=10)
    assert a.token_ids == b.token_ids and a.text == b.text


def test_batch_equals_one_at_a_time(model):
    conversations = [PROMPT, [{"role": "user", "content": "w9 w10 w11 w12 w13 w14 w15"}], [{"role": "user", "content": "w20"}]]
    batch = model.chat_batch(conversations, temperature=0, max_new_tokens=8)
    alone = [model.chat(c, temperature=0, max_new_tokens=8) for c in conversations]
    assert [c.token_ids for c in batch] == [c.token_ids for c in alone]
    assert [c.finish_reason for c in batch] == [c.finish_reason for c in alone]


def test_seq_rep_n_and_monitor():
    assert seq_rep_n([1, 2, 3, 4, 5], 4) == 0.0
    assert seq_rep_n([1, 2, 1, 2, 1, 2], 2) == pytest.approx(1 - 2 / 5)
    assert seq_rep_n([1, 2], 4) == 0.0
    monitor = DegenerationMonitor(window=16, n=4, threshold=0.5, min_tokens=16)
    assert not any(monitor.push(t) for t in range(40))           # no repeats
    assert any(monitor.push(t) for t in [7, 8, 9] * 10)          # a loop


def test_degenerate_reply_is_flagged_and_can_stop(model):
    loop = {"logit_bias": {}, "guard": "off", "temperature": 0, "max_new_tokens": 120}
    # make greedy decoding cycle through three words
    bias = {9: 30.0}
    out = model.chat(PROMPT, no_repeat_ngram_size=0, **{**loop, "logit_bias": bias})
    assert out.degenerate and out.finish_reason in ("length", "eos")
    stopped = model.chat(PROMPT, stop_on_degenerate=True, **{**loop, "logit_bias": bias})
    assert stopped.finish_reason == "degenerate" and stopped.usage.completion_tokens < 120


def test_guard_overrides_are_on_the_result(model):
    out = model.chat(PROMPT, temperature=0.2, repetition_penalty=1.15, ban_eos_token=True, max_new_tokens=4)
    changed = {o.field for o in out.overrides}
    assert {"repetition_penalty", "ban_eos_token"} <= changed


def longest_run(token_ids: list[int]) -> int:
    best = run = 0
    for i, token in enumerate(token_ids):
        run = run + 1 if i and token == token_ids[i - 1] else 1
        best = max(best, run)
    return best


def test_dry_steers_greedy_decoding_out_of_a_loop(model):
    # a huge bias makes greedy decoding repeat one word; DRY's penalty on extending the repeat
    # grows with its length (3 * 2 ** (n - 2)) until it outweighs the bias
    loop = {"guard": "off", "temperature": 0, "max_new_tokens": 60, "logit_bias": {9: 30.0}}
    plain = model.chat(PROMPT, **loop)
    dry = model.chat(PROMPT, dry_multiplier=3.0, dry_base=2.0, dry_allowed_length=2, **loop)
    assert longest_run(dry.token_ids) < longest_run(plain.token_ids), (plain.text, dry.text)
    assert seq_rep_n(dry.token_ids, 4) < seq_rep_n(plain.token_ids, 4)


class DecoderOnHost:
    """Stands in for the CUDA graph decoder on the CPU: pipelined_tokens step by step through the model's own
    forward, each token its logits' argmax or choose's pick, counting the loops it was asked for, those given
    a chooser, and the tokens they gave."""

    def __init__(self, transformer):
        self.transformer, self.loops, self.chosen_loops, self.tokens = transformer, 0, 0, 0

    def pipelined_tokens(self, token, cache, choose=None):
        import torch

        self.loops += 1
        self.chosen_loops += choose is not None
        t = self.transformer
        while cache.length < cache.max_len:
            t.cuda_decoder = None           # the forward's generic path, not this stand-in
            try:
                logits = t.forward(torch.tensor([[token]]), cache)[0, -1]
            finally:
                t.cuda_decoder = self
            if choose is None:
                token = int(logits.argmax())
            else:
                token, problem = choose(logits).tolist()
                if problem:
                    raise choose.error(problem)
            self.tokens += 1
            yield token


def test_greedy_generation_takes_argmax_tokens_from_the_graph_decoder(model):
    """Where every token is the argmax of the logits (greedy, DRY off, no penalty), the generation loop
    takes its tokens from the decoder's pipelined_tokens (the GPU's loop), argmax, after the first: the same
    reply as the sampler's loop, stop strings, EOS and max_new_tokens included; a cancel ends it."""
    t = model.transformer
    plain = greedy(model, dry_multiplier=0, ban_eos_token=False)
    words = plain.text.split(" ")
    assert len(words) >= 4, plain.text
    stop = words[1][-1] + " " + words[2][:2]   # as test_stop_string_split_across_tokens_cuts_exactly cuts
    cut = model.chat(PROMPT, temperature=0, max_new_tokens=12, dry_multiplier=0, stop=[stop])
    stand_in = DecoderOnHost(t)
    t.cuda_decoder = stand_in
    try:
        fast = greedy(model, dry_multiplier=0, ban_eos_token=False)
        assert stand_in.loops == 1 and stand_in.tokens == len(fast.token_ids) - 1 + (fast.finish_reason == "eos")
        assert (fast.token_ids, fast.text, fast.finish_reason) == (plain.token_ids, plain.text, plain.finish_reason)
        fast_cut = model.chat(PROMPT, temperature=0, max_new_tokens=12, dry_multiplier=0, stop=[stop])
        assert (fast_cut.text, fast_cut.finish_reason) == (cut.text, "stop_string") and stand_in.loops == 2
        assert cut.text == plain.text[: plain.text.index(stop)]
        stream = model.stream(PROMPT, temperature=0, max_new_tokens=10_000, dry_multiplier=0, guard="off",
                              ban_eos_token=False)
        for i, _ in enumerate(stream):
            if i == 2:
                stream.cancel()
        assert i >= 2 and stream.completion.finish_reason == "cancelled" and stand_in.loops == 3
        assert stand_in.chosen_loops == 0
    finally:
        t.cuda_decoder = None


@pytest.mark.parametrize("settings", [dict(temperature=0.9, seed=5, dry_multiplier=0.8, min_new_tokens=6),
                                      dict(temperature=0, repetition_penalty=1.3, ban_eos_token=False),
                                      dict(temperature=0.7, seed=9, top_p=0.9, dry_multiplier=1.5,
                                           stop=["w2"], max_new_tokens=40)])
def test_sampled_generation_takes_tokens_chosen_behind_the_graph_decoder(model, settings):
    """A reply that is not the logits' argmax (sampled, or penalised) takes its tokens after the first from
    the decoder's pipelined_tokens with the sampler as its chooser (SamplingOnDevice: the history kept and
    grown beside the steps, EOS held off for min_new_tokens): the same reply as the sampler's loop."""
    t = model.transformer
    settings = {"max_new_tokens": 30, "guard": "off", **settings}
    plain = model.chat(PROMPT, **settings)
    stand_in = DecoderOnHost(t)
    t.cuda_decoder = stand_in
    try:
        fast = model.chat(PROMPT, **settings)
    finally:
        t.cuda_decoder = None
    assert stand_in.loops == stand_in.chosen_loops == 1
    assert (fast.token_ids, fast.text, fast.finish_reason) == (plain.token_ids, plain.text, plain.finish_reason)
    assert len(plain.token_ids) >= settings.get("min_new_tokens", 2)


def test_sampling_on_device_holds_eos_off_for_exactly_min_new_tokens(model):
    """EOS biased to be every step's argmax (so the sampler, chosen behind the decoder, picks it): the
    reply is exactly min_new_tokens long, as in the sampler's loop."""
    t = model.transformer
    eos = model.tokenizer.eos_token_ids[0]
    settings = dict(temperature=0, logit_bias={eos: 50.0}, min_new_tokens=5, max_new_tokens=30, guard="off")
    plain = model.chat(PROMPT, **settings)
    t.cuda_decoder = DecoderOnHost(t)
    try:
        held = model.chat(PROMPT, **settings)
    finally:
        t.cuda_decoder = None
    assert (held.token_ids, held.finish_reason) == (plain.token_ids, plain.finish_reason)
    assert len(held.token_ids) == 5 and held.finish_reason == "eos"


def test_sampling_on_device_raises_the_samplers_error_for_nan_logits(model):
    """The chooser's problem for NaN logits is the sampler's own error, raised by the loop that reads it."""
    import torch
    from trimtab.backend.errors import TrimtabError
    from trimtab.backend.generation import SamplingOnDevice
    from trimtab.backend.sampling import Sampler
    from trimtab.backend.settings import GenerationSettings

    sampler = Sampler(GenerationSettings(temperature=0.5), vocab_size=8, eos_token_ids=[0])
    choose = SamplingOnDevice(sampler, torch.tensor([[1, 2, 3]]), max_new_tokens=4, min_new_tokens=0)
    token, problem = choose(torch.full((8,), float("nan"))).tolist()
    assert problem and choose.length.tolist() == [4] and choose.window[0, -1] == token
    with pytest.raises(TrimtabError, match=r"logits of batch row\(s\) \[0\] hold NaN"):
        raise choose.error(problem)
    assert choose(torch.arange(8.0)).tolist()[1] == 0
