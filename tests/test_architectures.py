"""Each architecture's logits equal transformers' on tiny random models: prefill, decode, batches."""
from __future__ import annotations

import pytest
import torch

from tiny_models import TINY_CONFIGS, build_hf_model
from trimtab.backend.generation import decode_one_token, prefill
from trimtab.backend.models import architecture_for

transformers = pytest.importorskip("transformers")

TOLERANCE = 1e-4


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours - reference).abs().max() / reference.abs().max()).item()


def trimtab_model(hf_model):
    config = hf_model.config.to_dict()
    arch = architecture_for(config)
    state = {k: v.detach() for k, v in hf_model.state_dict().items()}
    return arch.Model(arch.ModelArgs.from_config(config), arch.sanitize(state))


def hf_logits(hf_model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(torch.tensor([ids])).logits[0].float()


@pytest.fixture(scope="module", params=sorted(TINY_CONFIGS))
def pair(request):
    hf = build_hf_model(request.param)
    return hf, trimtab_model(hf)


def test_prefill_then_decode_matches_transformers(pair):
    hf, ours = pair
    ids = torch.randint(0, hf.config.vocab_size, (14,), generator=torch.Generator().manual_seed(1)).tolist()
    reference = hf_logits(hf, ids)                   # [14, V]
    cache, logits = prefill(ours, [ids[:9]], max_len=len(ids), last_only=False)
    assert relative_error(logits[0], reference[:9]) < TOLERANCE
    for position in range(9, len(ids)):
        step = decode_one_token(ours, cache, torch.tensor([ids[position]]))
        assert relative_error(step[0], reference[position]) < TOLERANCE, f"decode step at {position}"


def test_batch_of_different_lengths_matches_each_sequence_alone(pair):
    hf, ours = pair
    g = torch.Generator().manual_seed(2)
    short = torch.randint(0, hf.config.vocab_size, (5,), generator=g).tolist()
    long = torch.randint(0, hf.config.vocab_size, (11,), generator=g).tolist()
    follow = torch.randint(0, hf.config.vocab_size, (2, 3), generator=g)  # three decode steps
    cache, logits = prefill(ours, [short, long], max_len=11 + 3, last_only=False)
    assert relative_error(logits[0, -5:], hf_logits(hf, short)) < TOLERANCE
    assert relative_error(logits[1], hf_logits(hf, long)) < TOLERANCE
    for step in range(3):
        out = decode_one_token(ours, cache, follow[:, step])
        for row, prompt in enumerate((short, long)):
            reference = hf_logits(hf, prompt + follow[row, : step + 1].tolist())[-1]
            assert relative_error(out[row], reference) < TOLERANCE, f"row {row}, decode step {step}"


def test_unused_checkpoint_tensors_are_none(pair):
    _, ours = pair
    assert ours.unused_weights == []
