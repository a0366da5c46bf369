"""trimtab's CUDA kernels (``csrc/cuda/``), built on first use where torch has CUDA and nvcc is found.

    from trimtab.backend import cuda_ops
    cuda_ops.available()                                    # a CUDA GPU and a CUDA build of torch
    words = cuda_ops.qrepack(qweight, repack, meta, word_rows)                 # canonical → GPU layout
    layer = cuda_ops.GemvLayer(words, scale_min, meta, xmap, bias, out, max_bits)
    y, = cuda_ops.qgemv(x, in_features, [layer], workspace, counters, target_blocks,
                        gate=None, residual=None)              # y = residual + bias + (silu(gate)·x) Wᵀ
    y, = cuda_ops.qgemv(..., norm=RowNorm(weight, eps, stats), sumsq=out_stats)  # RMSNorm(x)·w Wᵀ; Σ y²
    cuda_ops.qdequantize_t(wt, words, scale_min, meta, xmap, out, col_begin, col_end)
    y = cuda_ops.rms_norm(x, weight, eps)                                       # decode and prefill
    u = cuda_ops.silu_mul(gate, up)
    q = cuda_ops.rotary_kv(q, k, v, keys, values, position, inv_freq, scaling, head_dim, rotary_dim)  # [H, S, hd]
    workspace = cuda_ops.new_attention_workspace(kv_heads, slots, head_dim, device)
    out = cuda_ops.decode_attention(q, k, v, keys, values, position, first_slot, inv_freq, scaling, rotary_dim,
                                    workspace, scale, window)                 # one token: rotary + KV write too

The layout and the kernels are described in docs/CUDA.md; backend/quant/cuda_linear.py is their
one user. Building mirrors backend/ops.py: ``torch.utils.cpp_extension.load`` compiles
``csrc/cuda/*.cu`` and ``bindings.cpp`` once (a few minutes) into a cache folder named by a hash
of the sources, flags, GPU architectures, torch and Python; later processes load the library
directly. Machine code is built for sm_90 (H100/H200) and for the GPU present, if different.
Without a CUDA GPU nothing here is built or needed: the CPU engine never imports this module's
library, and tests skip.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.resources
import os
import shutil
import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch

from .errors import TrimtabError
from .ops import OnceBuilt, _build_root, _first_error_line, as_trimtab_error, exclusive_build

__all__ = ["available", "load_extension", "qrepack", "MAX_GEMV_LAYERS", "GemvLayer", "RowNorm", "qgemv",
           "qgemv_workspace", "qgemv_counters", "qdequantize_t", "multiprocessor_count", "rms_norm", "silu_mul",
           "rotary_kv", "decode_attention", "new_attention_workspace", "attention_supported", "greedy_next",
           "new_greedy_state"]



def available() -> bool:
    """A CUDA GPU is visible to a CUDA build of torch (the kernels may still need building)."""
    return torch.cuda.is_available()


def qrepack(qweight, repack, meta, word_rows: int) -> torch.Tensor:
    """canonical qweight [packed_rows, out] → the GPU layout's words [tiles, word_rows, 128]."""
    load_extension()
    with _as_trimtab_error():
        return torch.ops.trimtab_cuda.qrepack(qweight, repack, meta, word_rows)


MAX_GEMV_LAYERS = 8  # layers one GEMV launch runs (qlinear_cuda.h: kMaxGemvLayers)


class GemvLayer(NamedTuple):
    """One quantized layer in the GPU layout, as the GEMV takes it."""
    words: torch.Tensor            # int32 [tiles, word_rows, 128]
    scale_min: torch.Tensor        # half [tiles, groups, 128, 2]
    meta: torch.Tensor             # int32 [chunks, 4]
    xmap: torch.Tensor | None      # int32 [chunks * 32] or None (identity)
    bias: torch.Tensor | None      # float32 [out] or None
    out: int
    max_bits: int                  # the layer's widest chunk


class RowNorm(NamedTuple):
    """An RMSNorm the GEMV applies to x as it stages it (weight · round(x / rms(x)), as HF rounds it),
    from x's statistics as a GEMV given `sumsq` wrote them: the norm costs no kernel of its own."""
    weight: torch.Tensor           # [in], x's dtype
    eps: float
    sumsq: torch.Tensor            # float32 [rows, ceil(in / 128)]: Σ x² per 128 columns


def qgemv(x, in_features: int, layers: list[GemvLayer], workspace, counters, target_blocks: int, gate=None,
          residual=None, route=None, norm: RowNorm | None = None, sumsq=None) -> list[torch.Tensor]:
    """x: [batch <= 8, in] → for each layer [batch, out] in x's dtype (float16, bfloat16 or float32):
    residual + bias + u Wᵀ with u = x, or silu(gate)·x given gate (x's shape). Up to 8 layers on the
    same x run as one launch, about `target_blocks` equal blocks shared out by their sizes; a residual
    only for a single layer. Given route (int64 [slots] of indices into layers, on the device: a
    mixture of experts' choice, layers of one shape): one output [slots, out], row s from layer
    route[s] on x row s (x of `slots` rows) or on x's one row. Given norm (no gate, no route), u is
    RMSNorm(x)·norm.weight; given sumsq (float32 [batch, ceil(out / 128)], one layer), Σ y² of each
    row's outputs per 128 columns is written there: the next norm's statistics."""
    load_extension()
    words, scale_min, meta, xmap, bias, out, max_bits = (list(field) for field in zip(*layers))
    norm_sumsq, norm_weight, eps = (None, None, 0.0) if norm is None else (norm.sumsq, norm.weight, norm.eps)
    with _as_trimtab_error():
        return torch.ops.trimtab_cuda.qgemv(x, in_features, words, scale_min, meta, xmap, bias, out, workspace,
                                            counters, target_blocks, max_bits, gate, residual, route, norm_sumsq,
                                            norm_weight, eps, sumsq)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF RMSNorm over x's last dim (contiguous; weight of x's dtype) in one kernel."""
    load_extension()
    with _as_trimtab_error():
        return torch.ops.trimtab_cuda.rms_norm(x, weight, eps)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate)·up in one kernel, rounded as the two torch ops round it (contiguous, one shape)."""
    load_extension()
    with _as_trimtab_error():
        return torch.ops.trimtab_cuda.silu_mul(gate, up)


def rotary_kv(q, k, v, keys, values, position, inv_freq, scaling: float, head_dim: int, rotary_dim: int):
    """q [..., S, Hq·hd], k, v [..., S, Hkv·hd] of S tokens at positions position + [0, S) (position: a
    device int64 tensor) → rotated q [Hq, S, hd]; rotated k and v written into the cache keys/values
    [1, Hkv, slots, hd] at those slots. Decode: S = 1."""
    load_extension()
    with _as_trimtab_error():
        return torch.ops.trimtab_cuda.rotary_kv(q, k, v, keys, values, position, inv_freq, scaling, head_dim,
                                                rotary_dim)


def decode_attention(q, k, v, keys, values, position, first_slot, inv_freq, rotary_scaling: float, rotary_dim: int,
                     workspace, scale: float, window: int):
    """One decode token, two kernels: q [Hq·hd] and k [Hkv·hd] rotated at `position` (as rotary_kv), k and
    v written into the cache keys/values [1, Hkv, slots, hd] at slot `position`, then attention over
    slots [max(first_slot, position − window + 1), position] (window 0: none) → [Hq·hd] in q's dtype.
    workspace: new_attention_workspace's (the splits' partial results)."""
    load_extension()
    with _as_trimtab_error():
        return torch.ops.trimtab_cuda.decode_attention(q, k, v, keys, values, position, first_slot, inv_freq,
                                                       rotary_scaling, rotary_dim, workspace, scale, window)


def greedy_next(logits: torch.Tensor, token: torch.Tensor, position: torch.Tensor, state: torch.Tensor) -> None:
    """The next decode step's inputs from this step's logits [V] (float16, bfloat16 or float32), on the
    device, in one kernel: token [1] ← the first index of the largest logit (as torch.argmax), or token [2]
    ← that index and 1 where that logit (so some logit) is NaN, else 0; position [1] += 1. state: two int64
    zeros of the kernel's own (new_greedy_state), zeros again after each call."""
    load_extension()
    with _as_trimtab_error():
        torch.ops.trimtab_cuda.greedy_next(logits, token, position, state)


def new_greedy_state(device) -> torch.Tensor:
    return torch.zeros(2, dtype=torch.int64, device=device)


def new_attention_workspace(kv_heads: int, slots: int, head_dim: int, device) -> torch.Tensor:
    """decode_attention's workspace for a cache of `slots` slots: the splits' partial results."""
    load_extension()
    return torch.zeros(torch.ops.trimtab_cuda.attention_workspace(kv_heads, slots, head_dim), device=device)


def attention_supported(head_dim: int, group: int) -> bool:
    load_extension()
    return torch.ops.trimtab_cuda.attention_supported(head_dim, group)


def qgemv_workspace(layers: list[GemvLayer], batch: int, target_blocks: int, slots: int = 0) -> int:
    """float32 elements of workspace a GEMV of these layers needs for `batch` rows, or routed over
    `slots` slots (partial sums of shared tiles)."""
    load_extension()
    return torch.ops.trimtab_cuda.qgemv_workspace(*_shapes(layers), batch, target_blocks, slots)


def multiprocessor_count(on: torch.Tensor) -> int:
    """Streaming multiprocessors of the GPU holding `on`."""
    load_extension()
    return torch.ops.trimtab_cuda.multiprocessor_count(on)


def qgemv_counters(layers: list[GemvLayer], slots: int = 0) -> int:
    load_extension()
    return torch.ops.trimtab_cuda.qgemv_counters(*_shapes(layers), slots)


def _shapes(layers: list[GemvLayer]) -> tuple[list, list, list, list[int]]:
    """What sizes a GEMV's grid: the layers' words, scale_min, meta and out, as lists."""
    return ([la.words for la in layers], [la.scale_min for la in layers], [la.meta for la in layers],
            [la.out for la in layers])


def qdequantize_t(wt, words, scale_min, meta, xmap, out: int, col_begin: int, col_end: int) -> None:
    """Columns [col_begin, col_end) of W, transposed, original row order, into wt [in, >= cols]."""
    load_extension()
    with _as_trimtab_error():
        torch.ops.trimtab_cuda.qdequantize_t(wt, words, scale_min, meta, xmap, out, col_begin, col_end)


def _as_trimtab_error():
    return as_trimtab_error("trimtab_cuda")


def load_extension() -> Path:
    """Build (first use only) and load the CUDA kernels; returns the loaded library's path."""
    return _cuda_kernels()


def _build_and_load() -> Path:
    if not available():
        raise TrimtabError("trimtab's CUDA kernels need a CUDA GPU and a CUDA build of PyTorch; none is visible")
    if shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"):
        raise TrimtabError("trimtab needs nvcc (the CUDA compiler) to build its CUDA kernels: put it on PATH "
                           "or set CUDA_HOME")
    sources = _source_files()
    cuda_flags = ["-O3", *_gencode_flags()]
    name = "trimtab_cuda_" + _build_hash(sources, cuda_flags)
    build_dir = _build_root() / name
    build_dir.mkdir(parents=True, exist_ok=True)
    library = build_dir / f"{name}.so"
    if library.exists() and not (build_dir / "lock").exists():
        try:
            torch.ops.load_library(str(library))
        except (OSError, RuntimeError) as exc:
            raise TrimtabError(f"{library}: cannot load the cached CUDA kernels ({exc}); "
                               f"delete {build_dir} to rebuild them") from exc
        return library
    print("trimtab: compiling the CUDA kernels (first use only, a few minutes)...", file=sys.stderr, flush=True)
    started = time.perf_counter()
    try:
        from torch.utils import cpp_extension

        with exclusive_build(build_dir):
            cpp_extension.load(name=name, sources=[str(s) for s in sources if s.suffix in (".cu", ".cpp")],
                               extra_cflags=["-O3"], extra_cuda_cflags=cuda_flags,
                               build_directory=str(build_dir), is_python_module=False, verbose=False)
    except Exception as exc:
        log = build_dir / "build.log"
        with contextlib.suppress(OSError):
            log.write_text(f"{type(exc).__name__}: {exc}\n")
        raise TrimtabError(f"trimtab could not build its CUDA kernels: "
                           f"{_first_error_line(str(exc)) or type(exc).__name__}; full output: {log}") from exc
    print(f"trimtab: CUDA kernels compiled in {time.perf_counter() - started:.0f} s ({build_dir})",
          file=sys.stderr, flush=True)
    return library


def _source_files() -> list[Path]:
    root = Path(os.fspath(importlib.resources.files("trimtab.csrc"))) / "cuda"
    sources = sorted(p for p in root.iterdir() if p.suffix in (".cu", ".cuh", ".h", ".cpp")) if root.is_dir() else []
    if not any(p.suffix == ".cu" for p in sources):
        raise TrimtabError(f"{root}: no CUDA sources (csrc/cuda/*.cu) found; the trimtab install is incomplete")
    return sources


def _gencode_flags() -> list[str]:
    """sm_90 (H100/H200) always, plus the architecture of each visible GPU."""
    archs = {(9, 0)} | {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
    return [f"-gencode=arch=compute_{a}{b},code=sm_{a}{b}" for a, b in sorted(archs)]


def _build_hash(sources: list[Path], flags: list[str]) -> str:
    digest = hashlib.sha256()
    for part in (torch.__version__, str(torch.version.cuda), sys.implementation.cache_tag, " ".join(flags)):
        digest.update(part.encode() + b"\0")
    for source in sources:
        digest.update(source.name.encode() + b"\0" + source.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


_cuda_kernels = OnceBuilt(_build_and_load)
