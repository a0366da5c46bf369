"""Where the GPU decode's time goes (issue 8's "what the profile says"), in one run on the GPU machine:

1. `ncu` on trimtab's GEMV at 4.0 bpw on the four Llama-3-8B shapes (speed of light: memory and
   compute throughput, achieved occupancy, DRAM bytes, warp stall reasons);
2. one decode step of the Llama-3-8B-shaped model (bench/gpu_bench.py's), op by op under
   torch.profiler: GPU time per kernel kind, kernels per token, and the step's GPU time against the
   CUDA graph's wall time per token; then the graph replayed under the profiler: what each kernel of
   a layer adds to the step's time (the critical path).

    python bench/gpu_profile.py                 → gpu_profile.json under $OUT (or bench/results/)
    python bench/gpu_profile.py --gemv-driver   (what ncu runs: the four GEMVs, a few calls each)
    python bench/gpu_profile.py --report bench/results/gpu_profile.json → BENCHMARKS.md "gpu_profile"
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_bench import SHAPES, bench_layer, llama3_8b_model, measure_model  # noqa: E402
from report import markdown_table, write_section  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
NCU_METRICS = {  # read in base units (--print-units base): ns, bytes, bytes/s
    "duration_ns": "gpu__time_duration.sum",
    "dram_read_bytes": "dram__bytes_read.sum",
    "dram_bytes_per_s": "dram__bytes.sum.per_second",
    "memory_pct": "gpu__compute_memory_throughput.avg.pct_of_peak_sustained_elapsed",
    "dram_pct": "dram__throughput.avg.pct_of_peak_sustained_elapsed",
    "sm_pct": "sm__throughput.avg.pct_of_peak_sustained_elapsed",
    "issue_pct": "sm__inst_issued.avg.pct_of_peak_sustained_active",
    "occupancy_pct": "sm__warps_active.avg.pct_of_peak_sustained_active",
    "registers": "launch__registers_per_thread",
    "blocks": "launch__grid_size",
    "stall_long_scoreboard": "smsp__average_warp_latency_issue_stalled_long_scoreboard.ratio",
    "stall_math_pipe": "smsp__average_warp_latency_issue_stalled_math_pipe_throttle.ratio",
    "stall_wait": "smsp__average_warp_latency_issue_stalled_wait.ratio",
    "stall_barrier": "smsp__average_warp_latency_issue_stalled_barrier.ratio",
    "stall_short_scoreboard": "smsp__average_warp_latency_issue_stalled_short_scoreboard.ratio",
}


def gemv_driver() -> None:
    """The four GEMVs, 3 calls each: ncu profiles the third of each shape."""
    import torch
    from trimtab.backend.quant.cuda_linear import CudaPackedLinear

    for name, (k, n) in SHAPES.items():
        linear = CudaPackedLinear(bench_layer(k, n, 4.0), None, "cuda", torch.float16)
        x = torch.randn(1, k, dtype=torch.half, device="cuda")
        for _ in range(3):
            linear.gemv(x)
        torch.cuda.synchronize()


def decode_driver() -> None:
    """Three decode steps of the Llama-3-8B-shaped model op by op (ncu profiles the third's kernels)."""
    import torch
    from trimtab.backend.cuda_decode import CudaGraphDecoder

    model = llama3_8b_model(True)
    decoder = CudaGraphDecoder(model)
    cache = model.new_cache(1, 1040)
    decoder.prefill(torch.randint(0, 1000, (1, 1024), device="cuda"), cache)
    decoder.step(0, cache)
    with torch.inference_mode():
        for _ in range(3):
            decoder._step_ops(cache)
    torch.cuda.synchronize()


def run_ncu(kernels: str, launch_skip: int, launch_count: int, driver: str) -> list[dict] | dict:
    """ncu's metrics (NCU_METRICS) of `launch_count` launches of the kernels matching `kernels`."""
    ncu = shutil.which("ncu") or next(iter(sorted(Path("/opt/nvidia").glob("nsight-compute/*/ncu"))), None)
    if ncu is None:
        return {"error": "ncu not found"}
    command = [str(ncu), "--kernel-name-base", "demangled", "--kernel-name", f"regex:{kernels}",
               "--launch-skip", str(launch_skip), "--launch-count",
               str(launch_count), "--clock-control", "none", "--print-units", "base", "--metrics", ",".join(NCU_METRICS.values()), "--csv",
               "--page", "raw", sys.executable, __file__, driver]
    proc = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith('"')]
    if proc.returncode or len(lines) < 3:
        return {"error": (proc.stdout + proc.stderr)[-3000:]}
    import csv
    rows = list(csv.reader(lines))
    header, data = rows[0], rows[2:]  # row 1: units
    launches = []
    for row in data:
        record = dict(zip(header, row))
        launches.append({"kernel": record.get("Kernel Name", "")[:60],
                         **{key: _number(record.get(metric, "")) for key, metric in NCU_METRICS.items()}})
    return launches


def ncu_gemv() -> dict:
    launches = run_ncu("qgemv", 0, 12, "--gemv-driver")
    if isinstance(launches, dict):
        return launches
    # 3 calls per shape: keep each shape's third (warm) call
    per_shape = {}
    for index, shape in enumerate(SHAPES):
        if 3 * index + 2 < len(launches):
            per_shape[shape] = launches[3 * index + 2]
    return per_shape


def _number(text: str):
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return text


def profile_decode_step(context: int = 1024) -> dict:
    import torch
    from trimtab.backend.cuda_decode import CudaGraphDecoder
    from torch.profiler import ProfilerActivity, profile

    torch.backends.cuda.enable_cudnn_sdp(False)
    model = llama3_8b_model(True)
    figures = measure_model(model, context, decode_tokens=16)
    decoder = CudaGraphDecoder(model)
    cache = model.new_cache(1, context + 8)
    decoder.prefill(torch.randint(0, 1000, (1, context), device="cuda"), cache)
    decoder.step(0, cache)  # captures the graph: the step's device tensors exist from here
    with torch.inference_mode():
        for _ in range(2):
            decoder._step_ops(cache)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            decoder._step_ops(cache)
            torch.cuda.synchronize()
        eager = _kernels(prof)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:  # the graph's kernels, back to back
            decoder.graph.replay()
            torch.cuda.synchronize()
        replayed = _kernels(prof)
    kinds: dict[str, dict] = {}
    for name, start_us, end_us in eager:
        entry = kinds.setdefault(_kernel_kind(name), {"us": 0.0, "launches": 0})
        entry["us"] += end_us - start_us
        entry["launches"] += 1
    return {"graph_step_ms": figures["graph_step_ms"], "decode_tok_s": figures["decode_tok_s"],
            "kernel_us_per_token": sum(k["us"] for k in kinds.values()), "kernels_per_token": len(eager),
            "kinds": dict(sorted(kinds.items(), key=lambda item: -item[1]["us"])),
            "graph_layer": _layer_critical_path(replayed, model.args.num_hidden_layers)}


def _kernels(prof) -> list[tuple[str, float, float]]:
    """The profiled GPU kernels (name, start µs, end µs) in start order."""
    import torch

    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return sorted(((e.name, e.time_range.start, e.time_range.end) for e in events), key=lambda k: k[1])


def _layer_critical_path(kernels: list[tuple[str, float, float]], layers: int) -> dict:
    """What each kernel of a layer adds to the graph's time: end − the previous kernel's end (kernels
    overlap under dependent launch, so durations overcount), averaged over the layers. A layer is
    the kernels from its q/k/v GEMV (the last GEMV before its attention) to the next layer's."""
    attention = [i for i, (name, _, _) in enumerate(kernels) if "decode_attention" in name]
    if len(attention) != layers or layers < 3:
        return {"error": f"{len(kernels)} kernels, {len(attention)} attention kernels for {layers} layers"}
    starts = [max((i for i in range(a) if "qgemv" in kernels[i][0]), default=-1) for a in attention]
    if min(starts) < 0:
        return {"error": "an attention kernel with no GEMV before it: "
                         + "; ".join(f"{name[:50]} {start:.0f}-{end:.0f}" for name, start, end in kernels[:8])}
    period = starts[1] - starts[0]
    roles: list[dict] = []
    for layer_start in starts[1:-1]:  # whole layers with one before and after
        for k in range(period):
            name, start, end = kernels[layer_start + k]
            before = kernels[layer_start + k - 1][2]
            if len(roles) <= k:
                roles.append({"kind": _kernel_kind(name), "added_us": 0.0, "duration_us": 0.0, "layers": 0})
            roles[k]["added_us"] += end - before
            roles[k]["duration_us"] += end - start
            roles[k]["layers"] += 1
    for role in roles:
        role["added_us"] /= role["layers"]
        role["duration_us"] /= role["layers"]
    return {"step_us": kernels[-1][2] - kernels[0][1], "kernels": len(kernels), "roles": roles}


# a layer of the fused decode step (backend/cuda_decode.py), as kernel names and as what each does
FUSED_LAYER_KERNELS = ["qgemv", "decode_attention", "attention_merge", "qgemv", "qgemv", "qgemv"]
FUSED_LAYER = ["GEMV q, k, v (RMSNorm inside)", "attention (rotary, KV write, split attention)", "attention's merge",
               "GEMV o (+ residual, Σ x²)", "GEMV gate, up (RMSNorm inside)",
               "GEMV down (silu(gate)·up, + residual, Σ x²)"]


def _kernel_kind(name: str) -> str:
    for pattern, kind in (("qgemv", "trimtab GEMV"), ("decode_attention", "attention + rotary + KV write (trimtab)"),
                          ("attention_merge", "attention's merge (trimtab)"),
                          ("fmha|attention|flash|efficient", "attention (SDPA)"), ("rotary_kv", "rotary + KV write"),
                          ("rms|norm", "RMSNorm"), ("index_copy|indexing|scatter", "KV cache write"),
                          ("silu|mul|add|sub|cat|copy|roll|cos|sin|fill|where|compare|bitwise|elementwise",
                           "elementwise (rotary, SiLU, residual, casts, mask)"),
                          ("gemm|gemv|cutlass|sm90", "cuBLAS")):
        if re.search(pattern, name, re.IGNORECASE):
            return kind
    return "other: " + name[:60]


def report(path: Path) -> None:
    r = json.loads(path.read_text())
    body = f"Card: **{r.get('card')}**, {r.get('date')}; rendered from `{path.name}` by `bench/gpu_profile.py --report`.\n\n"
    gemv = r.get("ncu_gemv", {})
    if "error" not in gemv and gemv:
        rows = []
        for shape, m in gemv.items():
            rows.append([shape, f"{m['duration_ns'] / 1e3:.1f}", f"{m['dram_bytes_per_s'] / 1e12:.2f}",
                         f"{m['dram_pct']:.0f}%", f"{m['sm_pct']:.0f}%", f"{m['issue_pct']:.0f}%",
                         f"{m['occupancy_pct']:.0f}%", f"{m['registers']:.0f}", f"{m['blocks']:.0f}",
                         f"{m['stall_long_scoreboard']:.1f}", f"{m['stall_math_pipe']:.1f}", f"{m['stall_wait']:.1f}",
                         f"{m['stall_barrier']:.1f}"])
        body += ("`ncu` on trimtab's GEMV, 4.0 bpw, batch 1 (one warm call each, L2 not flushed, `--clock-control "
                 "none`). Stalls: ncu's `smsp__average_warp_latency_issue_stalled_*` by reason, comparable within a "
                 "row (memory: waiting on a global load; fixed latency: on an arithmetic result; barrier: at "
                 "`__syncthreads`).\n\n"
                 + markdown_table(["shape", "µs", "DRAM TB/s", "DRAM % peak", "SM % peak", "issue % active",
                                   "occupancy %", "registers", "blocks", "stall: memory", "stall: math pipe",
                                   "stall: fixed latency", "stall: barrier"], rows) + "\n\n")
    elif gemv:
        body += f"ncu did not run: {gemv['error'][:300]}\n\n"
    decode = r.get("ncu_decode", {})
    if decode and "error" not in decode:
        rows = [[kind, f"{m['duration_ns'] / 1e3:.1f}", f"{m['dram_bytes_per_s'] / 1e12:.2f}", f"{m['sm_pct']:.0f}%",
                 f"{m['occupancy_pct']:.0f}%", f"{m['registers']:.0f}", f"{m['blocks']:.0f}",
                 f"{m['stall_long_scoreboard']:.1f}", f"{m['stall_wait']:.1f}", f"{m['stall_barrier']:.1f}",
                 f"{m['stall_short_scoreboard']:.1f}"] for kind, m in decode.items()]
        body += ("`ncu` on the decode step's other kernels (Llama-3-8B shapes, context 1024, one launch each):\n\n"
                 + markdown_table(["kernel", "µs", "DRAM TB/s", "SM % peak", "occupancy %", "registers", "blocks",
                                   "stall: memory", "stall: fixed latency", "stall: barrier",
                                   "stall: shared memory"], rows) + "\n\n")
    step = r.get("decode_step")
    if step:
        rows = [[kind, f"{v['us']:.0f}", str(v["launches"]), f"{v['us'] / step['kernel_us_per_token']:.0%}"]
                for kind, v in step["kinds"].items()]
        body += (f"One decode step of the Llama-3-8B-shaped model at 4.0 bpw, context 1024, op by op under "
                 f"torch.profiler: {step['kernels_per_token']} kernels, {step['kernel_us_per_token'] / 1e3:.2f} ms "
                 f"of kernel time; the same step as a CUDA graph takes {step['graph_step_ms']:.2f} ms a token "
                 f"({step['decode_tok_s']:.0f} tok/s with argmax and host sync).\n\n"
                 + markdown_table(["kernels", "µs per token", "launches", "share"], rows) + "\n")
        layer = step.get("graph_layer", {})
        if layer.get("roles"):
            kinds = [role["kind"] for role in layer["roles"]]
            names = FUSED_LAYER if [_kernel_kind(name) for name in FUSED_LAYER_KERNELS] == kinds else kinds
            rows = [[f"{k + 1}", name, f"{role['added_us']:.1f}", f"{role['duration_us']:.1f}"]
                    for k, (name, role) in enumerate(zip(names, layer["roles"]))]
            body += (f"\nThe same step replayed as the CUDA graph ({layer['kernels']} kernels, "
                     f"{layer['step_us'] / 1e3:.2f} ms first start to last end under the profiler): what each "
                     f"kernel of a layer adds to the step (its end minus the previous kernel's end; kernels "
                     f"overlap under dependent launch), averaged over the middle layers.\n\n"
                     + markdown_table(["", "kernel of the layer", "µs added", "µs start to end"], rows) + "\n")
    write_section("gpu_profile", body, script="gpu_profile")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gemv-driver", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--decode-driver", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--report", type=Path)
    parser.add_argument("--parts", default="ncu_gemv,ncu_decode,decode")
    args = parser.parse_args()
    if args.gemv_driver:
        return gemv_driver()
    if args.decode_driver:
        return decode_driver()
    if args.report:
        return report(args.report)
    import time

    import torch
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else RESULTS
    results = {"card": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d")}
    parts = set(args.parts.split(","))  # ncu_gemv, ncu_decode, decode
    if "ncu_gemv" in parts:
        results["ncu_gemv"] = ncu_gemv()
        print(json.dumps(results["ncu_gemv"], indent=1)[:4000], flush=True)
    if "ncu_decode" in parts:  # the decode step's other kernels: the last launch of each in the last step
        launches = run_ncu("trimtab_cuda.*(decode_attention|attention_merge|rms_norm)", 0, 1000,
                           "--decode-driver")
        if isinstance(launches, list):
            launches = {kind: next(l for l in reversed(launches) if kind in l["kernel"])
                        for kind in ("decode_attention", "attention_merge", "rms_norm")
                        if any(kind in l["kernel"] for l in launches)}
        results["ncu_decode"] = launches
        print(json.dumps(results["ncu_decode"], indent=1)[:3000], flush=True)
    if "decode" in parts:
        results["decode_step"] = profile_decode_step()
        print(json.dumps(results["decode_step"], indent=1), flush=True)
    (out_dir / "gpu_profile.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
