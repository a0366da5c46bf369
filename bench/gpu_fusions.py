"""What the decode step's fusions cost a GEMV standalone (GPU machine): each projection group and shape
of the step timed plain and with what the step asks of it — RMSNorm staged in (q/k/v, gate/up), silu(gate)
staged in, residual added, Σ y² written (o, down) — the way gpu_bench times (a CUDA graph of 100 calls
rotating over 8 weight copies, 4.0 bpw, float16); then the Llama-3-8B-shaped decode step (context 1024).
How docs/CUDA.md found that the norm's statistics queued behind the weights and what the tile ends cost.

    python3 bench/gpu_fusions.py [--rounds 2] [--no-decode]     # prints one line per case and round
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu_bench as gb  # noqa: E402  (bench/ is not a package)

HIDDEN = 4096


def time_calls(torch, copies, call) -> float:
    """µs per call of call(copy), rotating over the weight copies in one graph."""
    return gb.time_graph(torch, gb.rotating_calls(copies, call)) * 1e6


def groups(torch, rounds: int) -> None:
    """q/k/v and gate/up as one launch: plain, and RMSNorm(x)·weight staged in from x's statistics."""
    from trimtab.backend.quant.cuda_linear import RowNorm, gemv, row_statistics

    x = torch.randn(1, HIDDEN, dtype=torch.half, device="cuda")
    norm = RowNorm((1 + 0.1 * torch.randn(HIDDEN, device="cuda")).half(), 1e-5, row_statistics(x))
    for name, shapes in gb.GROUPS.items():
        copies = [list(group) for group in zip(*(gb.gemv_copies(torch, k, n) for k, n in shapes))]
        for _ in range(rounds):
            plain = time_calls(torch, copies, lambda c: gemv(c, x))
            normed = time_calls(torch, copies, lambda c: gemv(c, x, norm=norm))
            print(f"{name}: plain {plain:.2f} | RMSNorm staged {normed:.2f} µs", flush=True)
        del copies


def outputs(torch, rounds: int) -> None:
    """o (4096x4096) and down (14336x4096): plain, + residual, + Σ y², silu(gate) staged (down), all."""
    residual = torch.randn(1, HIDDEN, dtype=torch.half, device="cuda")
    sumsq = torch.empty(1, HIDDEN // 128, device="cuda")
    for k in (HIDDEN, 14336):
        copies = gb.gemv_copies(torch, k, HIDDEN)
        x, gate = (torch.randn(1, k, dtype=torch.half, device="cuda") for _ in range(2))
        cases = {"plain": {}, "residual": {"residual": residual}, "residual + Σ y²": {"residual": residual,
                                                                                     "sumsq": sumsq}}
        if k > HIDDEN:
            cases |= {"silu(gate)": {"gate": gate}, "all": {"gate": gate, "residual": residual, "sumsq": sumsq}}
        for _ in range(rounds):
            line = " | ".join(f"{label} {time_calls(torch, copies, lambda c, kw=kw: c.gemv(x, **kw)):.2f}"
                              for label, kw in cases.items())
            print(f"{k}x{HIDDEN}: {line} µs", flush=True)
        del copies


def decode(torch, rounds: int) -> None:
    torch.backends.cuda.enable_cudnn_sdp(False)
    model = gb.llama3_8b_model(True)
    for _ in range(rounds):
        f = gb.measure_model(model, 1024, decode_tokens=48)
        print(f"decode: {f['decode_tok_s']:.1f} tok/s, graph {f['graph_step_ms']:.3f} ms", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--no-decode", action="store_true")
    args = parser.parse_args()
    if args.rounds < 1:
        sys.exit("gpu_fusions: --rounds must be at least 1")
    import torch

    if not torch.cuda.is_available():
        sys.exit("gpu_fusions: needs a CUDA GPU")
    print(torch.cuda.get_device_name(), flush=True)
    groups(torch, args.rounds)
    outputs(torch, args.rounds)
    if not args.no_decode:
        decode(torch, args.rounds)


if __name__ == "__main__":
    main()
