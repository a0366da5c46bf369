"""Decode tokens/s of the quantized CPU engine on the embedded default model's shapes: the fused
decoder (csrc/decode.cpp, one C++ call per token) and the op-by-op Python path over the same
packed layers, against llama.cpp (llama-cpp-python) on the default model's own Q4_1 GGUF.
Writes its table into BENCHMARKS.md.

    python bench/fused_decode.py [--threads 2] [--repeats 3] [--rounds 3] [--decode-tokens 64]

trimtab runs random weights with the GGUF's shapes and bits per weight (every linear 4-bit in
groups of 32 = Q4_1's 5.0 bpw, the tied head/embedding 8-bit in groups of 64 = Q8_0's 8.5 bpw):
decode speed depends on shapes and widths, not on the values. Needs `pip install llama-cpp-python`.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_process import LlamaCppEngine, engine_parser, run_rounds  # noqa: E402
from report import markdown_table, write_section  # noqa: E402

import trimtab  # noqa: E402
from trimtab.backend.fused_decode import FusedDecoder  # noqa: E402
from trimtab.backend.quant import format as qformat  # noqa: E402
from trimtab.backend.quant.kernels import PackedLinear  # noqa: E402

PROMPT_TOKENS = 32
LINEAR_BITS, LINEAR_GROUP = 4, 32  # Q4_1: 4 bits + fp16 scale and min per 32 weights
HEAD_BITS, HEAD_GROUP = 8, 64      # Q8_0's 8.5 bpw: 8 bits + fp16 scale and min per 64 weights


def random_layer(in_features: int, out_features: int, bits: int, group: int) -> qformat.QuantizedLinear:
    """Random q (any bit pattern is a valid q), scales and mins giving W ≈ N(0, 0.02²)."""
    sizes = qformat.split_groups(in_features, group)
    words = sum(qformat.packed_words(n, bits) for n in sizes)
    qweight = torch.randint(-2 ** 31, 2 ** 31, (words, out_features), dtype=torch.int64).to(torch.int32)
    scale = 0.02 * 12 ** 0.5 / 2 ** bits
    scales = torch.full((len(sizes), out_features), scale, dtype=torch.float16)
    mins = torch.full((len(sizes), out_features), -scale * (2 ** bits - 1) / 2, dtype=torch.float16)
    return qformat.QuantizedLinear(qweight, scales, mins, torch.full((len(sizes),), bits, dtype=torch.uint8),
                                   torch.tensor(sizes, dtype=torch.int32))


def quantized_default_model():
    """The default model's transformer with every linear and the head replaced by random packed layers."""
    model = trimtab.load().transformer
    for layer in model.layers:
        for block, names in ((layer.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
                             (layer.mlp, ("gate_proj", "up_proj", "down_proj"))):
            for name in names:
                out_features, in_features = getattr(block, name).weight.shape
                setattr(block, name, PackedLinear.from_canonical(
                    random_layer(in_features, out_features, LINEAR_BITS, LINEAR_GROUP), None, "cpu"))
    vocab, hidden = model.embed_tokens.shape
    model.lm_head = PackedLinear.from_canonical(random_layer(hidden, vocab, HEAD_BITS, HEAD_GROUP), None, "cpu")
    model.embed_tokens = model.lm_head.dequantized_rows(torch.arange(vocab))  # the head is the embedding
    return model


class TrimtabEngine:
    """The Python path: model.forward op by op over the packed layers."""
    name = "trimtab op by op (PackedLinear)"

    def __init__(self, threads: int, context: int):
        self.model = quantized_default_model()
        self.context = context

    def prefill(self, ids: list[int]) -> None:
        self.cache = self.model.new_cache(1, self.context)
        logits = self.model.forward(torch.tensor([ids]), self.cache, last_only=True)
        self.next = int(logits[0, -1].numpy().argmax())  # numpy's argmax, as for llama.cpp's scores

    def decode(self, steps: int) -> None:
        for _ in range(steps):
            self.next = int(self.model.forward(torch.tensor([[self.next]]), self.cache)[0, -1].numpy().argmax())


class FusedEngine(TrimtabEngine):
    """One C++ call per token."""
    name = "trimtab fused decoder"

    def __init__(self, threads: int, context: int):
        super().__init__(threads, context)
        self.model.embed_tokens = None  # the decoder reads embedding rows from the quantized head
        self.decoder = FusedDecoder.build(self.model)

    def prefill(self, ids: list[int]) -> None:
        self.cache = self.model.new_cache(1, self.context)
        for token in ids:  # the embedding rows come from the head: prefill through the decoder too
            logits = self.decoder.step(token, self.cache)
            self.cache.advance(1)
        self.next = int(logits.numpy().argmax())

    def decode(self, steps: int) -> None:
        for _ in range(steps):
            logits = self.decoder.step(self.next, self.cache)
            self.cache.advance(1)
            self.next = int(logits.numpy().argmax())


ENGINES = {cls.__name__: cls for cls in (FusedEngine, TrimtabEngine, LlamaCppEngine)}


def measure_engine(name: str, args: argparse.Namespace) -> None:
    """Decode tokens/s of one engine (median over repeats after a warm-up), printed as JSON."""
    torch.set_num_threads(args.threads)
    ids = list(range(1000, 1000 + PROMPT_TOKENS))
    engine = ENGINES[name](args.threads, PROMPT_TOKENS + args.decode_tokens + 1)
    times = []
    for _ in range(args.repeats + 1):
        engine.prefill(ids)
        start = time.perf_counter()
        engine.decode(args.decode_tokens)
        times.append(time.perf_counter() - start)
    print(json.dumps(args.decode_tokens / statistics.median(times[1:])))


def main() -> None:
    args = engine_parser(__doc__, ENGINES).parse_args()
    if args.engine:
        return measure_engine(args.engine, args)

    results = run_rounds(__file__, ENGINES, args)
    llama = results[LlamaCppEngine.name]
    rows = [[name, f"{tps:.1f}", f"{tps / llama:.2f}×"] for name, tps in results.items()]
    body = (
        f"Decode on the embedded default model's shapes (SmolLM2-135M: 30 layers, hidden 576, vocab 49152), "
        f"{args.threads} threads, greedy, batch 1: {args.decode_tokens} tokens after a {PROMPT_TOKENS}-token "
        f"prompt; each engine in its own process, the engines taking turns for {args.rounds} rounds; per round the "
        f"median of {args.repeats} runs after a warm-up, then the median over rounds. trimtab runs "
        f"random weights with the GGUF's bits per weight: every linear {LINEAR_BITS}-bit in groups of "
        f"{LINEAR_GROUP} (= Q4_1's 5.0 bpw), the tied head/embedding {HEAD_BITS}-bit in groups of {HEAD_GROUP} "
        "(= Q8_0's 8.5 bpw); llama.cpp runs the real Q4_1 GGUF. The ratio is over llama.cpp's tokens/s.\n\n"
        + markdown_table(["engine", "decode tok/s", "vs llama.cpp"], rows)
    )
    write_section("fused_decode", body)
    print(body)


if __name__ == "__main__":
    main()
