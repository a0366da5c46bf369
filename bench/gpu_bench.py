"""GPU benchmark of the quantized engine (issue 8), in one run on the GPU machine:

1. builds the CUDA kernels (backend/cuda_ops.py) and checks every kernel against the reference
   dequantiser (format.dequantize) on fresh random layers: every width, mixed widths in one matrix,
   ragged groups, act-order, float16 and bfloat16, GEMV batches 1-8 and the dequantize + cuBLAS path;
   outputs poisoned with NaN first; relative error ‖y − ref‖ / ‖ref‖;
2. times, with the same method for every engine (CUDA events around a CUDA graph of 100 calls
   rotating over 8 weight copies so that L2 cannot help; median of 5): device copy bandwidth,
   trimtab's GEMV at 4.0 bpw, ExLlamaV2's 4-bit gemm_half_q_half (its PyPI wheel, JIT-built here)
   and fp16 cuBLAS on Llama-3-8B's four shapes;
3. decode tokens/s (a CUDA graph per step, context 1024) and prefill of 1024 tokens for a
   Llama-3-8B-shaped model with random 4.0-bpw weights (backend/cuda_decode.py), against fp16 with
   CUDA graphs and against ExLlamaV2 end to end (its harness in bench/peers/, own process);
4. greedy tokens of the GPU path against the CPU path on a quantized default model;
5. sampled decode: the same model decoding as trimtab's generation loop does for every reply that is
   not greedy, with the default preset's sampler on the GPU (`--parts sampled`).

    python bench/gpu_bench.py [--parts check,gemv,groups,exl2kernel,decode,moe,sampled,exllamav2,greedy] [--quantized DIR]
        → gpu.json under $OUT (the device machine) or bench/results/
    python bench/gpu_bench.py --report bench/results/gpu.json   → BENCHMARKS.md section "gpu"

Shapes are named in×out as the peers' harness names them: 4096x14336 is gate/up (in 4096, out 14336).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import markdown_table, write_section  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PEERS = Path(__file__).resolve().parent / "peers"
SHAPES = {"4096x4096": (4096, 4096), "4096x1024": (4096, 1024), "4096x14336": (4096, 14336),
          "14336x4096": (14336, 4096)}
GROUP = 128
COPIES = 8          # weight copies rotated through in timings (8 × 29 MB > the 50 MB L2)
CALLS_PER_GRAPH = 100
GEMV_CHECK_ROWS = 9  # more than the GEMV's 8: the dequantize + matmul path


# ---- random layers ------------------------------------------------------------------------------

def widths_for_bpw(groups: int, bpw: float, group: int = GROUP) -> list[int]:
    """Group widths mixing 3 and 4 bits so that the layer's bpw (scales, mins and metadata counted)
    is `bpw`: 4-bit groups of 128 cost 4.25 bpw, so 4.0 bpw makes a quarter of them 3-bit."""
    overhead = 32 / group
    three = round(groups * (4 + overhead - bpw))
    return [3 if (g * three) // groups != ((g + 1) * three) // groups else 4 for g in range(groups)]


def random_layer(in_features: int, out_features: int, widths, group_sizes, perm: bool = False, device="cpu"):
    """A canonical QuantizedLinear with random q, W ≈ N(0, 0.02²)-sized, built without quantizing floats."""
    import torch
    from trimtab.backend.quant import format as qformat

    widths, group_sizes = list(widths), list(group_sizes)
    if all(n * b % 32 == 0 for n, b in zip(group_sizes, widths)):  # random words are valid q streams
        rows = sum(qformat.packed_words(n, b) for n, b in zip(group_sizes, widths))
        qweight = torch.randint(-2 ** 31, 2 ** 31, (rows, out_features), dtype=torch.int64, device=device).to(torch.int32)
    else:  # a group's last word has unused bits, which must be zero: pack real q values
        q = torch.cat([torch.randint(0, 2 ** b, (n, out_features)) for n, b in zip(group_sizes, widths)])
        qweight = qformat.pack(q, torch.ones(len(widths), out_features), torch.zeros(len(widths), out_features),
                               widths, group_sizes).qweight.to(device)
    steps = torch.tensor([0.02 * 12 ** 0.5 / 2 ** b for b in widths], device=device)[:, None]
    scales = steps * (0.5 + torch.rand(len(widths), out_features, device=device))
    levels = torch.tensor([2 ** b - 1 for b in widths], device=device)[:, None]
    mins = -scales * levels / 2 * (0.8 + 0.4 * torch.rand(len(widths), out_features, device=device))
    order = torch.randperm(in_features, device=device).to(torch.int32) if perm else None
    return qformat.QuantizedLinear(qweight, scales.half(), mins.half(), torch.tensor(widths, dtype=torch.uint8),
                                   torch.tensor(group_sizes, dtype=torch.int32), order)


def bench_layer(in_features: int, out_features: int, bpw: float, device="cuda"):
    from trimtab.backend.quant.format import split_groups

    sizes = split_groups(in_features, GROUP)
    return random_layer(in_features, out_features, widths_for_bpw(len(sizes), bpw), sizes, device=device)


# ---- 1. correctness -----------------------------------------------------------------------------

def poison_allocator(torch, megabytes: int = 512) -> None:
    """Fill free cached memory with NaN so that an output the kernel fails to write shows."""
    blocks = [torch.full((megabytes << 18,), float("nan"), device="cuda") for _ in range(2)]
    del blocks


def relative_error(torch, y, ref) -> float:
    y, ref = y.double(), ref.double()
    if not torch.isfinite(y).all():
        return float("inf")
    return float((y - ref).norm() / ref.norm().clamp_min(1e-30))


CHECK_CASES = [  # (in, out, widths (cycled over groups), group size, act-order)
    (2048, 512, (4,), 128, False),
    (1024, 1024, (3, 4, 4, 4), 128, False),
    (1000, 333, (2, 3, 4, 5, 6, 8), 128, True),     # ragged last group (104 rows), odd out
    (576, 576, (8, 6, 5, 4, 3, 2), 64, False),
    (1536, 580, (5, 6), 128, True),
    (300, 50, (8, 3, 2), 100, True),                 # groups not a multiple of 32 rows
    (14336, 256, (4,), 128, False),
]
TOLERANCE = {"float16": 4e-3, "bfloat16": 1.2e-2, "float32": 4e-3}


def check_kernels() -> list[dict]:
    import torch
    from trimtab.backend.quant import format as qformat
    from trimtab.backend.quant.cuda_linear import CudaPackedLinear

    rows, failures = [], []
    for in_f, out_f, pattern, group, perm in CHECK_CASES:
        sizes = qformat.split_groups(in_f, group)
        widths = [pattern[g % len(pattern)] for g in range(len(sizes))]
        layer = random_layer(in_f, out_f, widths, sizes, perm)
        bias = torch.randn(out_f) * 0.1
        w_ref = qformat.dequantize(layer).cuda()  # [out, in] float32, the reference (on the CPU)
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            poison_allocator(torch)
            linear = CudaPackedLinear(layer, bias, "cuda", dtype)
            errors = {"dequantize": relative_error(torch, linear.dequantized(torch.float32), w_ref)}
            for batch in (1, 2, 5, 8, 37):
                x = (torch.randn(batch, in_f, device="cuda") * (1 + 3 * torch.rand(in_f, device="cuda"))).to(dtype)
                ref = x.double() @ w_ref.double().t() + bias.cuda().double()
                poison_allocator(torch)
                errors[f"batch {batch}"] = relative_error(torch, linear(x), ref)
            name = f"{in_f}x{out_f} widths {'/'.join(map(str, pattern))} g{group}{' act-order' if perm else ''}"
            worst = max(errors.values())
            ok = worst <= TOLERANCE[str(dtype).split('.')[-1]]
            rows.append({"case": name, "dtype": str(dtype).split(".")[-1], "max_rel_error": worst, "ok": ok,
                         **{k: round(v, 6) for k, v in errors.items()}})
            print(f"check {name} {dtype}: " + ", ".join(f"{k} {v:.2e}" for k, v in errors.items())
                  + ("" if ok else "  FAIL"), flush=True)
            if not ok:
                failures.append(name)
    if failures:
        print(f"KERNEL CHECK FAILED: {failures}", flush=True)
    return rows


# ---- 2. kernel timings --------------------------------------------------------------------------

def time_graph(torch, calls, reps: int = 5) -> float:
    """Median seconds per call of `calls` (a list of closures) captured into one CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for call in calls[:COPIES]:
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / len(calls))
    return sorted(times)[len(times) // 2]


def time_eager(torch, calls, reps: int = 5) -> float:
    """As the peers' harness times: a Python loop of launches between two events (median of 5)."""
    for call in calls[:COPIES]:
        call()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        for call in calls:
            call()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / len(calls))
    return sorted(times)[len(times) // 2]


def copy_bandwidth(torch) -> float:
    a = torch.empty(1 << 30, dtype=torch.half, device="cuda").normal_()
    b = torch.empty_like(a)
    t = time_eager(torch, [lambda: b.copy_(a)] * 20)
    del a, b
    return 2 * (1 << 30) * 2 / t / 1e12


def exllamav2_ext():
    try:
        from exllamav2 import ext as exl_ext
        return exl_ext
    except Exception as exc:  # reported, not fatal: the peer is optional where its wheel is absent
        print(f"exllamav2 unavailable: {exc}", flush=True)
        return None


def exl2_matrix(torch, exl_ext, k: int, n: int, bits: int = 4, gs: int = 128):
    """A random EXL2 matrix as the peers' harness makes it (4-bit, groups of 128)."""
    groups = k // gs
    q_weight = torch.randint(-2 ** 31, 2 ** 31 - 1, (k * bits // 32, n), dtype=torch.int32, device="cuda")
    q_scale = torch.randint(-2 ** 31, 2 ** 31 - 1, (groups, n // 8), dtype=torch.int32, device="cuda")
    q_scale_max = torch.rand(groups, dtype=torch.half, device="cuda") * 0.01 + 0.001
    q_groups = torch.tensor(sum([[bits, g * gs * bits // 32] for g in range(groups)], []), dtype=torch.int16)
    perm = torch.randperm(k, device="cuda").to(torch.int16)
    w = dict(q_weight=q_weight, q_scale=q_scale, q_scale_max=q_scale_max, q_groups=q_groups.cuda(), q_perm=perm,
             q_invperm=torch.argsort(perm.long()).to(torch.int16))
    w["q_group_map"] = exl_ext.exllamav2_ext.make_group_map(q_groups, q_weight.shape[0]).cuda()
    temp_dq = torch.empty(k * n, dtype=torch.half, device="cuda")
    return exl_ext.make_q_matrix(w, temp_dq), w, temp_dq


def gemv_copies(torch, k: int, n: int, bpw: float = 4.0) -> list:
    """COPIES CudaPackedLinears of one in×out shape at `bpw` (random weights, float16 activations)."""
    from trimtab.backend.quant.cuda_linear import CudaPackedLinear

    return [CudaPackedLinear(bench_layer(k, n, bpw), None, "cuda", torch.float16) for _ in range(COPIES)]


def rotating_calls(copies: list, call) -> list:
    """CALLS_PER_GRAPH closures call(copy), over the weight copies in turn so that L2 cannot help."""
    return [lambda i=i: call(copies[i % COPIES]) for i in range(CALLS_PER_GRAPH)]


def rotating_gemv_calls(copies: list, x) -> list:
    """rotating_calls of GEMVs on x: each copy one layer (its own launch) or a list of layers on one
    input (one launch, as the decode step runs them)."""
    from trimtab.backend.quant.cuda_linear import gemv

    return rotating_calls(copies, lambda copy: gemv(copy, x) if isinstance(copy, list) else copy.gemv(x))


def gemv_error_vs_dequantize(torch, linear, x) -> float:
    """The GEMV on x against the dequantize kernel + matmul (itself checked against format.dequantize)."""
    ref = linear.dequantized_matmul(x.expand(GEMV_CHECK_ROWS, x.shape[-1]).contiguous())[:1].float()
    return relative_error(torch, linear.gemv(x).float(), ref)


def time_kernels(results: dict) -> None:
    """Copy bandwidth; trimtab's GEMV (4.0 bpw and all 4-bit) and fp16 cuBLAS on the four shapes."""
    import torch
    from trimtab.backend.quant.cuda_linear import CudaPackedLinear

    results["copy_tbps"] = copy_bandwidth(torch)
    print(f"copy bandwidth {results['copy_tbps']:.3f} TB/s (read + write)", flush=True)
    shapes = results.setdefault("shapes", {})
    for name, (k, n) in SHAPES.items():
        row = shapes.setdefault(name, {})
        x = torch.randn(1, k, dtype=torch.half, device="cuda")
        default_grid = CudaPackedLinear.blocks_per_multiprocessor, CudaPackedLinear.large_blocks_per_multiprocessor
        for label, bpw, grid in (("trimtab", 4.0, default_grid), ("trimtab_4bit", 4.25, default_grid),
                                 ("trimtab_2_blocks_per_sm", 4.0, (2, 2)), ("trimtab_4_blocks_per_sm", 4.0, (4, 4))):
            layers = [bench_layer(k, n, bpw) for _ in range(COPIES)]
            # the GEMV grid (docs/CUDA.md): blocks per multiprocessor for small and for large layers
            CudaPackedLinear.blocks_per_multiprocessor, CudaPackedLinear.large_blocks_per_multiprocessor = grid
            linears = [CudaPackedLinear(layer, None, "cuda", torch.float16) for layer in layers]
            CudaPackedLinear.blocks_per_multiprocessor, CudaPackedLinear.large_blocks_per_multiprocessor = default_grid
            bytes_read = linears[0].words.numel() * 4 + linears[0].scale_min.numel() * 2
            calls = rotating_gemv_calls(linears, x)
            row[f"{label}_us"] = time_graph(torch, calls) * 1e6
            row[f"{label}_eager_us"] = time_eager(torch, calls) * 1e6
            row[f"{label}_bpw"] = layers[0].bits_per_weight()
            row[f"{label}_tbps"] = bytes_read / (row[f"{label}_us"] * 1e-6) / 1e12
            row[f"{label}_rel_error_vs_dequantize"] = gemv_error_vs_dequantize(torch, linears[0], x)
            del layers, linears
        weights = [torch.randn(n, k, dtype=torch.half, device="cuda") * 0.02 for _ in range(COPIES)]
        calls = [lambda i=i: torch.nn.functional.linear(x, weights[i % COPIES]) for i in range(CALLS_PER_GRAPH)]
        row["fp16_us"] = time_graph(torch, calls) * 1e6
        row["fp16_eager_us"] = time_eager(torch, calls) * 1e6
        del weights
        torch.cuda.empty_cache()
        print(f"gemv {name}: " + ", ".join(f"{key} {value:.2f}" for key, value in row.items() if key.endswith("_us")),
              flush=True)


GROUPS = {"q, k, v": [(4096, 4096), (4096, 1024), (4096, 1024)], "gate, up": [(4096, 14336), (4096, 14336)]}


def time_groups(results: dict) -> None:
    """A layer's projections on one input (Llama-3-8B shapes, 4.0 bpw): one GEMV launch each against
    one launch for all (what the decode step runs); and the prefill's dequantize kernel's bandwidth."""
    import torch
    from trimtab.backend.quant.cuda_linear import CudaPackedLinear

    groups = results.setdefault("groups", {})
    for name, shapes in GROUPS.items():
        x = torch.randn(1, shapes[0][0], dtype=torch.half, device="cuda")
        copies = [list(group) for group in zip(*(gemv_copies(torch, k, n) for k, n in shapes))]
        separate = rotating_calls(copies, lambda group: [linear.gemv(x) for linear in group])
        together = rotating_gemv_calls(copies, x)
        groups[name] = {"separate_us": time_graph(torch, separate) * 1e6,
                        "one_launch_us": time_graph(torch, together) * 1e6}
        print(f"gemv group {name}: {groups[name]}", flush=True)
        del copies
    linear = CudaPackedLinear(bench_layer(4096, 14336, 4.0), None, "cuda", torch.float16)
    wt = torch.empty(4096, 14336, dtype=torch.half, device="cuda")
    seconds = time_graph(torch, [lambda: dequantize_into(linear, wt)] * 20)
    moved = wt.numel() * 2 + linear.words.numel() * 4 + linear.scale_min.numel() * 2
    results["dequantize_4096x14336"] = {"us": seconds * 1e6, "tbps": moved / seconds / 1e12}
    print(f"dequantize 4096x14336: {results['dequantize_4096x14336']}", flush=True)


def dequantize_into(linear, wt) -> None:
    from trimtab.backend import cuda_ops

    cuda_ops.qdequantize_t(wt, linear.words, linear.scale_min, linear.meta, linear.xmap, linear.out_features, 0,
                           linear.out_features)


def exllamav2_builds() -> list[Path]:
    """ExLlamaV2's JIT build folders (bench/peers/device_setup.sh starts the build in the background)."""
    return list((Path.home() / ".cache" / "torch_extensions").glob("*/exllamav2_ext"))


def exllamav2_building() -> bool:
    """ExLlamaV2's JIT build runs now (its lock file exists)."""
    return any((b / "lock").exists() for b in exllamav2_builds())


def exllamav2_built() -> bool:
    """ExLlamaV2's JIT build is done: importing it now loads rather than compiles."""
    return any(list(b.glob("*.so")) and not (b / "lock").exists() for b in exllamav2_builds())


def wait_for_exllamav2_build(limit_s: float = 600.0) -> None:
    """Wait while ExLlamaV2's build runs (its lock file exists): a compiler beside the end-to-end parts
    would take the host time their host-bound figures need (a warm machine once measured decode at
    273 instead of 345 tok/s, prefill through torch ops at 11,000 instead of 27,000)."""
    deadline = time.monotonic() + limit_s
    if exllamav2_building():
        print("waiting for ExLlamaV2's JIT build to finish", flush=True)
    while exllamav2_building() and time.monotonic() < deadline:
        time.sleep(5)


def time_exllamav2_kernels(results: dict) -> None:
    import torch

    wait_for_exllamav2_build()
    if not exllamav2_built():
        print("exllamav2 kernels: its JIT build has not finished; not timed in this run", flush=True)
        return
    exl_ext = exllamav2_ext()
    if exl_ext is None:
        return
    for name, (k, n) in SHAPES.items():
        row = results.setdefault("shapes", {}).setdefault(name, {})
        x = torch.randn(1, k, dtype=torch.half, device="cuda")
        mats = [exl2_matrix(torch, exl_ext, k, n) for _ in range(COPIES)]
        c = torch.empty(1, n, dtype=torch.half, device="cuda")
        calls = [lambda i=i: exl_ext.exllamav2_ext.gemm_half_q_half(x, mats[i % COPIES][0], c, False)
                 for i in range(CALLS_PER_GRAPH)]
        row["exllamav2_eager_us"] = time_eager(torch, calls) * 1e6
        try:
            row["exllamav2_us"] = time_graph(torch, calls) * 1e6
        except Exception as exc:
            print(f"exllamav2 in a CUDA graph failed ({exc}); eager timing only", flush=True)
            row["exllamav2_us"] = row["exllamav2_eager_us"]
        del mats
        torch.cuda.empty_cache()
        print(f"exllamav2 gemv {name}: {row['exllamav2_us']:.2f} us (eager {row['exllamav2_eager_us']:.2f})", flush=True)


# ---- 3. end to end ------------------------------------------------------------------------------

LLAMA3_8B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
             "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 8, "vocab_size": 128256, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
             "max_position_embeddings": 8192, "tie_word_embeddings": False}
HEAD_BITS = 6  # as the peers' ExLlamaV2 model: 4.0 bpw body, 6-bit head


def llama3_8b_model(quantized: bool, bpw: float = 4.0):
    """A Llama-3-8B-shaped Transformer on the GPU with random weights: quantized (4.0 bpw body,
    6-bit head, canonical tensors made directly, never by quantizing floats) or float16."""
    import torch
    from trimtab.backend.models import llama
    from trimtab.backend.quant.format import split_groups

    c = LLAMA3_8B
    D, I, kv = c["hidden_size"], c["intermediate_size"], c["num_key_value_heads"] * 128
    shapes = {"self_attn.q_proj": (D, D), "self_attn.k_proj": (kv, D), "self_attn.v_proj": (kv, D),
              "self_attn.o_proj": (D, D), "mlp.gate_proj": (I, D), "mlp.up_proj": (I, D), "mlp.down_proj": (D, I)}
    weights = {"model.embed_tokens.weight": torch.randn(c["vocab_size"], D, device="cuda", dtype=torch.half) * 0.02,
               "model.norm.weight": torch.ones(D, device="cuda", dtype=torch.half)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        weights[p + "input_layernorm.weight"] = torch.ones(D, device="cuda", dtype=torch.half)
        weights[p + "post_attention_layernorm.weight"] = torch.ones(D, device="cuda", dtype=torch.half)
        for name, (out_f, in_f) in shapes.items():
            if quantized:
                weights.update(bench_layer(in_f, out_f, bpw).tensors(p + name))
            else:
                weights[p + name + ".weight"] = torch.randn(out_f, in_f, device="cuda", dtype=torch.half) * 0.02
    if quantized:
        sizes = split_groups(D, GROUP)
        weights.update(random_layer(D, c["vocab_size"], [HEAD_BITS] * len(sizes), sizes, device="cuda").tensors("lm_head"))
    else:
        weights["lm_head.weight"] = torch.randn(c["vocab_size"], D, device="cuda", dtype=torch.half) * 0.02
    model = llama.Model(llama.ModelArgs.from_config(c), weights, dtype=torch.float16, device="cuda")
    del weights
    torch.cuda.empty_cache()
    return model


MIXTRAL_8X7B_LAYERS = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": 4096,
                       "intermediate_size": 14336, "num_hidden_layers": 8, "num_attention_heads": 32,
                       "num_key_value_heads": 8, "vocab_size": 32000, "rms_norm_eps": 1e-5, "rope_theta": 1e6,
                       "max_position_embeddings": 4096, "tie_word_embeddings": False, "num_local_experts": 8,
                       "num_experts_per_tok": 2}


def mixtral_model(bpw: float = 4.0):
    """8 layers of Mixtral-8x7B's shapes (8 experts, top 2) on the GPU, random weights: attention and
    experts quantized at `bpw`, router, embedding and head float16."""
    import torch
    from trimtab.backend.models import mixtral

    c = MIXTRAL_8X7B_LAYERS
    D, I, E, kv = c["hidden_size"], c["intermediate_size"], c["num_local_experts"], c["num_key_value_heads"] * 128
    shapes = {"self_attn.q_proj": (D, D), "self_attn.k_proj": (kv, D), "self_attn.v_proj": (kv, D),
              "self_attn.o_proj": (D, D)}
    for e in range(E):
        shapes.update({f"block_sparse_moe.experts.{e}.w1": (I, D), f"block_sparse_moe.experts.{e}.w3": (I, D),
                       f"block_sparse_moe.experts.{e}.w2": (D, I)})
    weights = {"model.embed_tokens.weight": torch.randn(c["vocab_size"], D, device="cuda", dtype=torch.half) * 0.02,
               "lm_head.weight": torch.randn(c["vocab_size"], D, device="cuda", dtype=torch.half) * 0.02,
               "model.norm.weight": torch.ones(D, device="cuda", dtype=torch.half)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        weights[p + "input_layernorm.weight"] = torch.ones(D, device="cuda", dtype=torch.half)
        weights[p + "post_attention_layernorm.weight"] = torch.ones(D, device="cuda", dtype=torch.half)
        weights[p + "block_sparse_moe.gate.weight"] = torch.randn(E, D, device="cuda", dtype=torch.half) * 0.02
        for name, (out_f, in_f) in shapes.items():
            weights.update(bench_layer(in_f, out_f, bpw).tensors(p + name))
    model = mixtral.Model(mixtral.ModelArgs.from_config(c), weights, dtype=torch.float16, device="cuda")
    del weights
    torch.cuda.empty_cache()
    return model


def time_moe(results: dict, context: int = 512, eager_tokens: int = 8) -> None:
    """Mixtral decode: one CUDA graph a token (experts chosen on the GPU, routed GEMVs) against the
    same model eagerly (experts chosen on the host, op by op), as trimtab ran MoE before."""
    import torch

    model = mixtral_model()
    graph = measure_model(model, context, decode_tokens=32)
    decoder, model.cuda_decoder = model.cuda_decoder, None
    cache = model.new_cache(1, context + eager_tokens + 8)
    model.forward(torch.randint(0, model.args.vocab_size, (1, context), device="cuda"), cache)
    token = 1
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(eager_tokens):
        token = int(model.forward(torch.tensor([[token]], device="cuda"), cache)[0, -1].argmax())
    eager = eager_tokens / (time.perf_counter() - start)
    model.cuda_decoder = decoder
    c = MIXTRAL_8X7B_LAYERS
    results["moe"] = {"card": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"),
                      "layers": c["num_hidden_layers"], "experts": c["num_local_experts"],
                      "top_k": c["num_experts_per_tok"], "context": context,
                      "graph_decode_tok_s": graph["decode_tok_s"], "graph_step_ms": graph["graph_step_ms"],
                      "eager_decode_tok_s": eager}
    print(f"moe: {results['moe']}", flush=True)


def moe_text(r: dict) -> str:
    m = r.get("moe")
    if not m:
        return ""
    return (f"\n\nMixture of experts: {m['layers']} layers of Mixtral-8x7B's shapes ({m['experts']} experts, top "
            f"{m['top_k']}), attention and experts at 4.0 bpw, random weights, batch 1, context {m['context']}, "
            f"measured on the {m['card']} on {m['date']} (`--parts moe`): decode as one CUDA graph a token, the "
            f"experts chosen on the GPU and run by routed GEMVs, {m['graph_decode_tok_s']:.1f} tok/s "
            f"({m['graph_step_ms']:.2f} ms a graph); the same model eagerly (experts chosen on the host, op by "
            f"op) {m['eager_decode_tok_s']:.1f} tok/s.")


def sampled_tok_s(model, context: int, tokens: int, preset: str) -> dict:
    """Decode tok/s of `model` from `context` random tokens for a reply that is not greedy, with the preset's
    sampler on the model's GPU (penalties, DRY and filters over the logits and the token history), as
    Generation runs it (backend/generation.py): `pipelined` is a batch-1 reply's loop
    (CudaGraphDecoder.pipelined_tokens with SamplingOnDevice: the history on the device, each step and its
    sampling queued before the token of the one before is read); `step_by_step` is the loop every other
    reply takes (a batch, or without the graph decoder): the sampler on the step's logits and the history
    copied from the host, the token read, then the next step (model.forward: the graph, its logits cast to
    float32). Each the median of DECODE_ROUNDS rounds of `tokens`, each from `context`."""
    import torch
    from trimtab.backend.generation import SamplingOnDevice, decode_one_token
    from trimtab.backend.presets import load_preset
    from trimtab.backend.sampling import Sampler
    from trimtab.backend.settings import GenerationSettings

    vocab, device = model.args.vocab_size, model.device
    settings = GenerationSettings(**load_preset(preset))
    new_sampler = lambda: Sampler(settings, vocab_size=vocab, eos_token_ids=[], device=device)  # noqa: E731
    history = torch.randint(0, vocab, (1, context + tokens + 1))                        # [1, T] on the host
    mask = torch.ones_like(history, dtype=torch.bool)                                   # [1, T]
    cache = model.new_cache(1, context + tokens + 8)
    first = model.forward(history[:, :context].to(device), cache, last_only=True)[:, -1]  # [1, V] float32
    sampler = new_sampler()
    history[:, context] = sampler(first, history[:, :context].to(device), mask[:, :context].to(device)).cpu()

    def rewind() -> None:
        cache.truncate(context)

    captures = []

    def pipelined(n: int) -> float:  # the clock stops at the last token read; closing drops the step queued past it
        start = time.perf_counter()
        choose = SamplingOnDevice(new_sampler(), history[:, :context + 1], n + 1, 0)
        choose.prepare()   # its graph captured, as a reply's first step does: timed on its own
        torch.cuda.synchronize()
        captures.append(time.perf_counter() - start)
        with closing(model.cuda_decoder.pipelined_tokens(int(history[0, context]), cache, choose)) as stream:
            start = time.perf_counter()
            for _ in zip(range(n), stream):
                pass
            return time.perf_counter() - start

    def step_by_step(n: int) -> float:
        logits = decode_one_token(model, cache, history[0, context:context + 1])         # [1, V]
        start = time.perf_counter()
        for step in range(n):
            length = context + 1 + step
            token = sampler(logits, history[:, :length].to(device), mask[:, :length].to(device)).cpu()  # [1]
            history[:, length] = token
            logits = decode_one_token(model, cache, token)
        return time.perf_counter() - start

    return {"decode_tok_s": median_tok_s(pipelined, tokens, rewind),
            "step_by_step_tok_s": median_tok_s(step_by_step, tokens, rewind),
            "chooser_setup_ms": sorted(captures)[len(captures) // 2] * 1e3}


SAMPLED_PRESET = "balanced"  # the default preset (backend/presets.py DEFAULT_PRESET)


def time_sampled(results: dict, context: int = 1024, tokens: int = 128) -> None:
    import torch

    torch.backends.cuda.enable_cudnn_sdp(False)
    wait_for_exllamav2_build()
    model = llama3_8b_model(True)
    results["sampled"] = {"preset": SAMPLED_PRESET, "context": context, "tokens": tokens,
                          **sampled_tok_s(model, context, tokens, SAMPLED_PRESET)}
    print(f"sampled: {results['sampled']}", flush=True)
    del model
    torch.cuda.empty_cache()


def sampled_text(r: dict) -> str:
    m = r.get("sampled")
    if not m:
        return ""
    by_step = m.get("step_by_step_tok_s")
    setup = m.get("chooser_setup_ms")
    return (f"\n\nSampled decode (`--parts sampled`): the quantized model above decoding a reply that is not "
            f"greedy with the default preset '{m['preset']}' (penalties, DRY and filters as torch ops on the GPU "
            f"over the logits and the token history), context {m['context']}, median of {DECODE_ROUNDS} rounds of "
            f"{m['tokens']} tokens: {m['decode_tok_s']:.1f} tok/s as a batch-1 reply runs (the sampler as one CUDA "
            "graph behind each step, the next step queued before its token is read"
            + (f"; capturing the sampler's graph takes {setup:.1f} ms a reply, before its second token, not "
               "counted in tok/s)" if setup else ")")
            + (f"; {by_step:.1f} tok/s step by step as a batch's loop runs (the host reading each token before "
               "the next step)." if by_step else "."))


DECODE_ROUNDS = 5  # a decode figure is the median of this many rounds


def median_tok_s(run_tokens, tokens: int, rewind, rounds: int = DECODE_ROUNDS) -> float:
    """Tokens per second of run_tokens(tokens), which decodes that many tokens (the host reading each) and
    returns the seconds they took: the median of `rounds`, each after rewind() (untimed) has set the
    sequence back to where the first round started."""
    results = []
    for _ in range(rounds):
        rewind()
        results.append(tokens / run_tokens(tokens))
    return sorted(results)[rounds // 2]


def timed_steps(one_token):
    """run_tokens for median_tok_s from a closure that decodes one token and reads it."""
    def run(tokens: int) -> float:
        start = time.perf_counter()
        for _ in range(tokens):
            one_token()
        return time.perf_counter() - start
    return run


def measure_model(model, context: int, decode_tokens: int = 128, fused: bool = True, cache_slots: int = 0) -> dict:
    """Prefill of `context` tokens (median of 3) and greedy decode tok/s at that context, the host reading
    every token (as ExLlamaV2's test_inference -s measures): one graph replay per token, whose last kernel
    takes the argmax and sets up the next step on the GPU, then the token read; and, as before the graph
    did, the argmax taken by torch on the step's logits and the token written from the host
    (host_argmax_tok_s); each the median of DECODE_ROUNDS rounds of `decode_tokens`, every round from
    `context` tokens (the cache rewound between rounds). decode_tok_s is greedy generation's own loop
    (CudaGraphDecoder.pipelined_tokens: each replay queued before the token of the one before is read);
    step_sync_tok_s replays and reads one token at a time. The cache holds `cache_slots` slots, or just
    enough."""
    import torch
    from trimtab.backend.cuda_decode import CudaGraphDecoder

    decoder = CudaGraphDecoder(model)
    decoder.fused = decoder.fused and fused
    vocab = model.args.vocab_size
    tokens = torch.randint(0, vocab, (1, context), device="cuda")
    prefill = []
    slots = max(cache_slots, context + decode_tokens + 16)
    for _ in range(3):
        cache = model.new_cache(1, slots)
        torch.cuda.synchronize()
        start = time.perf_counter()
        logits = decoder.prefill(tokens, cache)
        torch.cuda.synchronize()
        prefill.append(time.perf_counter() - start)
    cache = model.new_cache(1, slots)
    first = int(decoder.prefill(tokens[:, :context - 1], cache).argmax())
    for _ in range(4):  # capture and warm-up
        decoder.step(first, cache)
    token = first

    def rewind() -> None:  # back to `context` tokens: the prompt and its first token decoded (untimed)
        nonlocal token
        cache.truncate(context - 1)
        token = int(decoder.step(first, cache).argmax())

    def pipelined(tokens: int) -> float:  # the clock stops at the last token read; closing drops the step
        with closing(decoder.pipelined_tokens(token, cache)) as stream:  # queued past it
            start = time.perf_counter()
            for _ in zip(range(tokens), stream):
                pass
            return time.perf_counter() - start

    def greedy_on_gpu() -> None:
        decoder.step(None, cache)
        int(decoder.greedy_token)

    def argmax_on_host() -> None:
        nonlocal token
        token = int(decoder.step(token, cache).argmax())

    decode, step_sync, host_argmax = (median_tok_s(run, decode_tokens, rewind) for run in
                                      (pipelined, timed_steps(greedy_on_gpu), timed_steps(argmax_on_host)))
    # the graph alone (no host sync between steps): what the GPU needs per token
    rewind()
    start_event, end_event = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start_event.record()
    for _ in range(8):
        decoder.graph.replay()
    end_event.record()
    torch.cuda.synchronize()
    graph_ms = start_event.elapsed_time(end_event) / 8
    return {"prefill_tok_s": context / sorted(prefill)[1], "decode_tok_s": decode, "step_sync_tok_s": step_sync,
            "host_argmax_tok_s": host_argmax, "graph_step_ms": graph_ms, "decode_tokens": decode_tokens,
            "decode_rounds": DECODE_ROUNDS}


LONG_CACHE = 32768  # slots of the long cache decode is also timed with


def time_end_to_end(results: dict, context: int = 1024) -> None:
    import torch

    torch.backends.cuda.enable_cudnn_sdp(False)  # its per-call planning costs ~1.35 ms a layer (peers README)
    wait_for_exllamav2_build()  # decode is host-bound in part: no compiler beside it
    decode, prefill = results.setdefault("decode_tok_s", {}), results.setdefault("prefill_1024_tok_s", {})
    notes = results.setdefault("end_to_end", {})
    for quantized in (True, False):
        started = time.perf_counter()
        model = llama3_8b_model(quantized)
        built = time.perf_counter() - started
        for fused in (True, False):  # trimtab's decode kernels, or the same step as torch ops
            label = ("trimtab_4bpw" if quantized else "fp16") + ("" if fused else "_torch_ops")
            figures = measure_model(model, context, fused=fused)
            decode[label], prefill[label] = figures["decode_tok_s"], figures["prefill_tok_s"]
            notes[label] = {**figures, "build_s": built, "gpu_memory_gb": torch.cuda.max_memory_allocated() / 1e9}
            print(f"end to end {label}: {json.dumps(notes[label])}", flush=True)
        if quantized:  # a cache much longer than the context: the attention's grid must not grow with it
            label = f"trimtab_4bpw_cache_{LONG_CACHE}"
            figures = measure_model(model, context, cache_slots=LONG_CACHE)
            decode[label] = figures["decode_tok_s"]
            notes[label] = {**figures, "build_s": built}
            print(f"end to end {label}: {json.dumps(notes[label])}", flush=True)
        del model
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def time_exllamav2_end_to_end(results: dict, work: Path) -> None:
    env = dict(os.environ, OUT=str(work))
    script = PEERS / "exllamav2_decode.py"
    proc = subprocess.run([sys.executable, str(script), str(work / "exl2_model")], env=env, capture_output=True,
                          text=True)
    print(proc.stdout[-2000:], proc.stderr[-2000:], flush=True)
    figures = json.loads((work / "exl2_e2e.json").read_text())
    results.setdefault("decode_tok_s", {})["exllamav2_4bpw"] = figures["exl2_decode_tok_s_ctx1024"]
    results.setdefault("prefill_1024_tok_s", {})["exllamav2_4bpw"] = figures["exl2_prefill_1024_tok_s"]


# ---- 4. greedy tokens, GPU against CPU ----------------------------------------------------------

def greedy_tokens(model, prompt_ids, steps: int):
    import torch

    cache = model.new_cache(1, len(prompt_ids) + steps + 1)
    logits = model.forward(torch.tensor([prompt_ids], device=model.device), cache, last_only=True)[0, -1]
    tokens, margins = [], []
    for _ in range(steps):
        top = torch.topk(logits.float(), 2)
        tokens.append(int(top.indices[0]))
        margins.append(float(top.values[0] - top.values[1]))
        logits = model.forward(torch.tensor([[tokens[-1]]], device=model.device), cache)[0, -1]
    return tokens, margins


def compare_greedy(results: dict, quantized: Path, steps: int = 64) -> None:
    """Greedy tokens of the CPU path (trimtab.load(device="cpu"): float32, the fused C++ decoder)
    against the GPU path, trimtab.load(device="cuda") (prefill op by op, then the CUDA graph decoder)
    in float32, bfloat16 (the default) and float16; with each engine's top-2 logit margin at the
    first difference (a near-tie there explains it)."""
    import torch
    import trimtab

    from int8_sensitivity import PROMPT as prompt, use_float32_activations

    cpu = trimtab.load(str(quantized), device="cpu")
    ids = cpu.tokenizer.encode(prompt)
    cpu_tokens, cpu_margins = greedy_tokens(cpu.transformer, ids, steps)
    greedy = results["greedy"] = {"model": quantized.name, "steps": steps, "cpu_tokens": cpu_tokens}
    model = cpu.transformer
    use_float32_activations(model)
    fp32_tokens, fp32_margins = greedy_tokens(model, ids, steps)
    for dtype in ("float32", "bfloat16", "float16"):
        gpu = trimtab.load(str(quantized), device="cuda", dtype=dtype)
        tokens, margins = greedy_tokens(gpu.transformer, ids, steps)
        del gpu
        same = next((i for i, (a, b) in enumerate(zip(cpu_tokens, tokens)) if a != b), steps)
        same_fp32 = next((i for i, (a, b) in enumerate(zip(fp32_tokens, tokens)) if a != b), steps)
        greedy[f"cuda_{dtype}"] = {
            "equal_tokens": same, "tokens": tokens,
            "cpu_margin_at_first_difference": cpu_margins[same] if same < steps else None,
            "gpu_margin_at_first_difference": margins[same] if same < steps else None,
            "equal_tokens_cpu_fp32": same_fp32,
            "cpu_fp32_margin_at_first_difference": fp32_margins[same_fp32] if same_fp32 < steps else None,
            "gpu_margin_at_first_difference_fp32": margins[same_fp32] if same_fp32 < steps else None}
        print(f"greedy cuda {dtype}: {same_fp32}/{steps} equal to the CPU's with float32 activations; "
              f"{same}/{steps} tokens equal to the CPU's default"
              + (f"; top-2 logit margins there: CPU {cpu_margins[same]:.4f}, GPU {margins[same]:.4f}"
                 if same < steps else ""), flush=True)


# ---- report -------------------------------------------------------------------------------------

def groups_text(r: dict, copy: float) -> str:
    """The projections on one input as one launch, and the dequantize kernel's bandwidth (report)."""
    if "groups" not in r:
        return ""
    rows = [[name, f"{g['separate_us']:.1f}", f"{g['one_launch_us']:.1f}",
             f"{g['separate_us'] / g['one_launch_us']:.2f}×"] for name, g in r["groups"].items()]
    text = ("\n\nA layer's projections reading the same input, 4.0 bpw, Llama-3-8B shapes, µs for the whole group "
            "(timed as above): one GEMV launch per projection against one launch for all (the decode step's way).\n\n"
            + markdown_table(["projections", "one launch each µs", "one launch µs", "speed-up"], rows))
    d = r.get("dequantize_4096x14336")
    if d:
        text += (f"\n\nPrefill's dequantize kernel, 4096x14336 at 4.0 bpw into float16: {d['us']:.1f} µs, "
                 f"{d['tbps']:.2f} TB/s read + written ({d['tbps'] / copy:.0%} of copy).")
    return text


def report(path: Path) -> None:
    r = json.loads(path.read_text())
    copy = r.get("copy_tbps")
    fmt = lambda v, spec=",.0f": format(v, spec) if isinstance(v, (int, float)) else "n/a"  # noqa: E731
    ratio = lambda a, b: f"{a / b:.2f}×" if isinstance(a, (int, float)) and b else "n/a"  # noqa: E731
    rows = []
    for name, s in r.get("shapes", {}).items():
        t, e, f = s.get("trimtab_us"), s.get("exllamav2_us"), s.get("fp16_us")
        rows.append([name, fmt(t, ".1f"), f"{s['trimtab_tbps'] / copy:.0%}", fmt(s.get("trimtab_4bit_us"), ".1f"),
                     fmt(s.get("trimtab_2_blocks_per_sm_us"), ".1f"), fmt(s.get("trimtab_4_blocks_per_sm_us"), ".1f"),
                     fmt(e, ".1f"), ratio(e, t), fmt(f, ".1f"), ratio(f, t)])
    d, p = r.get("decode_tok_s", {}), r.get("prefill_1024_tok_s", {})
    e2e = r.get("end_to_end", {})
    engines = [("trimtab 4.0 bpw, trimtab's decode kernels", "trimtab_4bpw"),
               (f"the same, a cache of {LONG_CACHE:,} slots (context 1024)", f"trimtab_4bpw_cache_{LONG_CACHE}"),
               ("trimtab 4.0 bpw, the same step as torch ops", "trimtab_4bpw_torch_ops"),
               ("fp16 (cuBLAS, trimtab's other decode kernels)", "fp16"),
               ("fp16 (cuBLAS, torch ops)", "fp16_torch_ops"),
               ("ExLlamaV2 0.3.2, 4.0 bpw", "exllamav2_4bpw")]
    engine_rows = [[label, fmt(d.get(key), ".1f"), fmt(e2e.get(key, {}).get("step_sync_tok_s"), ".1f"),
                    fmt(e2e.get(key, {}).get("host_argmax_tok_s"), ".1f"),
                    fmt(e2e.get(key, {}).get("graph_step_ms"), ".2f"), fmt(p.get(key))]
                   for label, key in engines if key in d]
    exl_note = ("ExLlamaV2's kernel and end to end were measured in the same run (its PyPI wheel, JIT-built there)."
                if any("exllamav2_us" in s for s in r.get("shapes", {}).values()) else
                "ExLlamaV2 was not measured in this run (its JIT build had not finished).")
    if r.get("provenance"):  # parts merged from runs of bench/gpu_bench.py --parts (each a list item)
        runs = ("Its figures come from these runs of `bench/gpu_bench.py` on that card: "
                + "; ".join(r["provenance"]) + ".")
    else:
        runs = (f"Every figure below (the mixture of experts' apart, which names its run) was measured on it in one "
                f"run of `bench/gpu_bench.py` on {r.get('date')}.")
    body = (
        f"Card: **{r.get('card')}** (torch {r.get('torch')}). {runs} They are rendered here from "
        "`bench/results/gpu.json` by `bench/gpu_bench.py --report` (the machine line above names where the report "
        f"was rendered, not the card). {exl_note}\n\n"
        f"Copy bandwidth (read + write): {copy:.2f} TB/s. GEMV, batch 1, float16 activations, µs per call, every "
        "engine timed the same way (a CUDA graph of 100 calls rotating over 8 weight copies so that L2 cannot help, "
        "median of 5); shapes in×out. trimtab at 4.0 bpw counts every stored bit (a quarter of the groups 3-bit, "
        "the rest 4-bit, an fp16 scale and min per group of 128 rows and column); '4-bit' is every group 4-bit "
        "(4.25 bpw); trimtab cuts the (column tile, chunk) items into equal blocks, 2 per multiprocessor, or 4 for "
        "layers large enough to give each block 24 items (the large shapes here); the two columns after it cut "
        "every shape into 2 and into 4 blocks per multiprocessor. "
        "'% copy' is the bytes trimtab reads per second over the copy bandwidth.\n\n"
        + markdown_table(["shape", "trimtab 4.0 bpw µs", "% copy", "4-bit µs", "2 blocks/SM µs", "4 blocks/SM µs",
                          "ExLlamaV2 µs", "ExLlamaV2 / trimtab", "fp16 cuBLAS µs", "fp16 / trimtab"], rows)
        + groups_text(r, copy)
        + "\n\nLlama-3-8B shapes (32 layers, hidden 4096, MLP 14336, 8 KV heads, vocab 128256), random weights, "
        "batch 1, float16 activations. Greedy decode at context 1024, the host reading every token as greedy "
        "generation does (`CudaGraphDecoder.pipelined_tokens`, which `trimtab`'s generation loop uses where every "
        "token is the argmax of the logits): one CUDA graph replay per token (`backend/cuda_decode.py`) whose last "
        "kernel takes the argmax and sets up the next step, each replay queued before the token of the one before "
        "is read, the clock stopped at the last token read"
        f"{decode_rounds_text(e2e.get('trimtab_4bpw', {}))}"
        f"{power_cap_text(r.get('power_capped_s', {}).get('decode'))}; 'step + sync' replays one step and "
        "reads its token before the next (the GPU idles while the host reads); 'host argmax' is the "
        "same graph with the argmax taken by torch on its "
        "logits and the token written back from the host (how trimtab measured before the graph took the argmax, "
        "and how ExLlamaV2's harness decodes); 'graph ms' is the graph alone. Prefill: 1024 "
        "tokens in one chunk. trimtab's body at 4.0 bpw, its head 6-bit. 'trimtab's decode kernels': rotary, the KV "
        "write and split attention as one kernel, the splits' merge another, q, k, v one GEMV launch and gate, up "
        "another, the RMSNorms, "
        "residual adds and SiLU·up inside the GEMVs (the o and down GEMVs hand the next norm its statistics); "
        "its prefill runs RMSNorm, rotary + cache write and SiLU·up as "
        "trimtab's kernels too; 'torch ops': the same step and prefill through PyTorch ops (SDPA).\n\n"
        + markdown_table(["engine", "decode tok/s", "step + sync tok/s", "host argmax tok/s", "graph ms / token",
                                 "prefill 1024 tok/s"], engine_rows)
        + moe_text(r) + sampled_text(r)
    )
    if "greedy" in r:
        g = r["greedy"]
        body += (f"\n\nGreedy tokens on `{g['model']}` (the embedded default model converted by trimtab), 64 steps "
                 "after the prompt, `trimtab.load(device=\"cuda\", dtype=...)` against `trimtab.load(device=\"cpu\")`; "
                 "at the first difference, each engine's top-2 logit margin (a near-tie shows as a small margin on "
                 "both sides):\n\n")
        greedy_rows = []
        for dtype in ("float32", "bfloat16", "float16"):
            run = g.get(f"cuda_{dtype}")
            if run:
                for cpu_label, suffix, equal in (("float32 activations", "_fp32", "equal_tokens_cpu_fp32"),
                                                 ("default (int8 activations)", "", "equal_tokens")):
                    if equal not in run:
                        continue
                    differs = run[equal] < g["steps"]
                    cpu_margin = run.get("cpu_fp32_margin_at_first_difference" if suffix else
                                         "cpu_margin_at_first_difference")
                    greedy_rows.append([dtype, cpu_label, f"{run[equal]} of {g['steps']}",
                                        fmt(cpu_margin if differs else None, ".4f"),
                                        fmt(run.get("gpu_margin_at_first_difference" + suffix) if differs else None,
                                            ".4f")])
        body += markdown_table(["GPU dtype", "CPU path", "tokens equal", "CPU margin there", "GPU margin there"],
                               greedy_rows)
    if "checks" in r:
        bad = [c for c in r["checks"] if not c["ok"]]
        worst = max(c["max_rel_error"] for c in r["checks"])
        body += (f"\n\nKernel checks against format.dequantize: {len(r['checks']) - len(bad)} of {len(r['checks'])} "
                 f"cases within tolerance (largest relative error {worst:.1e}).")
    write_section("gpu", body, script="gpu_bench")


def power_capped_seconds() -> float | None:
    """How long the card has run with its clocks lowered by the driver's power cap since boot (nvidia-smi's
    counter), or None where nvidia-smi cannot say: a part during which it grew ran on a slower card."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=clocks_event_reasons_counters.sw_power_cap",
                              "--format=csv,noheader,nounits", "--id=0"], capture_output=True, text=True, timeout=20)
        return float(out.stdout.strip().splitlines()[0]) / 1e6  # µs
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return None


def source_commit() -> str:
    """The commit measured: $TRIMTAB_COMMIT (a copy of the tree without .git), else git's HEAD here."""
    if os.environ.get("TRIMTAB_COMMIT"):
        return os.environ["TRIMTAB_COMMIT"]
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parent)
    return out.stdout.strip() or "unknown"


def power_cap_text(seconds: float | None) -> str:
    if seconds is None:
        return ""
    return f"; the driver's power cap lowered the card's clocks for {seconds:.1f} s of that part"


def decode_rounds_text(figures: dict) -> str:
    if "decode_rounds" not in figures:
        return ""
    return f" (each figure the median of {figures['decode_rounds']} rounds of {figures['decode_tokens']} tokens)"


def merge_runs(paths: list[Path], out: Path) -> None:
    """One gpu.json from runs of `--parts` on one card: dicts merged key by key (a later run's figure wins
    where two runs measured the same), `provenance` naming each run's parts, commit and date."""
    def merged(into: dict, new: dict) -> dict:
        for key, value in new.items():
            into[key] = merged(dict(into[key]), value) if isinstance(value, dict) and isinstance(into.get(key), dict) \
                else value
        return into

    runs = [json.loads(p.read_text()) for p in paths]
    cards = {r.get("card") for r in runs}
    if len(cards) != 1:
        sys.exit(f"gpu_bench --merge: the runs are from different cards ({', '.join(map(str, cards))})")
    result: dict = {}
    for r in runs:
        result = merged(result, r)
    result["provenance"] = [entry for r in runs  # a merged file's own provenance carries over
                            for entry in r.get("provenance") or
                            [f"{', '.join(r.get('parts', ['?']))} at {r.get('commit', '?')} on {r.get('date')}"]]
    for key in ("parts", "commit"):
        result.pop(key, None)
    failed = sorted({part for i, r in enumerate(runs) for part in r.get("failed_parts", [])  # unless run again
                     if not any(part in later.get("parts", []) and part not in later.get("failed_parts", [])
                                for later in runs[i + 1:])})
    if failed:
        result["failed_parts"] = failed
    else:
        result.pop("failed_parts", None)
    out.write_text(json.dumps(result, indent=1))
    print(f"gpu_bench: {len(runs)} runs merged into {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--report", type=Path, help="render BENCHMARKS.md from this gpu.json and stop")
    parser.add_argument("--merge", type=Path, nargs="+", metavar="JSON",
                        help="merge the gpu.json files of runs of --parts on one card into bench/results/gpu.json")
    parser.add_argument("--parts", default="check,gemv,groups,exl2kernel,decode,moe,sampled,exllamav2,greedy")
    parser.add_argument("--quantized", type=Path, default=PEERS / "smollm2_q3",
                        help="a trimtab-quantized dir for the greedy comparison")
    args = parser.parse_args()
    if args.report:
        return report(args.report)
    if args.merge:
        return merge_runs(args.merge, RESULTS / "gpu.json")

    import torch
    from trimtab.backend import cuda_ops

    parts = set(args.parts.split(","))
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {"card": torch.cuda.get_device_name(), "torch": torch.__version__,
               "date": time.strftime("%Y-%m-%d"), "parts": sorted(parts), "commit": source_commit()}

    def save():
        (out_dir / "gpu.json").write_text(json.dumps(results, indent=1))

    started = time.perf_counter()
    cuda_ops.load_extension()
    results["build_s"] = time.perf_counter() - started
    print(f"{results['card']}: kernels ready in {results['build_s']:.0f} s", flush=True)
    steps = [("check", lambda: results.__setitem__("checks", check_kernels())),
             ("gemv", lambda: time_kernels(results)),
             ("groups", lambda: time_groups(results)),
             ("moe", lambda: time_moe(results)),
             ("sampled", lambda: time_sampled(results)),
             ("decode", lambda: time_end_to_end(results)),
             ("greedy", lambda: compare_greedy(results, args.quantized)),
             ("exl2kernel", lambda: time_exllamav2_kernels(results)),
             ("exllamav2", lambda: time_exllamav2_end_to_end(results, Path("/tmp/gpu_bench")))]
    for part, run in steps:
        if part not in parts:
            continue
        capped = power_capped_seconds()
        try:
            run()
        except Exception:  # one part failing must not lose the others' figures
            import traceback
            traceback.print_exc()
            results.setdefault("failed_parts", []).append(part)
        if capped is not None and power_capped_seconds() is not None:
            results.setdefault("power_capped_s", {})[part] = power_capped_seconds() - capped
        save()
    print(json.dumps({k: v for k, v in results.items() if k not in ("checks", "greedy")}, indent=1), flush=True)


if __name__ == "__main__":
    main()
