"""Decode and prefill(512) tokens/s on the embedded default model, side by side in one run:
trimtab vs plain transformers (fp32, same GGUF dequantized) vs llama.cpp (llama-cpp-python,
same GGUF), all on the same number of threads. Writes its table into BENCHMARKS.md.

    python bench/cpu_decode.py [--threads 2] [--repeats 3] [--decode-tokens 64]

Needs `pip install transformers llama-cpp-python` (not part of the test suite).
"""
from __future__ import annotations

import argparse
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

    @torch.inference_mode()
    def prefill(self, ids: list[int]) -> None:
        out = self.model(torch.tensor([ids]), use_cache=True)
        self.past, self.next = out.past_key_values, int(out.logits[0, -1].argmax())

    @torch.inference_mode()
    def decode(self, steps: int) -> None:
        for _ in range(steps):
            out = self.model(torch.tensor([[self.next]]), past_key_values=self.past, use_cache=True)
            self.past, self.next = out.past_key_values, int(out.logits[0, -1].argmax())


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--decode-tokens", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    tokenizer = trimtab.load().tokenizer
    ids = tokenizer.encode(WIKI.read_text(encoding="utf-8")[:20000])
    context = PREFILL_TOKENS + args.decode_tokens + DECODE_PROMPT_TOKENS
    rows, results = [], {}
    for engine_cls in tqdm([TrimtabEngine, TransformersEngine, LlamaCppEngine], desc="engines"):
        engine = engine_cls(args.threads, context)
        prefill_tps, decode_tps = measure(engine, ids, args.repeats, args.decode_tokens)
        results[engine_cls.name] = (prefill_tps, decode_tps)
        del engine

    ours = results[TrimtabEngine.name]
    for name, (prefill_tps, decode_tps) in results.items():
        rows.append([name, f"{decode_tps:.1f}", f"{prefill_tps:.1f}",
                     f"{ours[1] / decode_tps:.2f}×", f"{ours[0] / prefill_tps:.2f}×"])
    body = (
        f"Embedded default model (SmolLM2-135M-Instruct Q4_1 GGUF), {args.threads} threads, greedy. "
        f"Decode: {args.decode_tokens} tokens after a {DECODE_PROMPT_TOKENS}-token prompt; prefill: "
        f"{PREFILL_TOKENS} tokens of `wiki.utf8`. Medians of {args.repeats} runs after a warm-up. "
        "trimtab here is the float reference path (weights dequantized to fp32); the quantized engine "
        "is a later issue.\n\n"
        + markdown_table(["engine", "decode tok/s", "prefill(512) tok/s", "trimtab decode ratio",
                          "trimtab prefill ratio"], rows)
    )
    write_section("cpu_decode", body)
    print(body)


if __name__ == "__main__":
    main()
