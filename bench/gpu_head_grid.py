"""How many blocks the GEMV of a very large layer should take (GPU machine): the Llama-3-8B-shaped
model's output head (4096 → 128,256 at 6 bits, 394 MB, 128,256 (tile, chunk) items) with
`CudaPackedLinear.max_items_per_block` varied — one wave of 4 blocks a multiprocessor (the large-layer
grid, 243 items a block) against more blocks than the GPU holds at once. Timed two ways:

- in the decode step: one CUDA graph a token (bench/gpu_bench.py's model, context 1024), a graph per
  setting, the settings interleaved over rounds, 16 replays a figure;
- standalone: bench/gpu_bench.py's way (a CUDA graph of 100 calls), two copies of the head rotated
  (each is 8× the 50 MB L2).

    python3 bench/gpu_head_grid.py                 → gpu_head_grid.json under $OUT (or bench/results/)
    python bench/gpu_head_grid.py --report bench/results/gpu_head_grid.json → BENCHMARKS.md "gpu_head_grid"
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu_bench as gb  # noqa: E402  (bench/ is not a package)
from report import markdown_table, write_section  # noqa: E402

ONE_WAVE = 10 ** 9          # max_items_per_block that leaves the large-layer grid as it is
SETTINGS = [ONE_WAVE, 120, 80, 60, 40, 30]
CONTEXT = 1024
REPLAYS = 16


def label(items: int) -> str:
    return "one wave" if items == ONE_WAVE else str(items)


def head_blocks(head, items: int) -> int:
    head.max_items_per_block = items
    return head.target_blocks()


def in_decode_step(torch, rounds: int) -> dict:
    """ms a token of the decode graph for each setting of the head's grid (one model, a graph each)."""
    from trimtab.backend.cuda_decode import CudaGraphDecoder

    torch.backends.cuda.enable_cudnn_sdp(False)
    model = gb.llama3_8b_model(True)
    tokens = torch.randint(0, model.args.vocab_size, (1, CONTEXT), device="cuda")
    graphs, blocks = {}, {}
    for items in SETTINGS:  # the launch's grid is fixed when the graph is captured
        blocks[items] = head_blocks(model.lm_head, items)
        decoder = CudaGraphDecoder(model)
        cache = model.new_cache(1, CONTEXT + 64)
        decoder.prefill(tokens, cache)
        decoder.step(0, cache)  # captures
        graphs[items] = decoder
    times = {items: [] for items in SETTINGS}
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(rounds):
        for items, decoder in graphs.items():
            start.record()
            for _ in range(REPLAYS):
                decoder.graph.replay()
            end.record()
            torch.cuda.synchronize()
            times[items].append(start.elapsed_time(end) / REPLAYS)
    del graphs, model
    torch.cuda.empty_cache()
    return {label(i): {"blocks": blocks[i], "graph_ms": times[i]} for i in SETTINGS}


def standalone(torch, rounds: int) -> dict:
    from trimtab.backend.quant.cuda_linear import CudaPackedLinear
    from trimtab.backend.quant.format import split_groups

    k, n = gb.LLAMA3_8B["hidden_size"], gb.LLAMA3_8B["vocab_size"]
    sizes = split_groups(k, gb.GROUP)
    heads = [CudaPackedLinear(gb.random_layer(k, n, [gb.HEAD_BITS] * len(sizes), sizes, device="cuda"), None, "cuda",
                              torch.float16) for _ in range(2)]
    x = torch.randn(1, k, dtype=torch.half, device="cuda")
    times = {items: [] for items in SETTINGS}
    for _ in range(rounds):
        for items in SETTINGS:
            for head in heads:
                head.max_items_per_block = items
            calls = gb.rotating_gemv_calls(heads * (gb.COPIES // len(heads)), x)
            times[items].append(gb.time_graph(torch, calls) * 1e6)
    bytes_read = heads[0].words.numel() * 4 + heads[0].scale_min.numel() * 2
    return {"bytes": bytes_read, "us": {label(i): times[i] for i in SETTINGS}}


def report(path: Path) -> None:
    r = json.loads(path.read_text())
    step, alone = r["decode_step"], r["standalone"]
    rows = []
    for key, figures in step.items():
        us = sorted(alone["us"][key])[len(alone["us"][key]) // 2]
        rows.append([key, figures["blocks"], " / ".join(f"{ms:.3f}" for ms in figures["graph_ms"]),
                     f"{us:.1f}", f"{alone['bytes'] / us / 1e6:.2f}"])
    body = (f"Measured on the {r['card']} on {r['date']} at {r['commit']} by `bench/gpu_head_grid.py`: the "
            "Llama-3-8B-shaped model's output head (4096 → 128,256, 6-bit, "
            f"{alone['bytes'] / 1e6:.0f} MB with scales) with `CudaPackedLinear.max_items_per_block` varied "
            "('one wave': 4 blocks a multiprocessor, 243 items a block). Decode step: one CUDA graph a token "
            f"at context {CONTEXT}, {REPLAYS} replays a figure, the settings interleaved, one figure a round. "
            "Standalone: a CUDA graph of 100 calls over two copies (median of the rounds).\n\n"
            + markdown_table(["items a block", "blocks", "decode graph ms a token (rounds)", "head alone µs",
                              "head alone TB/s"], rows))
    write_section("gpu_head_grid", body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--report", type=Path, help="render BENCHMARKS.md from this JSON and stop")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if args.report:
        return report(args.report)
    import torch

    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else gb.RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {"card": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"), "commit": gb.source_commit(),
               "decode_step": in_decode_step(torch, args.rounds), "standalone": standalone(torch, args.rounds)}
    (out_dir / "gpu_head_grid.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1), flush=True)


if __name__ == "__main__":
    main()
