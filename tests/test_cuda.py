"""The CUDA kernels (csrc/cuda/, backend/quant/cuda_linear.py) against the reference dequantiser.
Skipped where PyTorch sees no CUDA GPU; the CPU suite never needs one. Only the chunk planning,
which runs on the host, is tested everywhere."""
from __future__ import annotations

import pytest
import torch

from trimtab.backend.quant import format as qformat
from trimtab.backend.quant.cuda_linear import plan_chunks

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def random_layer(in_features, out_features, widths, group, perm=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    sizes = qformat.split_groups(in_features, group)
    widths = [widths[i % len(widths)] for i in range(len(sizes))]
    q = torch.cat([torch.randint(0, 2 ** b, (n, out_features), generator=g) for n, b in zip(sizes, widths)])
    steps = torch.tensor([0.07 / 2 ** b for b in widths])[:, None]
    scales = steps * (0.5 + torch.rand(len(sizes), out_features, generator=g))
    mins = -scales * torch.tensor([2 ** b - 1 for b in widths])[:, None] / 2
    order = torch.randperm(in_features, generator=g) if perm else None
    return qformat.pack(q, scales, mins, widths, sizes, order)


def test_plan_chunks_pads_groups_and_maps_rows():
    layer = random_layer(300, 8, [8, 3, 2], 100, perm=True)  # groups of 100, 100, 100: 4 chunks each
    plan = plan_chunks(layer)
    assert plan.meta.shape == (12, 4)
    assert plan.meta[:, 1].tolist() == [8] * 4 + [3] * 4 + [2] * 4
    assert plan.word_rows == 4 * 8 + 4 * 3 + 4 * 2
    assert plan.xmap.shape == (12 * 32,)
    real = plan.xmap[plan.xmap >= 0]
    assert sorted(real.tolist()) == list(range(300))          # every input row once
    assert (plan.xmap[100:128] == -1).all()                     # the first group's padding
    assert plan.xmap[:100].tolist() == layer.perm[:100].tolist()


def test_plan_chunks_identity_needs_no_map():
    assert plan_chunks(random_layer(256, 8, [4], 128)).xmap is None


CASES = [  # in, out, widths cycled over groups, group size, act-order
    (256, 128, [4], 128, False),
    (1000, 333, [2, 3, 4, 5, 6, 8], 128, True),
    (576, 580, [8, 6, 5, 4, 3, 2], 64, False),
    (300, 50, [8, 3, 2], 100, True),
]


@needs_cuda
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}-w{''.join(map(str, c[2]))}-g{c[3]}")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("batch", [1, 3, 8, 40])
def test_cuda_linear_matches_reference(case, dtype, batch):
    from trimtab.backend.quant.kernels import PackedLinear

    in_f, out_f, widths, group, perm = case
    layer = random_layer(in_f, out_f, widths, group, perm, seed=batch)
    bias = torch.randn(out_f)
    linear = PackedLinear.from_canonical(layer, bias, "cuda", dtype)
    w = qformat.dequantize(layer).cuda().double()                     # [out, in]
    x = torch.randn(batch, in_f, device="cuda").to(dtype)
    torch.cuda.empty_cache()
    torch.full((64 << 20,), float("nan"), device="cuda")               # poison the free memory
    y = linear(x)
    ref = x.double() @ w.t() + bias.cuda().double()
    assert y.dtype == dtype and y.shape == (batch, out_f)
    assert torch.isfinite(y).all()
    error = float((y.double() - ref).norm() / ref.norm())
    assert error < (4e-3 if dtype == torch.float16 else 1.2e-2)


@needs_cuda
def test_dequantized_rows_match_reference():
    from trimtab.backend.quant.kernels import PackedLinear

    layer = random_layer(1000, 333, [2, 3, 4, 5, 6, 8], 128, perm=True)
    linear = PackedLinear.from_canonical(layer, None, "cuda", torch.float16)
    ids = torch.tensor([0, 5, 332, 17])
    rows = linear.dequantized_rows(ids).double().cpu()
    ref = qformat.dequantize(layer).double()[ids]
    assert float((rows - ref).norm() / ref.norm()) < 1e-3


def test_graph_decoder_ops_match_model_forward(tmp_path):
    """The decoder's own prefill (chunked, GQA expanded, masked after the first chunk) and decode-step
    ops compute what model.forward does; run eagerly on the CPU (the graph capture itself needs a GPU)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from tiny_models import write_tiny_model_dir

    import trimtab
    from trimtab.backend.cuda_decode import CudaGraphDecoder

    write_tiny_model_dir("llama", tmp_path)
    model = trimtab.load(str(tmp_path), device="cpu").transformer
    decoder = object.__new__(CudaGraphDecoder)  # the ops without the CUDA-only constructor checks
    decoder.model, decoder.prefill_chunk = model, 5
    tokens = torch.randint(0, model.args.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    reference_cache, cache = model.new_cache(1, 32), model.new_cache(1, 32)
    reference = model.forward(tokens, reference_cache, last_only=True)[0, -1]
    with torch.inference_mode():
        for start in range(0, 12, decoder.prefill_chunk):
            x = decoder._prefill_chunk(tokens[:, start:start + decoder.prefill_chunk], cache)
        logits = model.lm_head(model.norm(x[:, -1:])).float().view(-1)
    torch.testing.assert_close(logits, reference, rtol=1e-4, atol=1e-4)

    token = int(reference.argmax())
    reference = model.forward(torch.tensor([[token]]), reference_cache)[0, -1]
    decoder.token, decoder.position = torch.tensor([[token]]), torch.tensor([cache.length])
    decoder.slots = torch.arange(cache.max_len)
    with torch.inference_mode():
        logits = decoder._step_ops(cache)
    torch.testing.assert_close(logits, reference, rtol=1e-4, atol=1e-4)
