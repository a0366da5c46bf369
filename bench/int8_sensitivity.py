"""How much the CPU engine's int8 activations amplify float noise: the first greedy token after a prompt
of a trimtab-quantized model, with the embedding's output multiplied by (1 + eps·N(0, 1)), through the
CPU's default kernels (activations quantized to int8 per 32-row block) and through its float32-activation
kernels. A float32-rounding-sized eps (1e-7) stands for what differs between two hosts' float ops
(another torch, another SIMD width); where the int8 path's first token moves at that size, two machines
can decode different greedy tokens from one model and prompt (issue 8's GPU-against-CPU comparison).

    python bench/int8_sensitivity.py [--model bench/peers/smollm2_q3] [--seeds 5]

With each path's perplexity on ../shared/data/text/wiki.utf8, which says how flat the model's logits are.

Writes bench/results/int8_sensitivity.json and the `int8_sensitivity` section of BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from report import markdown_table, write_section  # noqa: E402

PROMPT = "The three primary colours are"
EPSILONS = (0.0, 1e-7, 1e-6, 1e-5)
TEXT = BENCH.parents[1] / "shared" / "data" / "text" / "wiki.utf8"
WINDOWS = 6  # of 512 tokens: the perplexity that says how flat the model's logits are


def use_float32_activations(model) -> None:
    """The CPU path with float32 activations everywhere: every packed linear and the fused decoder (its
    default quantizes activations to int8 per block). Also bench/gpu_bench.py's greedy comparison."""
    from trimtab.backend.fused_decode import FusedDecoder
    from trimtab.backend.quant.kernels import CpuPackedLinear

    linears = [model.lm_head] + [linear for layer in model.layers
                                 for linear in (*vars(layer.self_attn).values(), *vars(layer.mlp).values())]
    for linear in linears:
        if isinstance(linear, CpuPackedLinear):
            linear.kernel = "fp32"
    model.fused_decoder = FusedDecoder.build(model, kernel="fp32")


def first_tokens(model, ids: list[int], eps: float, seeds: int) -> list[dict]:
    """The first greedy token, its top-2 margin and the largest logit change, per seed of the noise."""
    import torch

    def logits_with(noise) -> torch.Tensor:
        embed = model.embed
        model.embed = lambda tokens: noise(embed(tokens))
        try:
            cache = model.new_cache(1, len(ids) + 1)
            return model.forward(torch.tensor([ids]), cache, last_only=True)[0, -1]
        finally:
            model.embed = embed

    clean = logits_with(lambda x: x)
    results = []
    for seed in range(seeds if eps else 1):
        g = torch.Generator().manual_seed(seed)
        logits = logits_with(lambda x: x * (1 + eps * torch.randn(x.shape, generator=g)))
        top = torch.topk(logits, 2)
        results.append({"token": int(top.indices[0]), "margin": float(top.values[0] - top.values[1]),
                        "largest_logit_change": float((logits - clean).abs().max())})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=BENCH / "peers" / "smollm2_q3",
                        help="a trimtab-quantized model dir (bench/make_device_kit.sh writes the default)")
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args()
    if not (args.model / "config.json").is_file():
        sys.exit(f"int8_sensitivity: {args.model} is not a model dir; `bash bench/make_device_kit.sh` writes "
                 "bench/peers/smollm2_q3, or pass --model")
    import trimtab

    loaded = trimtab.load(str(args.model), device="cpu")
    ids = loaded.tokenizer.encode(PROMPT)
    model = loaded.transformer
    from trimtab.backend.evaluate import evaluation_tokens, perplexity

    text_ids = evaluation_tokens(loaded, TEXT.read_text(), 512 * WINDOWS)
    runs, perplexities = {}, {}
    for path in ("int8 activations (default)", "float32 activations"):
        if path.startswith("float32"):
            use_float32_activations(model)
        runs[path] = {str(eps): first_tokens(model, ids, eps, args.seeds) for eps in EPSILONS}
        perplexities[path] = perplexity(loaded, text_ids, 512)
        print(path, f"perplexity {perplexities[path]:.1f}", json.dumps(runs[path]), flush=True)
    results = {"model": args.model.name, "prompt": PROMPT, "seeds": args.seeds, "runs": runs,
               "perplexity": perplexities, "perplexity_text": f"{TEXT.name}, {WINDOWS} windows of 512 tokens"}
    (BENCH / "results").mkdir(exist_ok=True)
    (BENCH / "results" / "int8_sensitivity.json").write_text(json.dumps(results, indent=1))
    rows = []
    for path, by_eps in runs.items():
        for eps, seeds in by_eps.items():
            tokens = sorted({s["token"] for s in seeds})
            rows.append([path, eps, ", ".join(map(str, tokens)),
                         f"{min(s['margin'] for s in seeds):.3f}-{max(s['margin'] for s in seeds):.3f}",
                         f"{max(s['largest_logit_change'] for s in seeds):.3g}"])
    write_section("int8_sensitivity", (
        f"`{args.model.name}` on the CPU, prompt \"{PROMPT}\": the first greedy token with the embedding's output "
        f"multiplied by (1 + eps·N(0, 1)), {args.seeds} noise seeds per eps (eps 0: once). 1e-7 is the size of one "
        "float32 rounding, what two hosts' float ops (another torch, another SIMD width) differ by. How flat the "
        f"model's logits are: its perplexity on {TEXT.name} ({WINDOWS} windows of 512 tokens) is "
        + " and ".join(f"{v:,.1f} with {k}" for k, v in perplexities.items())
        + " (a 135M-parameter model at 3 bits, rounded to nearest: near-ties everywhere).\n\n"
        + markdown_table(["CPU kernels", "eps", "first tokens", "top-2 margin", "largest logit change"], rows)))


if __name__ == "__main__":
    main()
