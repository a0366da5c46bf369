"""llama.cpp as a peer in the benchmarks: its GGUF quantizations of the embedded default model, their
bits per weight counted as trimtab counts its own, and their quality through backend/evaluate.py.

    path = make_gguf("Q4_K_M", work_dir)           # "Q4_1" is the embedded file itself
    bpw = linear_bits_per_weight(path)             # the decoder's linear layers, every stored bit
    model = LlamaCppModel(path, threads=2)         # evaluate.kl_divergence(model, reference, ids, ctx)

The float model every KL divergence is measured against is the embedded Q4_1 GGUF dequantized
(what `trimtab.load()` runs), so llama.cpp's other types are made from that file with requantizing
allowed: llama.cpp dequantizes each tensor to float32 and quantizes it again, from the same float
weights trimtab's converter reads. Needs `pip install llama-cpp-python` (not part of the tests).
"""
from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import torch

from trimtab.backend.default_model import default_model_path
from trimtab.backend.errors import TrimtabError

EMBEDDED_TYPE = "Q4_1"
# the decoder's linear layers in GGUF names (blk.N.<name>.weight); the output head and embedding apart
LINEAR_TENSORS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def make_gguf(kind: str, work: Path, threads: int = 2) -> Path:
    """The embedded default model as llama.cpp quantizes it to `kind` (a LLAMA_FTYPE_MOSTLY_* name such
    as "Q4_K_M"); made once into `work` and reused."""
    source = default_model_path()
    if kind == EMBEDDED_TYPE:
        return source
    import llama_cpp

    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{kind}", None)
    if ftype is None:
        raise TrimtabError(f"llama.cpp has no quantization type {kind!r}")
    out = Path(work) / f"{source.stem}-{kind}.gguf"
    if out.is_file():
        return out
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.allow_requantize, params.nthread = ftype, True, threads
    partial = out.with_suffix(".partial")
    status = llama_cpp.llama_model_quantize(str(source).encode(), str(partial).encode(), ctypes.byref(params))
    if status != 0:
        raise TrimtabError(f"llama.cpp could not quantize {source.name} to {kind} (status {status})")
    partial.rename(out)
    return out


def _tensor_bits(path: Path, keep) -> float:
    """Stored bits per weight over the GGUF's tensors whose names pass `keep`."""
    from gguf import GGUFReader

    bits = weights = 0
    for tensor in GGUFReader(str(path)).tensors:
        if keep(tensor.name):
            bits += 8 * int(tensor.n_bytes)
            weights += int(tensor.n_elements)
    return bits / weights


def linear_bits_per_weight(path: Path) -> float:
    """The decoder's linear layers (q/k/v/o, gate/up/down), every stored bit (scales included) counted."""
    return _tensor_bits(path, lambda name: name.split(".")[-2] in LINEAR_TENSORS)


def head_bits_per_weight(path: Path) -> float:
    """The output head: `output.weight`, or the embedding it is tied to."""
    from gguf import GGUFReader

    names = {tensor.name for tensor in GGUFReader(str(path)).tensors}
    head = "output.weight" if "output.weight" in names else "token_embd.weight"
    return _tensor_bits(path, lambda name: name == head)


class LlamaCppModel:
    """A GGUF run by llama.cpp, with the interface backend/evaluate.py scores: name, context_length,
    vocab_size and logits(ids) → [len(ids), V] float32 (every position, from an empty cache)."""

    def __init__(self, path: Path, threads: int = 2, context: int = 512):
        from llama_cpp import Llama

        self.name = Path(path).name
        self.context_length = context
        self.llm = Llama(model_path=str(path), n_threads=threads, n_threads_batch=threads, n_ctx=context,
                         n_batch=context, logits_all=True, verbose=False)
        self.vocab_size = self.llm.n_vocab()

    def logits(self, ids: list[int]) -> torch.Tensor:
        self.llm.reset()
        self.llm.eval(list(ids))
        return torch.from_numpy(np.array(self.llm.scores[:len(ids)], dtype=np.float32))  # [len(ids), V]
