"""The decode step's L2 prefetch (docs/CUDA.md), swept on the GPU machine: how many bytes of the next GEMV
launch's weights each GEMV sends to L2 for the next, and how many of the o GEMV's the attention's merge
sends instead of the q/k/v GEMV. One Llama-3-8B-shaped model at 4.0 bpw (gpu_bench's), context 1024; every setting is
captured anew and timed in interleaved rounds (the graph alone, as gpu_bench's graph_step_ms, and decode
with argmax and a host sync per token), the cache rewound to the same context before each.

    python3 bench/gpu_l2_prefetch.py [--settings 0:0,8:0,0:9] [--rounds 3]

writes $OUT/gpu_l2_prefetch.json (or bench/results/); `--report FILE` renders BENCHMARKS.md's section.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import gpu_bench as gb  # noqa: E402  (bench/ is not a package)
from report import markdown_table, write_section  # noqa: E402

RESULTS = BENCH / "results"
CONTEXT = 1024


def time_setting(decoder, cache, token: int, base: int, replays: int = 20, steps: int = 32) -> dict:
    """Graph ms a token (replays back to back) and decode tok/s (argmax + host sync a token) at `base`."""
    import torch

    cache.length = base
    decoder.cache = None  # captured anew with this setting
    token = int(decoder.step(token, cache).argmax())
    cache.length = base
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    decoder.graph.replay()
    start.record()
    for _ in range(replays):
        decoder.graph.replay()
    end.record()
    torch.cuda.synchronize()
    graph_ms = start.elapsed_time(end) / replays
    cache.length = base
    started = time.perf_counter()
    for _ in range(steps):
        token = int(decoder.step(token, cache).argmax())
    tok_s = steps / (time.perf_counter() - started)
    cache.length = base
    return {"graph_ms": graph_ms, "decode_tok_s": tok_s}


def sweep(settings: list[tuple[float, float]], rounds: int) -> dict:
    import torch
    from trimtab.backend.cuda_decode import CudaGraphDecoder

    torch.backends.cuda.enable_cudnn_sdp(False)
    model = gb.llama3_8b_model(True)
    decoder = CudaGraphDecoder(model)
    cache = model.new_cache(1, CONTEXT + 64)
    tokens = torch.randint(0, model.args.vocab_size, (1, CONTEXT), device="cuda")
    token = int(decoder.prefill(tokens, cache).argmax())
    base = cache.length
    runs: dict[str, list[dict]] = {}
    for _ in range(rounds):
        for gemv_mb, o_mb in settings:
            decoder.l2_prefetch_bytes, decoder.o_prefetch_bytes = int(gemv_mb * (1 << 20)), int(o_mb * (1 << 20))
            label = f"GEMVs {gemv_mb:g} MB, merge {o_mb:g} MB"
            runs.setdefault(label, []).append(time_setting(decoder, cache, token, base))
            print(label, runs[label][-1], flush=True)
    return {label: {"graph_ms": statistics.median(r["graph_ms"] for r in rs),
                    "decode_tok_s": statistics.median(r["decode_tok_s"] for r in rs), "rounds": rs}
            for label, rs in runs.items()}


def report_text(r: dict) -> str:
    intro = (f"Decode step of a Llama-3-8B-shaped model at 4.0 bpw, context {r['context']}, on {r['card']} "
             f"({r['date']}, commit {r['commit']}): bytes of the next GEMV launch's weights each kernel sends "
             "to L2, median of interleaved rounds.")
    rows = [[label, f"{f['graph_ms']:.3f}", f"{f['decode_tok_s']:.1f}"] for label, f in r["settings"].items()]
    return intro + "\n\n" + markdown_table(["L2 prefetch", "graph ms a token", "decode tok/s (argmax + sync a token)"],
                                           rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", default="0:0,8:0,0:9",
                        help="GEMV:MERGE pairs: MB each GEMV sends for the next, MB the merge sends for the o GEMV")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--commit", default=os.environ.get("TRIMTAB_COMMIT", "unknown"))
    parser.add_argument("--report", type=Path, help="render BENCHMARKS.md from this JSON and stop")
    args = parser.parse_args()
    if args.report:
        write_section("gpu_l2_prefetch", report_text(json.loads(args.report.read_text())))
        return
    import torch

    try:
        settings = [tuple(float(mb) for mb in pair.split(":")) for pair in args.settings.split(",")]
    except ValueError:
        sys.exit(f"gpu_l2_prefetch: --settings takes GEMV:MERGE pairs of MB, got {args.settings!r}")
    if any(len(pair) != 2 or min(pair) < 0 for pair in settings):
        sys.exit(f"gpu_l2_prefetch: --settings takes GEMV:MERGE pairs of MB >= 0, got {args.settings!r}")
    result = {"card": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"), "commit": args.commit,
              "context": CONTEXT, "settings": sweep(settings, args.rounds)}
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu_l2_prefetch.json").write_text(json.dumps(result, indent=1))
    print(report_text(result))


if __name__ == "__main__":
    main()
