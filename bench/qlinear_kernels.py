"""Quantized linear kernels (csrc/qlinear*.cpp) against torch's fp32 F.linear, on the embedded
default model's shapes (SmolLM2-135M: hidden 576, intermediate 1536, kv 192, vocab 49152).
Writes its tables into BENCHMARKS.md.

    python bench/qlinear_kernels.py [--threads 2] [--repeats 7]

Decode table (one row of x): per shape and bit width, µs per call and effective GB/s = bytes
of weights read per call / time (torch: fp32 W; trimtab: the packed layer, scales and mins
included). Each engine cycles through enough copies of its weights that they never sit in
the last-level cache, as in a real decode step, where every matrix is read once per token.
Batch table: µs per call for several rows of x, to place the int8 → dequant switch.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import markdown_table, write_section  # noqa: E402

from trimtab.backend import ops  # noqa: E402
from trimtab.backend.quant import format as qformat  # noqa: E402

SHAPES = [(576, 576, "q/o proj"), (576, 192, "k/v proj"), (576, 1536, "gate/up"), (1536, 576, "down"),
          (576, 49152, "head")]
GROUP_SIZE = 128
MIXED = (4, 6, 3, 5, 4, 8, 2, 4, 6, 5, 4, 3)  # cycled over the groups: every width, about 4.5 bits
CONFIGS = {"4-bit": lambda groups: [4] * groups, "6-bit": lambda groups: [6] * groups,
           "mixed": lambda groups: [MIXED[g % len(MIXED)] for g in range(groups)]}
STREAM_BYTES = 96 << 20  # working set per measurement: three times this machine's 32 MiB L3


def random_layer(in_features: int, out_features: int, widths_for) -> qformat.QuantizedLinear:
    """Random q (any bit pattern of the canonical words is a valid q), scales and mins."""
    sizes = qformat.split_groups(in_features, GROUP_SIZE)
    widths = widths_for(len(sizes))
    words = sum(qformat.packed_words(n, b) for n, b in zip(sizes, widths))
    qweight = torch.randint(-2 ** 31, 2 ** 31, (words, out_features), dtype=torch.int64).to(torch.int32)
    scales = (torch.rand(len(sizes), out_features) * 0.01 + 1e-3).half()
    mins = (-torch.rand(len(sizes), out_features) * 0.05).half()
    return qformat.QuantizedLinear(qweight, scales, mins, torch.tensor(widths, dtype=torch.uint8),
                                   torch.tensor(sizes, dtype=torch.int32))


def seconds_per_call(calls, repeats: int) -> float:
    """Median over `repeats` rounds of the mean time of one pass over `calls` (after a warm-up pass)."""
    for call in calls:
        call()
    rounds = []
    inner = max(1, 64 // len(calls))
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            for call in calls:
                call()
        rounds.append((time.perf_counter() - start) / (inner * len(calls)))
    return statistics.median(rounds)


def copies_for(nbytes: int) -> int:
    return max(1, min(64, -(-STREAM_BYTES // nbytes)))


def packed_copies(layer: qformat.QuantizedLinear) -> list[torch.Tensor]:
    packed = ops.qlinear_pack(layer.qweight, layer.scales, layer.mins, layer.group_bits, layer.group_sizes)
    return [packed] + [packed.clone() for _ in range(copies_for(packed.numel()) - 1)]


def qlinear_calls(layer, copies, x, kernel: str):
    return [lambda p=p: ops.qlinear(x, p, layer.group_bits, layer.group_sizes, None, None, layer.out_features, kernel)
            for p in copies]


def decode_rows(repeats: int) -> list[list]:
    rows = []
    x_cache = {}
    for in_f, out_f, name in SHAPES:
        x = x_cache.setdefault(in_f, torch.randn(1, in_f))
        weight = torch.randn(out_f, in_f)
        torch_copies = [weight] + [weight.clone() for _ in range(copies_for(weight.numel() * 4) - 1)]
        torch_s = seconds_per_call([lambda w=w: F.linear(x, w) for w in torch_copies], repeats)
        torch_bytes = weight.numel() * 4
        del torch_copies, weight
        for config, widths_for in CONFIGS.items():
            layer = random_layer(in_f, out_f, widths_for)
            copies = packed_copies(layer)
            nbytes = copies[0].numel()
            times = {kernel: seconds_per_call(qlinear_calls(layer, copies, x, kernel), repeats)
                     for kernel in ("int8", "fp32")}
            bpw = nbytes * 8 / (in_f * out_f)
            rows.append([f"{in_f}→{out_f} ({name})", config, f"{bpw:.2f}",
                         f"{torch_s * 1e6:.1f}", f"{torch_bytes / torch_s / 1e9:.1f}",
                         f"{times['int8'] * 1e6:.1f}", f"{nbytes / times['int8'] / 1e9:.1f}",
                         f"{times['fp32'] * 1e6:.1f}", f"{nbytes / times['fp32'] / 1e9:.1f}",
                         f"{torch_s / times['int8']:.1f}×"])
            print(" | ".join(rows[-1]), flush=True)
    return rows


def call_overheads(repeats: int) -> tuple[float, float]:
    """µs of one call on a tiny layer (32 → 8): torch's F.linear and the qlinear op, all fixed costs."""
    layer = random_layer(32, 8, CONFIGS["4-bit"])
    packed = packed_copies(layer)[:1]
    x, weight = torch.randn(1, 32), torch.randn(8, 32)
    ours = seconds_per_call(qlinear_calls(layer, packed, x, "int8") * 64, repeats)
    theirs = seconds_per_call([lambda: F.linear(x, weight)] * 64, repeats)
    return theirs * 1e6, ours * 1e6


def batch_rows(repeats: int) -> list[list]:
    rows = []
    for in_f, out_f, name in [(576, 1536, "gate/up"), (1536, 576, "down")]:
        layer = random_layer(in_f, out_f, CONFIGS["4-bit"])
        copies = packed_copies(layer)[:1]  # batches reuse each weight many times: cache-resident is fair
        weight = qformat.dequantize(layer)
        for batch in (1, 2, 4, 8, 16, 64, 512):
            x = torch.randn(batch, in_f)
            torch_s = seconds_per_call([lambda: F.linear(x, weight)], repeats)
            times = {kernel: seconds_per_call(qlinear_calls(layer, copies, x, kernel), repeats)
                     for kernel in ("int8", "dequant", "auto")}
            rows.append([f"{in_f}→{out_f} ({name})", batch, f"{torch_s * 1e6:.0f}",
                         f"{times['int8'] * 1e6:.0f}", f"{times['dequant'] * 1e6:.0f}", f"{times['auto'] * 1e6:.0f}"])
            print(" | ".join(str(c) for c in rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ops.load_extension()

    torch_call_us, qlinear_call_us = call_overheads(args.repeats)
    decode = decode_rows(args.repeats)
    batch = batch_rows(args.repeats)
    body = (
        f"Quantized linear kernels vs torch fp32 `F.linear`, {args.threads} threads, random weights in groups of "
        f"{GROUP_SIZE} rows (ragged last group); mixed = widths {', '.join(map(str, MIXED))} cycled over the "
        f"groups. Medians of {args.repeats} rounds.\n\n"
        "**Decode (one row of x).** Each engine cycles through copies of its weights (about "
        f"{STREAM_BYTES >> 20} MiB in all) so that every call reads them from memory, as a decode step does. "
        "GB/s = bytes of weights per call / time (torch: fp32 W; trimtab: the packed layer with its scales and "
        "mins; bpw counts those). int8: activations quantized per 32 rows, integer dot products; fp32: fp32 "
        "activations, weights converted in registers. Speed-up is torch's time over int8's. Times include each "
        f"call's fixed cost from Python, measured on a 32 → 8 layer: {torch_call_us:.1f} µs for `F.linear`, "
        f"{qlinear_call_us:.1f} µs for the `qlinear` op (the fused decoder pays neither).\n\n"
        + markdown_table(["shape", "weights", "bpw", "torch µs", "torch GB/s", "int8 µs", "int8 GB/s",
                          "fp32 µs", "fp32 GB/s", "speed-up"], decode)
        + "\n\n**Batches (4-bit, weights cache-resident).** µs per call for a batch of rows: torch's fp32 matmul "
        "on the dequantized W, the int8 kernel, dequant (fp32 column chunks of W, then torch's matmul) and "
        "`auto`, what `PackedLinear` runs.\n\n"
        + markdown_table(["shape", "rows", "torch fp32 µs", "int8 µs", "dequant µs", "auto µs"], batch)
    )
    write_section("qlinear_kernels", body)
    print(body)


if __name__ == "__main__":
    main()
