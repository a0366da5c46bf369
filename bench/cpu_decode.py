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
import subprocess
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
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


class LlamaCppEngine:
    name = "llama.cpp (llama-cpp-python)"

    def __init__(self, threads: int, context: int):
        from llama_cpp import Llama

        self.llm = Llama(model_path=str(default_model_path()), n_threads=threads, n_threads_batch=threads,
                         n_ctx=context, n_batch=PREFILL_TOKENS, verbose=False)

    def prefill(self, ids: list[int]) -> None:
        self.llm.reset()
        self.llm.eval(ids)
        self.next = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))

    def decode(self, steps: int) -> None:
        for _ in range(steps):
            self.llm.eval([self.next])
            self.next = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))


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


def run_engine(name: str, args: argparse.Namespace) -> tuple[float, float]:
    """Measure one engine in a process of its own, so no engine's thread pool disturbs another's."""
    command = [sys.executable, __file__, "--engine", name, "--threads", str(args.threads),
               "--repeats", str(args.repeats), "--decode-tokens", str(args.decode_tokens)]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return tuple(json.loads(result.stdout.strip().splitlines()[-1]))


def measure_engine(name: str, args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    ids = trimtab.load().tokenizer.encode(WIKI.read_text(encoding="utf-8")[:20000])
    engine = ENGINES[name](args.threads, PREFILL_TOKENS + args.decode_tokens + DECODE_PROMPT_TOKENS)
    print(json.dumps(measure(engine, ids, args.repeats, args.decode_tokens)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--engine", choices=sorted(ENGINES), help=argparse.SUPPRESS)  # one engine, in a child
    args = parser.parse_args()
    if args.engine:
        return measure_engine(args.engine, args)

    results = {ENGINES[name].name: run_engine(name, args) for name in tqdm(ENGINES, desc="engines")}
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
