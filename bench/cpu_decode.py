"""Decode and prefill(512) tokens/s, and KL divergence from the float model, on the embedded default model,
side by side in one run on the same number of threads: trimtab's quantized engine at about 4.5 and 6.5
bits per weight, and at the sizes llama.cpp's types reach on this model (`trimtab convert` of the float
model), against llama.cpp (llama-cpp-python) on its own
Q4_1 GGUF and on Q4_K_M and Q6_K made by llama.cpp's quantizer, with trimtab's float path and plain
transformers (fp32) for scale. Writes its tables into BENCHMARKS.md.

    python bench/cpu_decode.py [--threads 2] [--repeats 3] [--rounds 3] [--decode-tokens 64] [--method gptq]

The float model is the embedded Q4_1 GGUF dequantized (what `trimtab.load()` runs); llama.cpp's Q4_K_M
and Q6_K are made from that file with requantizing allowed (bench/llamacpp_models.py). Quantized models
are made once into out/bench-models/ and reused. Needs `pip install transformers llama-cpp-python`
(not part of the test suite).
"""
from __future__ import annotations

import argparse
import inspect
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_process import LlamaCppEngine, engine_parser, run_rounds  # noqa: E402
from llamacpp_models import (LlamaCppModel, head_bits_per_weight, linear_bits_per_weight,  # noqa: E402
                             make_gguf)
from report import markdown_table, median_seconds, write_section  # noqa: E402

import trimtab  # noqa: E402
from trimtab.backend import evaluate  # noqa: E402
from trimtab.backend.default_model import default_model_path  # noqa: E402
from trimtab.backend.generation import decode_one_token, prefill  # noqa: E402
from trimtab.backend.quant.convert import ConvertOptions, convert  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT.parent / "shared" / "data" / "text"
WIKI = TEXT / "wiki.utf8"             # prompts for the speed runs
HELD_OUT = TEXT / "technical.utf8"    # KL divergence (no converter calibrates on it)
WORK = ROOT / "out" / "bench-models"
PREFILL_TOKENS = 512
DECODE_PROMPT_TOKENS = 32
KLD_TOKENS, KLD_CTX = 4096, 512
# about 4.5 and 6.5 bpw, and the sizes llama.cpp's types measure on this model (Q4_1 5.0, Q4_K_M 5.53;
# Q6_K 8.02, as most of its tensors fall back to Q8_0 since 576 is not a multiple of 256)
TRIMTAB_BITS = (4.5, 5.5, 6.5, 8.0)
HEAD_BITS = 8                         # the GGUFs' tied head/embedding is 8-bit (Q8_0)
LLAMA_CPP_TYPES = ("Q4_1", "Q4_K_M", "Q6_K")
# each trimtab size with the llama.cpp types of comparable (equal or larger) size
COMPARISONS = {4.5: ("Q4_1",), 5.5: ("Q4_K_M",), 6.5: ("Q6_K",), 8.0: ("Q6_K",)}


class TrimtabEngine:
    """trimtab.load(path) (the float model when path is None); batch-1 decode of a quantized model runs
    the fused decoder, prefill the packed layers' GEMM kernels."""

    def __init__(self, path: Path | None, context: int):
        self.model = (trimtab.load(path) if path else trimtab.load()).transformer
        self.context = context

    def prefill(self, ids: list[int]) -> None:
        self.cache, logits = prefill(self.model, [ids], self.context)
        self.next = int(logits[0, -1].argmax())

    def decode(self, steps: int) -> None:
        for _ in range(steps):
            logits = decode_one_token(self.model, self.cache, torch.tensor([self.next]))
            self.next = int(logits[0].argmax())


class TransformersEngine:
    name = "transformers fp32"

    def __init__(self, context: int):
        import transformers

        path = default_model_path()
        self.model = transformers.AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32).eval()
        # transformers 5.x renames past_key_values to cache; the cache object is filled in place
        parameters = inspect.signature(self.model.forward).parameters
        self.cache_argument = "cache" if "cache" in parameters else "past_key_values"

    @torch.inference_mode()
    def prefill(self, ids: list[int]) -> None:
        from transformers import DynamicCache

        self.cache = DynamicCache()
        self._step(torch.tensor([ids]))

    @torch.inference_mode()
    def decode(self, steps: int) -> None:
        for _ in range(steps):
            self._step(torch.tensor([[self.next]]))

    def _step(self, ids: torch.Tensor) -> None:
        out = self.model(ids, **{self.cache_argument: self.cache}, use_cache=True)
        self.next = int(out.logits[0, -1].argmax())


def measure(engine, ids: list[int], repeats: int, decode_tokens: int) -> list[float]:
    """→ [prefill tokens/s over PREFILL_TOKENS, decode tokens/s over decode_tokens]."""
    prefill_s = median_seconds(lambda: engine.prefill(ids[:PREFILL_TOKENS]), repeats)
    decode_times = []
    for _ in range(repeats + 1):  # the first is a warm-up
        engine.prefill(ids[:DECODE_PROMPT_TOKENS])  # untimed: each decode run starts from the same short prompt
        start = time.perf_counter()
        engine.decode(decode_tokens)
        decode_times.append(time.perf_counter() - start)
    return [PREFILL_TOKENS / prefill_s, decode_tokens / statistics.median(decode_times[1:])]


@dataclass(frozen=True)
class EngineSpec:
    name: str
    make: Callable[[argparse.Namespace, int], object]   # (args, context) → engine with prefill/decode
    model: str | None = None                              # "trimtab-B" or "llama.cpp-TYPE": its quality row


def trimtab_dir(bits: float, method: str | None) -> Path:
    return WORK / f"trimtab-{method or 'default'}-b{bits}-hb{HEAD_BITS}"


def engine_specs() -> dict[str, EngineSpec]:
    specs = {}
    for bits in TRIMTAB_BITS:
        specs[f"trimtab-{bits}"] = EngineSpec(
            f"trimtab {bits} bpw", lambda a, c, bits=bits: TrimtabEngine(trimtab_dir(bits, a.method), c),
            f"trimtab-{bits}")
    for kind in LLAMA_CPP_TYPES:
        specs[f"llama.cpp-{kind}"] = EngineSpec(
            f"llama.cpp {kind}", lambda a, c, kind=kind: LlamaCppEngine(a.threads, c, path=make_gguf(kind, WORK)),
            f"llama.cpp-{kind}")
    specs["trimtab-float"] = EngineSpec("trimtab float path (fp32)", lambda a, c: TrimtabEngine(None, c))
    specs["transformers"] = EngineSpec("transformers fp32", lambda a, c: TransformersEngine(c))
    return specs


def measure_engine(key: str, args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    ids = trimtab.load().tokenizer.encode(WIKI.read_text(encoding="utf-8")[:20000])
    engine = engine_specs()[key].make(args, PREFILL_TOKENS + args.decode_tokens + DECODE_PROMPT_TOKENS)
    print(json.dumps(measure(engine, ids, args.repeats, args.decode_tokens)))


def make_models(args: argparse.Namespace) -> dict[str, dict]:
    """Every quantized model, made once (reused when already in WORK); → {model key: size facts}."""
    WORK.mkdir(parents=True, exist_ok=True)
    models = {}
    for bits in tqdm(TRIMTAB_BITS, desc="trimtab convert"):
        out = trimtab_dir(bits, args.method)
        if not (out / "config.json").is_file():
            method = {"method": args.method} if args.method else {}
            convert(ConvertOptions("default", str(out), bits=bits, head_bits=HEAD_BITS, **method), progress=False)
        block = json.loads((out / "config.json").read_text())["quantization_config"]
        models[f"trimtab-{bits}"] = {"path": out, "bpw": block["bits_per_weight"], "method": block["method"],
                                     "head_bpw": _trimtab_head_bpw(out)}
    for kind in tqdm(LLAMA_CPP_TYPES, desc="llama.cpp quantize"):
        path = make_gguf(kind, WORK, args.threads)
        models[f"llama.cpp-{kind}"] = {"path": path, "bpw": linear_bits_per_weight(path),
                                       "head_bpw": head_bits_per_weight(path)}
    return models


def _trimtab_head_bpw(directory: Path) -> float:
    from safetensors import safe_open

    from trimtab.backend.quant.format import from_tensors

    with safe_open(str(directory / "model.safetensors"), framework="pt") as f:
        head = from_tensors({name: f.get_tensor(name) for name in f.keys() if name.startswith("lm_head.")}, "lm_head")
    return head.bits() / (head.in_features * head.out_features)


def measure_quality(models: dict[str, dict], threads: int) -> dict[str, evaluate.KLDivergence]:
    """KL divergence of every quantized model from the float model on held-out text."""
    torch.set_num_threads(threads)
    reference = trimtab.load()
    ids = evaluate.evaluation_tokens(reference, HELD_OUT.read_text(encoding="utf-8"), KLD_TOKENS)
    quality = {}
    for key, facts in tqdm(models.items(), desc="KL divergence"):
        model = (LlamaCppModel(facts["path"], threads, KLD_CTX) if key.startswith("llama.cpp")
                 else trimtab.load(facts["path"]))
        quality[key] = evaluate.kl_divergence(model, reference, ids, KLD_CTX, progress=False)
    return quality


def main() -> None:
    parser = engine_parser(__doc__, engine_specs())
    parser.add_argument("--method", help="trimtab convert's --method (default: the converter's default)")
    args = parser.parse_args()
    if args.engine:
        return measure_engine(args.engine, args)

    models = make_models(args)
    specs = engine_specs()
    extra = ("--method", args.method) if args.method else ()
    speeds = run_rounds(__file__, specs, args, extra)            # {name: [prefill tok/s, decode tok/s]}
    quality = measure_quality(models, args.threads)
    write_report(args, specs, models, speeds, quality)


def write_report(args, specs, models, speeds, quality) -> None:
    rows = []
    for spec in specs.values():
        prefill_tps, decode_tps = speeds[spec.name]
        facts = models.get(spec.model)
        kld = quality.get(spec.model)
        rows.append([spec.name + (f" ({facts['method']})" if facts and "method" in facts else ""),
                     f"{facts['bpw']:.2f}" if facts else "fp32", f"{facts['head_bpw']:.2f}" if facts else "fp32",
                     f"{decode_tps:.1f}", f"{prefill_tps:.1f}",
                     f"{kld.mean:.4f}" if kld else "(reference)", f"{100 * kld.top1_agreement:.1f}%" if kld else ""])
    pairs = []
    for bits, kinds in COMPARISONS.items():
        ours = specs[f"trimtab-{bits}"]
        for kind in kinds:
            theirs = specs[f"llama.cpp-{kind}"]
            pairs.append([f"trimtab {models[ours.model]['bpw']:.2f} bpw vs llama.cpp {kind} "
                          f"{models[theirs.model]['bpw']:.2f} bpw",
                          f"{speeds[ours.name][1] / speeds[theirs.name][1]:.2f}×",
                          f"{speeds[ours.name][0] / speeds[theirs.name][0]:.2f}×",
                          f"{quality[ours.model].mean:.4f} vs {quality[theirs.model].mean:.4f}"])
    body = (
        f"Embedded default model (SmolLM2-135M-Instruct), {args.threads} threads, greedy, batch 1, each engine "
        f"in its own process, the engines taking turns for {args.rounds} rounds (per round the median of "
        f"{args.repeats} runs after a warm-up; then the median over rounds). Decode: {args.decode_tokens} tokens "
        f"after a {DECODE_PROMPT_TOKENS}-token prompt; prefill: {PREFILL_TOKENS} tokens of `wiki.utf8`. Bits per "
        "weight count every stored bit of the decoder's linear layers (scales and group metadata included), the "
        f"head apart; trimtab's head is -hb {HEAD_BITS}. KL divergence (nats per token) and top-1 agreement "
        f"against the float model (the embedded Q4_1 GGUF dequantized) on {KLD_TOKENS} tokens of "
        f"`technical.utf8` in windows of {KLD_CTX}. llama.cpp's Q4_1 row is that GGUF itself, so its KL "
        "divergence is only float rounding; its Q4_K_M and Q6_K are requantized from it.\n\n"
        + markdown_table(["engine", "linear bpw", "head bpw", "decode tok/s", "prefill(512) tok/s", "KLD",
                          "top-1"], rows)
        + "\n\nSide by side (ratios are trimtab's tokens/s over llama.cpp's):\n\n"
        + markdown_table(["comparison", "decode", "prefill(512)", "KLD (trimtab vs llama.cpp)"], pairs)
    )
    write_section("cpu_decode", body)
    print(body)


if __name__ == "__main__":
    main()
