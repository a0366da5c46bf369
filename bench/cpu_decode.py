"""Decode and prefill(512) tokens/s on the embedded default model, side by side in one run:
trimtab vs plain transformers (fp32, same GGUF dequantized) vs llama.cpp (llama-cpp-python,
same GGUF), all on the same number of threads. Writes its table into BENCHMARKS.md.

    python bench/cpu_decode.py [--threads 2] [--repeats 3] [--decode-tokens 64]

Needs `pip install transformers llama-cpp-python` (not part of the test suite).
"""
from __future__ import annotations

import argparse
import inspect
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_process import LlamaCppEngine, engine_parser, run_in_own_process  # noqa: E402
from report import markdown_table, median_seconds, write_section  # noqa: E402

import trimtab  # noqa: E402
from trimtab.backend.default_model import default_model_path  # noqa: E402
from trimtab.backend.generation import decode_one_token, prefill  # noqa: E402

WIKI = Path(__file__).resolve().parents[2] / "shared" / "data" / "text" / "wiki.utf8"
PREFILL_TOKENS = 512
DECODE_PROMPT_TOKENS = 32


class TrimtabEngine:
    name = "trimtab (float path)"

    def __init__(self, threads: int, context: int):
        self.model = trimtab.load().transformer
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

    def __init__(self, threads: int, context: int):
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


def measure(engine, ids: list[int], repeats: int, decode_tokens: int) -> tuple[float, float]:
    """→ (prefill tokens/s over PREFILL_TOKENS, decode tokens/s over decode_tokens)."""
    prefill_s = median_seconds(lambda: engine.prefill(ids[:PREFILL_TOKENS]), repeats)
    decode_times = []
    for _ in range(repeats + 1):  # the first is a warm-up
        engine.prefill(ids[:DECODE_PROMPT_TOKENS])  # untimed: each decode run starts from the same short prompt
        start = time.perf_counter()
        engine.decode(decode_tokens)
        decode_times.append(time.perf_counter() - start)
    return PREFILL_TOKENS / prefill_s, decode_tokens / statistics.median(decode_times[1:])


ENGINES = {cls.__name__: cls for cls in (TrimtabEngine, TransformersEngine, LlamaCppEngine)}


def measure_engine(name: str, args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    ids = trimtab.load().tokenizer.encode(WIKI.read_text(encoding="utf-8")[:20000])
    engine = ENGINES[name](args.threads, PREFILL_TOKENS + args.decode_tokens + DECODE_PROMPT_TOKENS)
    print(json.dumps(measure(engine, ids, args.repeats, args.decode_tokens)))


def main() -> None:
    args = engine_parser(__doc__, ENGINES).parse_args()
    if args.engine:
        return measure_engine(args.engine, args)

    results = {ENGINES[name].name: tuple(run_in_own_process(__file__, name, args))
               for name in tqdm(ENGINES, desc="engines")}
    ours = results[TrimtabEngine.name]
    rows = [[name, f"{decode_tps:.1f}", f"{prefill_tps:.1f}", f"{ours[1] / decode_tps:.2f}×",
             f"{ours[0] / prefill_tps:.2f}×"] for name, (prefill_tps, decode_tps) in results.items()]
    body = (
        f"Embedded default model (SmolLM2-135M-Instruct Q4_1 GGUF), {args.threads} threads, greedy, each "
        f"engine in its own process. Decode: {args.decode_tokens} tokens after a {DECODE_PROMPT_TOKENS}-token "
        f"prompt; prefill: {PREFILL_TOKENS} tokens of `wiki.utf8`. Medians of {args.repeats} runs after a "
        "warm-up. trimtab here is the float reference path (weights dequantized to fp32); the quantized "
        "engine is a later issue. Ratios are trimtab's tokens/s over each engine's.\n\n"
        + markdown_table(["engine", "decode tok/s", "prefill(512) tok/s", "trimtab decode ratio",
                          "trimtab prefill ratio"], rows)
    )
    write_section("cpu_decode", body)
    print(body)


if __name__ == "__main__":
    main()
