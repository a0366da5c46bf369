"""The CUDA kernels (csrc/cuda/, backend/quant/cuda_linear.py) against the reference dequantiser.
Skipped where PyTorch sees no CUDA GPU; the CPU suite never needs one. Only the chunk planning,
which runs on the host, is tested everywhere."""
from __future__ import annotations

import pytest
import torch

from trimtab.backend import cuda_ops
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


def test_row_statistics_are_sums_of_squares_per_128_columns():
    """What a GEMV's RowNorm takes, as the GEMVs write it for their outputs (checked on a GPU below)."""
    from trimtab.backend.quant.cuda_linear import row_statistics, statistics_shape

    x = torch.randn(3, 300)
    stats = row_statistics(x.half())
    assert stats.dtype == torch.float32 and tuple(stats.shape) == statistics_shape(3, 300) == (3, 3)
    for part, (begin, end) in enumerate([(0, 128), (128, 256), (256, 300)]):   # the last part is 44 columns
        torch.testing.assert_close(stats[:, part], x.half().float()[:, begin:end].square().sum(dim=1))


CASES = [  # in, out, widths cycled over groups, group size, act-order
    (256, 128, [4], 128, False),
    (1000, 333, [2, 3, 4, 5, 6, 8], 128, True),
    (576, 580, [8, 6, 5, 4, 3, 2], 64, False),
    (300, 50, [8, 3, 2], 100, True),
]


@needs_cuda
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}-w{''.join(map(str, c[2]))}-g{c[3]}")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
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
    assert error < (1.2e-2 if dtype == torch.bfloat16 else 4e-3)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("batch", [1, 2, 5])
def test_gemv_fuses_gate_and_residual(dtype, batch):
    """y = residual + bias + (silu(gate)·x) Wᵀ in one launch."""
    from trimtab.backend.quant.cuda_linear import CudaPackedLinear

    layer = random_layer(1000, 333, [2, 3, 4, 5, 6, 8], 128, perm=True, seed=batch)
    bias = torch.randn(333)
    linear = CudaPackedLinear(layer, bias, "cuda", dtype)
    x, gate = (torch.randn(batch, 1000, device="cuda").to(dtype) for _ in range(2))
    residual = torch.randn(batch, 333, device="cuda").to(dtype)
    y = linear.gemv(x, gate=gate, residual=residual)
    u = (torch.nn.functional.silu(gate.double()) * x.double())
    ref = residual.double() + u @ qformat.dequantize(layer).cuda().double().t() + bias.cuda().double()
    assert float((y.double() - ref).norm() / ref.norm()) < 4e-3


@needs_cuda
@pytest.mark.parametrize("blocks", [1, 3, 7, 40, 1000])
@pytest.mark.parametrize("batch", [1, 2, 8])
def test_gemv_any_grid(blocks, batch):
    """The GEMV's work cut into about `blocks` runs of (tile, chunk) items (at most a tile's chunks each):
    a block spanning two tiles, a run wrapping round the chunks, tiles shared by many blocks — all give the
    same y, the same bits on every call, and leave the workspace unwritten (every bit set) and the tile
    counters at 0."""
    from trimtab.backend.quant.cuda_linear import CudaPackedLinear, SplitKWorkspace

    layer = random_layer(1000, 700, [2, 3, 4, 5, 6, 8], 128, perm=True, seed=blocks)
    linear = CudaPackedLinear(layer, None, "cuda", torch.float16)
    linear.target_blocks = lambda: blocks
    x = torch.randn(batch, 1000, device="cuda").half()
    residual = torch.randn(batch, 700, device="cuda").half()
    ref = residual.double() + x.double() @ qformat.dequantize(layer).cuda().double().t()
    ys = [linear.gemv(x, residual=residual) for _ in range(2)]  # the second finds the workspace as the first
    assert float((ys[0].double() - ref).norm() / ref.norm()) < 4e-3
    assert torch.equal(ys[0], ys[1])
    workspace, counters = SplitKWorkspace.tensors(linear.device)
    assert bool((workspace.view(torch.int32) == -1).all()) and not bool(counters.any())


@needs_cuda
def test_gemv_of_a_very_large_layer_runs_more_blocks_than_fit_at_once():
    """A layer past max_items_per_block at the large grid (an output head) takes more blocks than the GPU
    holds at once, each at most max_items_per_block items; the waves give the same y."""
    from trimtab.backend.quant.cuda_linear import CudaPackedLinear

    multiprocessors = torch.cuda.get_device_properties(0).multi_processor_count
    one_wave = CudaPackedLinear.large_blocks_per_multiprocessor * multiprocessors
    tiles = CudaPackedLinear.LARGE_LAYER_ITEMS * one_wave // 32 + 1        # × 32 chunks of 1024 inputs
    layer = random_layer(1024, tiles * 128, [4, 6], 128, seed=5)
    linear = CudaPackedLinear(layer, None, "cuda", torch.float16)
    x = torch.randn(1, 1024, device="cuda").half()
    ref = x.double() @ qformat.dequantize(layer).cuda().double().t()
    for items in (10 ** 9, 8):
        linear.max_items_per_block = items
        assert linear.target_blocks() == max(one_wave, -(-tiles * 32 // items))
        y = linear.gemv(x)
        assert float((y.double() - ref).norm() / ref.norm()) < 4e-3


@needs_cuda
@pytest.mark.parametrize("blocks", [1, 4, 264])
@pytest.mark.parametrize("batch", [1, 3, 8])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_gemv_runs_layers_on_one_input_as_one_launch(blocks, batch, dtype):
    """Layers of different widths, sizes, act-orders and biases reading the same x (q, k, v; gate, up)
    as one launch: each output as its own GEMV gives it, whatever the blocks; a gate applies to all."""
    from trimtab.backend.quant.cuda_linear import CudaPackedLinear, gemv, reserve_gemv

    shapes = [(700, [4], 128, False, True), (130, [2, 3, 4, 5, 6, 8], 128, True, False), (333, [8, 3], 64, True, True),
              (128, [5], 100, False, False)]
    layers = [random_layer(1000, out, widths, group, perm, seed=i)
              for i, (out, widths, group, perm, _) in enumerate(shapes)]
    linears = [CudaPackedLinear(layer, torch.randn(layer.out_features) if with_bias else None, "cuda", dtype)
               for layer, (*_, with_bias) in zip(layers, shapes)]
    for linear in linears:
        linear.target_blocks = lambda: blocks
    reserve_gemv(linears)
    x, gate = (torch.randn(batch, 1000, device="cuda").to(dtype) for _ in range(2))
    for count in (2, 4):
        for g in (None, gate):
            ys = gemv(linears[:count], x, gate=g)
            assert len(ys) == count
            for y, linear, layer in zip(ys, linears, layers):
                u = x.double() if g is None else torch.nn.functional.silu(g.double()) * x.double()
                ref = u @ qformat.dequantize(layer).cuda().double().t()
                if linear.bias is not None:
                    ref += linear.bias.double()
                assert y.shape == (batch, layer.out_features)
                assert float((y.double() - ref).norm() / ref.norm()) < 4e-3


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_routed_gemv_runs_the_chosen_experts(dtype):
    """A mixture of experts' GEMV: slot s runs the expert route[s] (read on the GPU) on x's one row or
    on row s, silu(gate)·x given a gate; experts of one shape but their own widths and act-orders."""
    from trimtab.backend.quant.cuda_linear import CudaPackedLinear, routed_gemv

    widths = [[4], [2, 3, 4, 5, 6, 8], [8, 3], [5], [3, 4], [6], [4, 8], [2]]
    layers = [random_layer(1000, 333, w, 128, perm=i % 2 == 1, seed=i) for i, w in enumerate(widths)]
    experts = [CudaPackedLinear(layer, None, "cuda", dtype) for layer in layers]
    refs = [qformat.dequantize(layer).cuda().double() for layer in layers]       # [out, in]
    for chosen in ([5, 2], [0, 7, 3], [6]):
        route = torch.tensor(chosen, device="cuda")
        x = torch.randn(1, 1000, device="cuda").to(dtype)
        y = routed_gemv(experts, x, route)
        assert y.shape == (len(chosen), 333)
        rows, gate = (torch.randn(len(chosen), 1000, device="cuda").to(dtype) for _ in range(2))
        gated = routed_gemv(experts, rows, route, gate=gate)
        for s, e in enumerate(chosen):
            ref = x.double()[0] @ refs[e].t()
            assert float((y[s].double() - ref).norm() / ref.norm()) < 4e-3
            u = torch.nn.functional.silu(gate[s].double()) * rows[s].double()
            ref = u @ refs[e].t()
            assert float((gated[s].double() - ref).norm() / ref.norm()) < 4e-3


def small_mixtral(dtype, experts: int = 4, top_k: int = 2):
    """A 2-layer Mixtral with head_dim 64 (trimtab's decode kernels serve it), quantized experts."""
    from trimtab.backend.models import mixtral

    config = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": 256,
              "intermediate_size": 192, "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 2,
              "head_dim": 64, "vocab_size": 160, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
              "max_position_embeddings": 256, "tie_word_embeddings": False, "num_local_experts": experts,
              "num_experts_per_tok": top_k}
    g = torch.Generator().manual_seed(0)
    weights = {"model.embed_tokens.weight": torch.randn(160, 256, generator=g),
               "lm_head.weight": torch.randn(160, 256, generator=g) * 0.05,
               "model.norm.weight": 1 + 0.1 * torch.randn(256, generator=g)}
    shapes = {"self_attn.q_proj": (512, 256), "self_attn.k_proj": (128, 256), "self_attn.v_proj": (128, 256),
              "self_attn.o_proj": (256, 512)}
    for e in range(experts):
        shapes.update({f"block_sparse_moe.experts.{e}.w1": (192, 256), f"block_sparse_moe.experts.{e}.w3": (192, 256),
                       f"block_sparse_moe.experts.{e}.w2": (256, 192)})
    for i in range(2):
        p = f"model.layers.{i}."
        weights[p + "input_layernorm.weight"] = 1 + 0.1 * torch.randn(256, generator=g)
        weights[p + "post_attention_layernorm.weight"] = 1 + 0.1 * torch.randn(256, generator=g)
        weights[p + "block_sparse_moe.gate.weight"] = torch.randn(experts, 256, generator=g)
        for n, (out_f, in_f) in shapes.items():
            weights.update(random_layer(in_f, out_f, [4, 5] if i else [3, 4], 64, seed=i * 100 + len(n)).tensors(p + n))
    return mixtral.Model(mixtral.ModelArgs.from_config(config), weights, dtype=dtype, device="cuda")


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_moe_graph_step_matches_eager(dtype):
    """A Mixtral decode step as one CUDA graph (experts chosen on the GPU, routed GEMVs) computes what
    the eager model computes (experts chosen on the host, op by op)."""
    model = small_mixtral(dtype)
    assert model.cuda_decoder is not None
    tokens = torch.randint(0, 160, (1, 20), generator=torch.Generator().manual_seed(3)).cuda()
    cache, reference_cache = model.new_cache(1, 48), model.new_cache(1, 48)
    model.forward(tokens, cache)
    decoder, model.cuda_decoder = model.cuda_decoder, None   # the eager path for the reference
    model.forward(tokens, reference_cache)
    model.cuda_decoder = decoder
    token = 7
    tol = 2e-3 if dtype == torch.float32 else 2e-2
    for _ in range(4):
        logits = model.forward(torch.tensor([[token]], device="cuda"), cache)[0, -1]     # the graph
        model.cuda_decoder = None
        reference = model.forward(torch.tensor([[token]], device="cuda"), reference_cache)[0, -1]
        model.cuda_decoder = decoder
        torch.testing.assert_close(logits, reference, rtol=tol, atol=tol)
        token = int(reference.argmax())


def test_graph_decoder_says_which_mixtures_it_cannot_run():
    """A mixture of experts whose experts are not all quantized (here float, on the CPU) is named as
    the reason, before any CUDA kernel is needed; a model neither gated nor MoE is refused too."""
    from types import SimpleNamespace

    from trimtab.backend.cuda_decode import unsupported
    from trimtab.backend.models.base import Linear

    experts = [(Linear(torch.zeros(4, 8)), Linear(torch.zeros(4, 8)), Linear(torch.zeros(8, 4))) for _ in range(3)]
    layer = SimpleNamespace(index=0, mlp=SimpleNamespace(experts=experts, top_k=2), self_attn=None)
    reason = unsupported(SimpleNamespace(layers=[layer]))
    assert "quantized experts of one shape" in reason and "layer 0 has 3 experts" in reason
    plain = SimpleNamespace(layers=[SimpleNamespace(mlp=object())])
    assert "neither gated nor a mixture of experts" in unsupported(plain)
    gated = SimpleNamespace(layers=[SimpleNamespace(mlp=SimpleNamespace(gate_proj=None))])
    assert unsupported(gated) is None


@needs_cuda
def test_gemv_rejects_bad_groups():
    from trimtab.backend.errors import TrimtabError
    from trimtab.backend.quant.cuda_linear import CudaPackedLinear, gemv

    linears = [CudaPackedLinear(random_layer(256, 128, [4], 128, seed=i), None, "cuda", torch.float16)
               for i in range(9)]
    x = torch.randn(1, 256, device="cuda").half()
    with pytest.raises(TrimtabError, match="1 to 8 quantized layers"):
        gemv(linears, x)
    with pytest.raises(TrimtabError, match="single layer"):
        gemv(linears[:2], x, residual=torch.zeros(1, 128, device="cuda").half())
    stats = torch.zeros(1, 2, device="cuda")
    norm = cuda_ops.RowNorm(torch.ones(256, device="cuda").half(), 1e-5, stats)
    with pytest.raises(TrimtabError, match="not both"):
        gemv(linears[:2], x, gate=x, norm=norm)
    with pytest.raises(TrimtabError, match=r"statistics must be a contiguous float32 \[1, 2\]"):
        gemv(linears[:2], x, norm=norm._replace(sumsq=torch.zeros(1, 3, device="cuda")))
    with pytest.raises(TrimtabError, match="weight must be a contiguous"):
        gemv(linears[:2], x, norm=norm._replace(weight=torch.ones(255, device="cuda").half()))
    with pytest.raises(TrimtabError, match="single layer"):
        gemv(linears[:2], x, sumsq=torch.zeros(1, 1, device="cuda"))
    with pytest.raises(TrimtabError, match=r"sumsq must be a contiguous float32 \[1, 1\]"):
        linears[0].gemv(x, sumsq=stats)


@needs_cuda
@pytest.mark.parametrize("blocks", [1, 3, 40])
@pytest.mark.parametrize("batch", [1, 2, 8])
def test_gemv_writes_the_statistics_of_its_output(blocks, batch):
    """sumsq: Σ y² per 128 columns of the stored output (tiles held whole, tiles summed by the last of
    the blocks sharing them, a ragged last tile) — what the next RMSNorm needs."""
    from trimtab.backend.quant.cuda_linear import CudaPackedLinear, row_statistics

    linear = CudaPackedLinear(random_layer(1000, 333, [2, 3, 4, 5, 6, 8], 128, perm=True, seed=blocks), None,
                              "cuda", torch.bfloat16)
    linear.target_blocks = lambda: blocks
    x = torch.randn(batch, 1000, device="cuda").bfloat16()
    residual = torch.randn(batch, 333, device="cuda").bfloat16()
    sumsq = torch.full((batch, 3), float("nan"), device="cuda")
    y = linear.gemv(x, residual=residual, sumsq=sumsq)
    torch.testing.assert_close(sumsq, row_statistics(y), rtol=1e-5, atol=1e-5)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("batch", [1, 3])
def test_gemv_norms_its_input_from_statistics(dtype, batch):
    """gemv(..., norm=RowNorm(weight, eps, stats)) stages HF RMSNorm(x)·weight from x's Σ x² per 128
    columns: as the RMSNorm kernel and then the GEMV, for layers of any widths and act-order."""
    from trimtab.backend.quant.cuda_linear import CudaPackedLinear, RowNorm, gemv, row_statistics

    linears = [CudaPackedLinear(random_layer(1000, out, [2, 3, 4, 5, 6, 8], 128, perm=True, seed=out), None,
                                "cuda", dtype) for out in (333, 130)]
    x = (torch.randn(batch, 1000, device="cuda") * 3).to(dtype)
    weight = (1 + 0.1 * torch.randn(1000, device="cuda")).to(dtype)
    normed = gemv(linears, x, norm=RowNorm(weight, 1e-5, row_statistics(x)))
    for got, want in zip(normed, gemv(linears, cuda_ops.rms_norm(x, weight, 1e-5))):
        assert float((got.double() - want.double()).norm() / want.double().norm()) < 1e-3


def small_llama(quantized: bool, dtype, head_dim: int = 64, window: int | None = None):
    """A 2-layer Llama with head_dim 64 (trimtab's decode kernels serve it) and random weights."""
    from trimtab.backend.models import llama

    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256,
              "intermediate_size": 384, "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 2,
              "head_dim": head_dim, "vocab_size": 160, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
              "max_position_embeddings": 256, "tie_word_embeddings": False, "sliding_window": window}
    g = torch.Generator().manual_seed(0)
    q_dim, kv_dim = 8 * head_dim, 2 * head_dim
    shapes = {"self_attn.q_proj": (q_dim, 256), "self_attn.k_proj": (kv_dim, 256), "self_attn.v_proj": (kv_dim, 256),
              "self_attn.o_proj": (256, q_dim), "mlp.gate_proj": (384, 256), "mlp.up_proj": (384, 256),
              "mlp.down_proj": (256, 384)}
    weights = {"model.embed_tokens.weight": torch.randn(160, 256, generator=g), "lm_head.weight": torch.randn(160, 256, generator=g) * 0.05,
               "model.norm.weight": 1 + 0.1 * torch.randn(256, generator=g)}
    for i in range(2):
        p = f"model.layers.{i}."
        weights[p + "input_layernorm.weight"] = 1 + 0.1 * torch.randn(256, generator=g)
        weights[p + "post_attention_layernorm.weight"] = 1 + 0.1 * torch.randn(256, generator=g)
        for n, (out_f, in_f) in shapes.items():
            if quantized:
                weights.update(random_layer(in_f, out_f, [4, 5], 64, seed=i * 10 + len(n)).tensors(p + n))
            else:
                weights[p + n + ".weight"] = torch.randn(out_f, in_f, generator=g) * in_f ** -0.5
    return llama.Model(llama.ModelArgs.from_config(config), weights, dtype=dtype, device="cuda")


@needs_cuda
@pytest.mark.parametrize("quantized", [True, False], ids=["quantized", "float"])
@pytest.mark.parametrize("head_dim,window", [(64, None), (128, None), (64, 7)])
def test_fused_graph_step_matches_torch_ops(quantized, head_dim, window):
    """The CUDA graph of trimtab's decode kernels computes what the op-by-op step computes."""
    model = small_llama(quantized, torch.float32, head_dim, window)
    decoder = model.cuda_decoder
    assert decoder is not None and decoder.fused
    tokens = torch.randint(0, 160, (1, 40), generator=torch.Generator().manual_seed(1)).cuda()
    cache, reference_cache = model.new_cache(1, 64), model.new_cache(1, 64)
    model.forward(tokens, cache)
    model.forward(tokens, reference_cache)
    from trimtab.backend.cuda_decode import CudaGraphDecoder

    torch_ops = CudaGraphDecoder(model)  # its own token and position: the graph's are the graph's
    torch_ops.slots = torch.arange(64, device="cuda")
    token = 7
    for _ in range(3):
        logits = model.forward(torch.tensor([[token]], device="cuda"), cache)[0, -1]   # the graph
        with torch.inference_mode():
            torch_ops.token = torch.tensor([[token]], device="cuda")
            torch_ops.position = torch.tensor([reference_cache.length], device="cuda")
            reference = torch_ops._torch_step_ops(reference_cache).clone()              # op by op
        reference_cache.advance(1)
        torch.testing.assert_close(logits, reference, rtol=2e-3, atol=2e-3)
        token = int(reference.argmax())


@needs_cuda
def test_greedy_steps_decode_the_previous_argmax():
    """step(None) decodes the previous step's argmax, left on the device by the graph, and computes what
    steps given that token from the host compute; it refuses to start a sequence or follow a prefill."""
    from trimtab.backend.errors import TrimtabError

    model = small_llama(True, torch.float32, 64, None)
    decoder = model.cuda_decoder
    tokens = torch.randint(0, 160, (1, 20), generator=torch.Generator().manual_seed(3)).cuda()
    greedy_cache, host_cache = model.new_cache(1, 64), model.new_cache(1, 64)
    for cache in (greedy_cache, host_cache):
        decoder.prefill(tokens, cache)
    with pytest.raises(TrimtabError, match="needs a step before it"):
        decoder.step(None, greedy_cache)
    greedy, host = [], []
    logits = decoder.step(5, greedy_cache)
    for _ in range(6):
        greedy.append(int(decoder.greedy_token))
        assert greedy[-1] == int(logits.argmax())
        logits = decoder.step(None, greedy_cache).clone()
    logits = decoder.step(5, host_cache)   # a new cache: captured anew, position written from the host
    for _ in range(6):
        host.append(int(logits.argmax()))
        logits = decoder.step(host[-1], host_cache).clone()
    assert greedy == host and greedy_cache.length == host_cache.length == 27
    torch.testing.assert_close(greedy_cache.keys[1][:, :, :27], host_cache.keys[1][:, :, :27])
    decoder.prefill(tokens[:, :3], model.new_cache(1, 8))
    with pytest.raises(TrimtabError, match="needs a step before it"):
        decoder.step(None, host_cache)


@needs_cuda
@pytest.mark.parametrize("fused", [True, False], ids=["trimtab kernels", "torch ops"])
def test_pipelined_tokens_are_the_steps_argmaxes_and_rewind_when_closed(fused):
    """pipelined_tokens (a step queued before the last one's token is read), greedy, yields what step()
    by step() greedy decoding gives; closed early, the cache holds the tokens fed up to the last taken,
    the step queued past it forgotten, and decoding goes on from there; run dry, it stops at a full cache."""
    from contextlib import closing

    model = small_llama(True, torch.float32, 64, None)
    decoder = model.cuda_decoder
    decoder.fused = decoder.fused and fused
    tokens = torch.randint(0, 160, (1, 20), generator=torch.Generator().manual_seed(4)).cuda()
    host_cache, cache = model.new_cache(1, 64), model.new_cache(1, 64)
    for c in (host_cache, cache):
        decoder.prefill(tokens, c)
    host, token = [], 7
    for _ in range(10):
        token = int(decoder.step(token, host_cache).argmax())
        host.append(token)
    with closing(decoder.pipelined_tokens(7, cache)) as stream:
        taken = [t for _, t in zip(range(4), stream)]
    assert taken == host[:4] and cache.length == 24   # 7 and the first 3 taken; the 4th is fed next
    with closing(decoder.pipelined_tokens(taken[-1], cache)) as stream:
        taken += [t for _, t in zip(range(6), stream)]
    assert taken == host and cache.length == 30
    torch.testing.assert_close(cache.keys[1][:, :, :30], host_cache.keys[1][:, :, :30])
    rest = list(decoder.pipelined_tokens(taken[-1], cache))
    assert len(rest) == 64 - 30 and cache.length == 64


@needs_cuda
def test_pipelined_tokens_refuse_nan_logits():
    """A model whose logits are NaN: pipelined_tokens raises the sampler's kind of error, not a token, greedy
    or with the sampler choosing."""
    from trimtab.backend.generation import SamplingOnDevice
    from trimtab.backend.sampling import Sampler
    from trimtab.backend.settings import GenerationSettings

    from trimtab.backend.errors import TrimtabError

    model = small_llama(True, torch.float32, 64, None)
    model.norm.weight.fill_(float("nan"))
    cache = model.new_cache(1, 16)
    model.cuda_decoder.prefill(torch.tensor([[1, 2, 3]], device="cuda"), cache)
    with pytest.raises(TrimtabError, match="logits hold NaN"):
        next(model.cuda_decoder.pipelined_tokens(5, cache))


@needs_cuda
def test_generation_picks_tokens_on_the_gpu_as_the_samplers_loop_would(tmp_path, monkeypatch):
    """Chat takes its tokens after the first from pipelined_tokens: greedy with nothing that changes a logit
    (DRY, on in the default preset, turned off) from the graph's argmax, anything else with the sampler
    choosing behind each step; both reply as the sampler's loop (the GPU path turned off) does."""
    pytest.importorskip("transformers")
    import trimtab
    from tiny_models import write_tiny_model_dir
    from trimtab.backend import generation
    from trimtab.backend.cuda_decode import CudaGraphDecoder

    write_tiny_model_dir("llama", tmp_path)
    model = trimtab.load(tmp_path, device="cuda")
    prompt = [{"role": "user", "content": "w5 w6 w7"}]
    choosers = []
    real = CudaGraphDecoder.pipelined_tokens
    monkeypatch.setattr(CudaGraphDecoder, "pipelined_tokens",
                        lambda self, token, cache, choose=None: choosers.append(choose) or real(self, token, cache, choose))
    kinds = [dict(temperature=0, max_new_tokens=12, dry_multiplier=0),
             dict(temperature=0, max_new_tokens=12, dry_multiplier=0, repetition_penalty=1.1),
             dict(max_new_tokens=24, seed=3),                      # the default preset: sampled, DRY on
             dict(max_new_tokens=24, seed=4, temperature=0.9, top_k=20, min_p=0.05, min_new_tokens=4)]
    fast = [model.chat(prompt, **kind) for kind in kinds]
    assert [c is None for c in choosers] == [True, False, False, False]
    monkeypatch.setattr(generation.Generation, "_pipelined", lambda *a: False)
    for kind, reply in zip(kinds, fast):
        slow = model.chat(prompt, **kind)
        assert reply.token_ids == slow.token_ids and len(reply.token_ids) > 1, kind
        assert reply.text == slow.text and reply.finish_reason == slow.finish_reason
    assert len(choosers) == 4


def _sampler_options(preset: str) -> dict:
    """Seeded sampler settings: a preset's, or "penalties": every penalty and filter at once."""
    if preset == "penalties":
        return dict(temperature=0.8, repetition_penalty=1.2, repetition_penalty_decay=8, presence_penalty=0.3,
                    frequency_penalty=0.1, no_repeat_ngram_size=3, typical_p=0.9, top_k=50, min_p=0.02,
                    dry_multiplier=0.8, logit_bias={3: 2.0}, custom_token_bans=(4,), seed=1)
    from trimtab.backend.presets import load_preset

    return {**load_preset(preset), "seed": 1}


@needs_cuda
@pytest.mark.parametrize("preset", ["balanced", "precise", "creative", "penalties"])
def test_sampler_choose_never_waits_for_the_gpu(preset):
    """Sampler.choose on the GPU reads nothing back (torch's sync debug mode raises on any wait) and picks the
    tokens the call picks from the same draws, with the history right-aligned in a longer window."""
    from trimtab.backend.sampling import Sampler
    from trimtab.backend.settings import GenerationSettings

    V = 1000
    options = _sampler_options(preset)
    gen = torch.Generator().manual_seed(0)
    history = torch.randint(0, 30, (1, 300), generator=gen).cuda()   # a small alphabet: runs for DRY to find
    logits = (torch.randn(1, V, generator=gen) * 4).cuda()
    make = lambda: Sampler(GenerationSettings(**options), vocab_size=V, eos_token_ids=[0], device="cuda")
    waiting, free = make(), make()
    expected = [waiting(logits, history[:, :n]) for n in (100, 200, 300)]
    windows = [torch.cat([torch.full((1, 400 - n), 7, device="cuda"), history[:, :n]], 1) for n in (100, 200, 300)]
    draws, reals = free.uniforms(3).cuda(), [torch.tensor([n], device="cuda") for n in (100, 200, 300)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")   # a copy from the host waits too: every input is made before
    try:
        chosen = [free.choose(logits, window, real, uniform=draws[i:i + 1])
                  for i, (real, window) in enumerate(zip(reals, windows))]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for (tokens, problems), want in zip(chosen, expected):
        assert torch.equal(tokens, want) and problems.tolist() == [0]


@needs_cuda
@pytest.mark.parametrize("preset", ["balanced", "precise", "creative", "penalties"])
def test_sampling_on_device_graph_chooses_as_its_torch_ops_do(preset):
    """SamplingOnDevice's CUDA graph (every sampler step a preset or the penalties use, captured) picks the
    tokens and problems, and leaves the history, that the same choice run as torch ops does."""
    from trimtab.backend.generation import SamplingOnDevice
    from trimtab.backend.sampling import Sampler
    from trimtab.backend.settings import GenerationSettings

    V = 1000
    options = _sampler_options(preset)
    gen = torch.Generator().manual_seed(0)
    history = torch.randint(0, 30, (1, 200), generator=gen)
    graph, ops = (SamplingOnDevice(Sampler(GenerationSettings(**options), vocab_size=V, eos_token_ids=[0],
                                           device="cuda"), history, 8, 3) for _ in range(2))
    for _ in range(6):
        logits = (torch.randn(V, generator=gen) * 4).cuda()
        logits[:: 97] = float("-inf")
        chosen = graph(logits).clone()
        ops.logits.copy_(logits[None])
        assert torch.equal(chosen, ops._choose())
    assert graph.graph is not None and torch.equal(graph.window, ops.window)
    assert graph.length.tolist() == [206] and graph.replied.tolist() == [7]


@needs_cuda
def test_pipelined_tokens_with_the_sampler_choosing_match_step_by_step_and_rewind():
    """pipelined_tokens with SamplingOnDevice yields what step() and the sampler give one token at a time
    (same seed, DRY on); closed, the cache holds the tokens fed up to the last taken."""
    from contextlib import closing

    from trimtab.backend.generation import SamplingOnDevice
    from trimtab.backend.sampling import Sampler
    from trimtab.backend.settings import GenerationSettings

    model = small_llama(True, torch.float32, 64, None)
    decoder, V = model.cuda_decoder, model.args.vocab_size
    settings = GenerationSettings(temperature=1.5, seed=11, dry_multiplier=0.8)
    prompt = torch.randint(0, V, (1, 20), generator=torch.Generator().manual_seed(4))
    host_cache, cache = model.new_cache(1, 64), model.new_cache(1, 64)
    for c in (host_cache, cache):
        decoder.prefill(prompt.cuda(), c)
    sampler = Sampler(settings, vocab_size=V, eos_token_ids=[], device="cuda")
    history, token, host = prompt.tolist()[0] + [7], 7, []
    for _ in range(10):
        logits = decoder.step(token, host_cache)
        token = int(sampler(logits[None].float(), torch.tensor([history], device="cuda"))[0])
        history.append(token)
        host.append(token)
    sampler = Sampler(settings, vocab_size=V, eos_token_ids=[], device="cuda")
    choose = SamplingOnDevice(sampler, torch.tensor([prompt.tolist()[0] + [7]]), max_new_tokens=40, min_new_tokens=0)
    with closing(decoder.pipelined_tokens(7, cache, choose)) as stream:
        taken = [t for _, t in zip(range(10), stream)]
    assert taken == host and cache.length == 30   # 7 and the first 9 taken; the step queued past them forgotten
    torch.testing.assert_close(cache.keys[1][:, :, :30], host_cache.keys[1][:, :, :30])


@needs_cuda
@pytest.mark.parametrize("n", [1, 7, 1000, 128256, 300001])
def test_greedy_next_is_torch_argmax(n):
    """The kernel's argmax against torch.argmax: random logits, a tie for the largest (the first index
    wins), every logit equal, -inf and NaN (which torch ranks above every number); the position is
    advanced by one and the state left zeroed for the next call."""
    from trimtab.backend import cuda_ops

    g = torch.Generator().manual_seed(n)
    state = cuda_ops.new_greedy_state("cuda")
    token, position = torch.full((1, 1), -1, device="cuda"), torch.tensor([41], device="cuda")
    cases = [torch.randn(n, generator=g), torch.zeros(n), torch.full((n,), float("-inf"))]
    tied = torch.randn(n, generator=g)
    tied[n // 3] = tied[n - 1] = tied.max() + 1
    nan = torch.randn(n, generator=g)
    nan[n // 2] = float("nan")   # (torch's bfloat16 of it has the sign bit set: a NaN of either sign is the top)
    calls = 0
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for i, logits in enumerate(cases + [tied, nan]):
            logits = logits.to(dtype).cuda()   # (rounding may tie values: argmax still takes the first)
            cuda_ops.greedy_next(logits, token, position, state)
            calls += 1
            assert int(token) == int(logits.argmax()), f"{dtype}, case {i}"
            assert int(position) == 41 + calls and not state.any(), f"{dtype}, case {i}"
            with_flag = torch.full((2,), -1, device="cuda")   # the argmax, and whether it (so any logit) is NaN
            cuda_ops.greedy_next(logits, with_flag, position, state)
            calls += 1
            assert with_flag.tolist() == [int(logits.argmax()), int(logits.isnan().any())], f"{dtype}, case {i}"


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("head_dim,group,rotary_dim", [(64, 1, 64), (128, 4, 128), (256, 8, 256), (128, 3, 64)])
def test_decode_attention_matches_softmax(dtype, head_dim, group, rotary_dim):
    """The decode attention against rotary_kv, then softmax(q Kᵀ·scale) V over the valid slots:
    positions inside the first split, on split boundaries and at the cache's end, left padding, a
    window, garbage (NaN) in every slot outside the valid range and in the token's own slot (which the
    kernel writes), one workspace for all calls."""
    check_decode_attention(dtype, head_dim, group, rotary_dim, 100,
                           [(0, 0, 0), (5, 2, 0), (31, 0, 0), (32, 0, 0), (63, 10, 0), (99, 0, 0), (70, 0, 9),
                            (64, 40, 30)])


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_decode_attention_loops_over_a_long_cache(dtype):
    """A cache of more splits than a KV head gets blocks: blocks take several splits; positions early
    in it (most blocks idle), late, with padding and a window."""
    check_decode_attention(dtype, 128, 4, 128, 3000, [(40, 0, 0), (2500, 0, 0), (2999, 1000, 0), (2100, 0, 700)])


def check_decode_attention(dtype, head_dim, group, rotary_dim, slots, cases):
    from trimtab.backend import cuda_ops

    kv_heads = 2
    g = torch.Generator().manual_seed(head_dim + group)
    keys = torch.randn(1, kv_heads, slots, head_dim, generator=g).to(dtype).cuda()
    values = torch.randn(1, kv_heads, slots, head_dim, generator=g).to(dtype).cuda()
    q = torch.randn(kv_heads * group * head_dim, generator=g).to(dtype).cuda()
    k, v = (torch.randn(kv_heads * head_dim, generator=g).to(dtype).cuda() for _ in range(2))
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim)).cuda()
    workspace = cuda_ops.new_attention_workspace(kv_heads, slots, head_dim, "cuda")
    scale = head_dim ** -0.5
    for position, first, window in cases:
        lo = max(first, position - window + 1 if window else 0)
        at = torch.tensor([position], device="cuda")
        ref_k, ref_v = keys.clone(), values.clone()
        ref_q = cuda_ops.rotary_kv(q, k, v, ref_k, ref_v, at, inv_freq, 1.0, head_dim, rotary_dim)  # [Hq, 1, hd]
        poisoned_k, poisoned_v = keys.clone(), values.clone()
        for t in (poisoned_k, poisoned_v):
            t[:, :, :lo] = float("nan")
            t[:, :, position:] = float("nan")
        out = cuda_ops.decode_attention(q, k, v, poisoned_k, poisoned_v, at, torch.tensor([first], device="cuda"),
                                        inv_freq, 1.0, rotary_dim, workspace, scale, window)
        msg = f"position {position}, first {first}, window {window}"
        assert torch.equal(poisoned_k[:, :, position], ref_k[:, :, position]), f"{msg}: the key written"
        assert torch.equal(poisoned_v[:, :, position], ref_v[:, :, position]), f"{msg}: the value written"
        kk, vv = ref_k[0, :, lo:position + 1].double(), ref_v[0, :, lo:position + 1].double()  # [H_kv, n, hd]
        qh = ref_q.double().view(kv_heads, group, head_dim)
        ref = torch.softmax(qh @ kk.transpose(1, 2) * scale, dim=-1) @ vv                     # [H_kv, G, hd]
        tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
        torch.testing.assert_close(out.double().view_as(ref), ref, rtol=tol, atol=tol, msg=lambda m: f"{msg}: {m}")


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("window", [None, 7])
def test_prefill_kernels_match_torch_ops(dtype, window):
    """Chunked prefill through trimtab's kernels (RMSNorm, rotary + cache write, silu·up) leaves the
    cache and logits the op-by-op prefill leaves: first chunk and later ones (positions offset)."""
    from trimtab.backend.cuda_decode import CudaGraphDecoder

    model = small_llama(True, dtype, 64, window)
    tokens = torch.randint(0, 160, (1, 40), generator=torch.Generator().manual_seed(2)).cuda()
    results = []
    for fused in (True, False):
        decoder = CudaGraphDecoder(model, prefill_chunk=16)
        decoder.fused = fused
        cache = model.new_cache(1, 64)
        logits = decoder.prefill(tokens, cache)
        results.append((logits, cache.keys[1][:, :, :40].clone(), cache.values[1][:, :, :40].clone()))
    tol = 2e-3 if dtype == torch.float32 else 2e-2
    for got, want in zip(*results):
        torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)


@needs_cuda
@pytest.mark.parametrize("rows,dim", [(1, 4096), (37, 256), (5, 5000), (1, 20000)])
def test_rms_norm_matches_hf(rows, dim):
    """One block a row (1024 threads for one row, 256 for many), rows wider than the registers hold."""
    from trimtab.backend import cuda_ops

    for dtype in (torch.float16, torch.float32):
        x = torch.randn(rows, dim, device="cuda").to(dtype) * 3
        weight = (1 + 0.1 * torch.randn(dim, device="cuda")).to(dtype)
        ref = torch.nn.functional.rms_norm(x.float(), (dim,), eps=1e-5).to(dtype) * weight
        torch.testing.assert_close(cuda_ops.rms_norm(x, weight, 1e-5), ref, rtol=2e-3, atol=2e-3)


@needs_cuda
def test_silu_mul_rounds_as_torch():
    from trimtab.backend import cuda_ops

    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        gate, up = (torch.randn(3, 1001, device="cuda").to(dtype) * 4 for _ in range(2))
        torch.testing.assert_close(cuda_ops.silu_mul(gate, up), torch.nn.functional.silu(gate) * up,
                                   rtol=1e-2 if dtype == torch.bfloat16 else 2e-3, atol=1e-5)


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
    decoder.model, decoder.prefill_chunk, decoder.fused = model, 5, False
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
    decoder.greedy_out, decoder.position = torch.tensor([token, -1]), torch.tensor([cache.length])
    decoder.token = decoder.greedy_out[:1].view(1, 1)
    decoder.slots = torch.arange(cache.max_len)
    position = cache.length
    with torch.inference_mode():
        logits = decoder._step_ops(cache)
    torch.testing.assert_close(logits, reference, rtol=1e-4, atol=1e-4)
    # the step ends by setting up the next one: the argmax as its token, the next slot as its position
    assert int(decoder.token) == int(logits.argmax()) and int(decoder.position) == position + 1
    assert int(decoder.greedy_out[1]) == 0   # not NaN
