"""Tensor-parallel decode on GPUs (issue 9): a Llama-3-70B-shaped model with random weights at
4.0 bpw (6-bit head), split over the processes torchrun starts, decoded one CUDA graph replay per
token (backend/cuda_decode.py, NCCL all-reduces inside the graph). One process is the baseline:
the 70B shape at 4.0 bpw fits one 80 GB GPU.

    torchrun --nproc-per-node N bench/tp_gpu.py [--layers 80] [--context 512]   (on the GPU machine)
        → tp_gpu_N.json under $OUT (or bench/results/); rank 0 prints the figures
    python bench/tp_gpu.py --report bench/results   → BENCHMARKS.md section "tp_gpu" from every tp_gpu_*.json

Weights are made layer by layer as the model asks for them (a lazy mapping, the same on every rank:
each tensor seeded by its name), so no rank ever holds the whole float or canonical model.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import zlib
from collections.abc import Mapping
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import markdown_table, write_section  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
LLAMA3_70B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8192,
              "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64,
              "num_key_value_heads": 8, "vocab_size": 128256, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
              "max_position_embeddings": 8192, "tie_word_embeddings": False}
BPW, HEAD_BITS = 4.0, 6


class RandomQuantizedWeights(Mapping):
    """name → tensor of a random quantized Llama checkpoint, made on first use (one layer cached)."""

    def __init__(self, config: dict):
        self.config = config
        D, I, kv = config["hidden_size"], config["intermediate_size"], config["num_key_value_heads"] * 128
        self.linears = {"self_attn.q_proj": (D, D), "self_attn.k_proj": (kv, D), "self_attn.v_proj": (kv, D),
                        "self_attn.o_proj": (D, D), "mlp.gate_proj": (I, D), "mlp.up_proj": (I, D),
                        "mlp.down_proj": (D, I)}
        from gpu_bench import bench_layer

        suffixes = [key[1:] for key in bench_layer(64, 4, BPW, device="cpu").tensors("")]  # a linear's tensors
        self.names = {"model.embed_tokens.weight": None, "model.norm.weight": None}  # name → its linear, if any
        self._cache: dict[str, dict] = {}
        linears = [f"model.layers.{i}.{name}" for i in range(config["num_hidden_layers"]) for name in self.linears]
        for i in range(config["num_hidden_layers"]):
            self.names[f"model.layers.{i}.input_layernorm.weight"] = None
            self.names[f"model.layers.{i}.post_attention_layernorm.weight"] = None
        for prefix in linears + ["lm_head"]:
            self.names.update({f"{prefix}.{suffix}": prefix for suffix in suffixes})

    def _layer(self, prefix: str) -> dict:
        import torch
        from gpu_bench import bench_layer, random_layer
        from trimtab.backend.quant.format import split_groups

        if prefix not in self._cache:
            self._cache.clear()  # one linear at a time
            torch.manual_seed(zlib.crc32(prefix.encode()))
            D = self.config["hidden_size"]
            if prefix == "lm_head":
                sizes = split_groups(D, 128)
                layer = random_layer(D, self.config["vocab_size"], [HEAD_BITS] * len(sizes), sizes, device="cuda")
            else:
                out_f, in_f = self.linears[prefix.split(".", 3)[3]]
                layer = bench_layer(in_f, out_f, BPW, device="cuda")
            self._cache[prefix] = layer.tensors(prefix)
        return self._cache[prefix]

    def __getitem__(self, name: str):
        import torch

        if name not in self.names:
            raise KeyError(name)
        prefix = self.names[name]
        if prefix is not None:
            return self._layer(prefix)[name]
        torch.manual_seed(zlib.crc32(name.encode()))
        if name == "model.embed_tokens.weight":
            return torch.randn(self.config["vocab_size"], self.config["hidden_size"], device="cuda",
                               dtype=torch.half) * 0.02
        return 1 + 0.05 * torch.randn(self.config["hidden_size"], device="cuda", dtype=torch.half)

    def __contains__(self, name) -> bool:  # without making the tensor
        return name in self.names

    def __iter__(self):
        return iter(self.names)

    def __len__(self):
        return len(self.names)


def run(layers: int, context: int, decode_tokens: int) -> dict:
    import torch
    from gpu_bench import measure_model
    from trimtab.backend.models import llama
    from trimtab.backend.tensor_parallel import SINGLE, TensorParallel

    torch.backends.cuda.enable_cudnn_sdp(False)
    world = int(os.environ.get("WORLD_SIZE", 1))
    tp = TensorParallel.from_environment(torch.device("cuda"), world) if world > 1 else SINGLE
    config = dict(LLAMA3_70B, num_hidden_layers=layers)
    started = time.perf_counter()
    model = llama.Model(llama.ModelArgs.from_config(config), RandomQuantizedWeights(config), dtype=torch.float16,
                        device="cuda", tp=tp)
    built = time.perf_counter() - started
    figures = measure_model(model, context, decode_tokens)
    # every rank's logits for one fixed step: the same on every rank, and the same as one GPU's
    cache = model.new_cache(1, 64)
    tokens = torch.arange(1, 33, device="cuda")[None]
    logits = model.forward(tokens, cache, last_only=True)[0, -1]
    logits = model.forward(torch.tensor([[int(logits.argmax())]], device="cuda"), cache)[0, -1]
    return {"gpus": world, "card": torch.cuda.get_device_name(), "layers": layers, "context": context,
            "decode_tok_s": figures["decode_tok_s"], "graph_step_ms": figures["graph_step_ms"],
            "prefill_tok_s": figures["prefill_tok_s"], "build_s": built,
            "gpu_memory_gb": torch.cuda.max_memory_allocated() / 1e9,
            "logits_head": logits[:8].float().tolist(), "logits_norm": float(logits.float().norm()),
            "date": time.strftime("%Y-%m-%d")}


def report(folder: Path) -> None:
    runs = sorted((json.loads(p.read_text()) for p in folder.glob("tp_gpu_*.json")), key=lambda r: r["gpus"])
    base = next((r for r in runs if r["gpus"] == 1), None)
    rows = []
    for r in runs:
        rows.append([str(r["gpus"]), f"{r['decode_tok_s']:.1f}", f"{r['graph_step_ms']:.2f}",
                     f"{r['decode_tok_s'] / base['decode_tok_s']:.2f}×" if base else "n/a",
                     f"{r['prefill_tok_s']:,.0f}", f"{r['gpu_memory_gb']:.1f}",
                     f"{abs(r['logits_norm'] - base['logits_norm']) / base['logits_norm']:.1e}" if base else "n/a"])
    first = runs[0]
    missing = [n for n in (2, 4, 8) if n not in {r["gpus"] for r in runs}]
    body = (f"Card: **{first['card']}**, {first['date']}; `torchrun --nproc-per-node N bench/tp_gpu.py` for each N, "
            f"rendered by `bench/tp_gpu.py --report`. Llama-3-70B shapes (hidden 8192, MLP 28672, 64 heads, 8 KV "
            f"heads, vocab 128256), {first['layers']} layers, random weights at {BPW} bpw with a {HEAD_BITS}-bit "
            f"head, float16 activations, batch 1; decode at context {first['context']}, one CUDA graph replay per "
            "token on every rank (NCCL all-reduces inside the graph), argmax and a host sync per token. 'logits vs 1 "
            "GPU': relative difference of the logits' norm after a fixed prompt and one step.\n\n"
            + markdown_table(["GPUs", "decode tok/s", "graph ms / token", "speed-up", "prefill tok/s",
                              "GPU memory GB (rank 0)", "logits vs 1 GPU"], rows)
            + (f"\n\nNot run: {' and '.join(str(n) for n in missing)} GPUs (those machines were not lent).\n"
               if missing else "\n"))
    write_section("tp_gpu", body, script="tp_gpu")
    print(body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=80)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--report", type=Path)
    args = parser.parse_args()
    if args.report:
        return report(args.report)
    result = run(args.layers, args.context, args.decode_tokens)
    if int(os.environ.get("RANK", 0)) == 0:
        out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else RESULTS
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f"tp_gpu_{result['gpus']}.json").write_text(json.dumps(result, indent=1))
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
