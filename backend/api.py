"""The Python API of DESIGN.md: `trimtab.load()` and the `Model` every front end drives."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, Sequence

import torch

from trimtab.backend import hf_loader
from trimtab.backend.completion import Completion
from trimtab.backend.default_model import default_model_path
from trimtab.backend.errors import ModelFileError, TrimtabError, UnsupportedModelError
from trimtab.backend.generation import Generation, prefill
from trimtab.backend.gguf_loader import is_gguf_file, read_gguf
from trimtab.backend.models import architecture_for, model_args
from trimtab.backend.models.base import Transformer
from trimtab.backend.quant import qconfig
from trimtab.backend.guard import ModelTraits, resolve_settings
from trimtab.backend.tensor_parallel import SINGLE, TensorParallel
from trimtab.backend.tokenizer import Tokenizer

DEVICES = ("cpu", "cuda", "auto")


class Stream:
    """Text pieces as they decode; `.overrides` says what the guard changed before the first piece,
    and after the last piece `.completion` holds the whole result."""

    def __init__(self, generation: Generation):
        self._generation = generation
        self.overrides = generation.overrides
        self.completion: Completion | None = None
        self._pieces = self._run()

    def __iter__(self) -> Iterator[str]:
        return self._pieces

    def _run(self) -> Iterator[str]:
        for _, piece in self._generation:
            yield piece
        self.completion = self._generation.completions[0]

    def cancel(self) -> None:
        """Stop at the next token (from any thread); the finish_reason becomes "cancelled"."""
        self._generation.cancel.set()


class Model:
    def __init__(self, transformer: Transformer, tokenizer: Tokenizer, *, name: str, config: dict):
        self.transformer = transformer
        self.tokenizer = tokenizer
        self.name = name
        self.config = config
        self.traits = ModelTraits.from_tokenizer(tokenizer)

    @property
    def context_length(self) -> int:
        return self.transformer.args.max_position_embeddings

    @property
    def vocab_size(self) -> int:
        return self.transformer.args.vocab_size

    # -- generation -------------------------------------------------------------------------
    # Settings: `preset` (a vetted preset's name, a webui preset file, or a dict; default
    # "balanced") overlaid with keyword settings by text-generation-webui's names, then the guard
    # (`guard="enforce" | "warn" | "off"`); what it changed is in the result's `.overrides`.

    def generate(self, prompt: str, *, preset=None, guard: str = "enforce", **settings) -> Completion:
        """Continue a plain text prompt."""
        return self._finish(self.stream(prompt, preset=preset, guard=guard, **settings))

    def chat(self, messages: list[dict], *, tools: list[dict] | None = None, documents: list[dict] | None = None,
             preset=None, guard: str = "enforce", **settings) -> Completion:
        """Answer a conversation rendered with the model's own chat template (tools and
        documents are handed to the template, for templates that use them)."""
        if isinstance(messages, str):
            raise TrimtabError("chat() takes a list of messages such as [{'role': 'user', 'content': '...'}]")
        return self._finish(self.stream(messages, tools=tools, documents=documents, preset=preset,
                                        guard=guard, **settings))

    def stream(self, prompt_or_messages: str | list[dict], *, tools: list[dict] | None = None,
               documents: list[dict] | None = None, preset=None, guard: str = "enforce", **settings) -> Stream:
        """Yield text pieces of a reply to a prompt (str) or a conversation (list of messages)."""
        if isinstance(prompt_or_messages, str):
            if tools or documents:
                raise TrimtabError("tools and documents need a conversation (a list of messages), not a plain prompt")
            prompt_ids = self.tokenizer.encode(prompt_or_messages)
        else:
            prompt_ids = self.tokenizer.encode_chat(prompt_or_messages, add_generation_prompt=True,
                                                    tools=tools, documents=documents)
        return Stream(self._generation([prompt_ids], preset, guard, settings))

    def chat_batch(self, conversations: list[list[dict]], *, preset=None, guard: str = "enforce",
                   **settings) -> list[Completion]:
        """Answer several conversations at once, decoded together as one batch; results in order."""
        if not conversations:
            return []
        prompts = [self.tokenizer.encode_chat(messages, add_generation_prompt=True) for messages in conversations]
        generation = self._generation(prompts, preset, guard, settings)
        for _ in generation:
            pass
        return generation.completions

    def _generation(self, prompts: list[list[int]], preset, guard_mode: str, settings: dict) -> Generation:
        safe, overrides = resolve_settings(preset, settings, self.traits, guard_mode)
        if any(not p for p in prompts):
            raise TrimtabError("the prompt is empty")
        longest = max(len(p) for p in prompts)
        room = self.context_length - longest
        if room < 1:
            raise TrimtabError(f"the prompt has {longest} tokens; the model's context holds {self.context_length}")
        return Generation(self.transformer, self.tokenizer, prompts, safe, overrides=overrides,
                          max_new_tokens=min(safe.max_new_tokens, room))

    @staticmethod
    def _finish(stream: Stream) -> Completion:
        for _ in stream:
            pass
        return stream.completion

    # -- evaluation -------------------------------------------------------------------------
    def logits(self, token_ids: Sequence[int]) -> torch.Tensor:
        """Next-token logits at every position of one sequence: [seq, vocab] float32."""
        ids = [int(t) for t in token_ids]
        if not ids:
            raise TrimtabError("logits() needs at least one token id")
        bad = [t for t in ids if not 0 <= t < self.transformer.args.vocab_size]
        if bad:
            raise TrimtabError(f"token id {bad[0]} is outside the vocabulary (0..{self.transformer.args.vocab_size - 1})")
        _, logits = prefill(self.transformer, [ids], len(ids), last_only=False)
        return logits[0].cpu()

    def __repr__(self) -> str:
        a = self.transformer.args
        return (f"Model({self.name!r}, {a.num_hidden_layers} layers, hidden {a.hidden_size}, "
                f"vocab {a.vocab_size}, device {self.transformer.device})")


COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _compute_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if isinstance(dtype, torch.dtype) and dtype in COMPUTE_DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in COMPUTE_DTYPES:
        return COMPUTE_DTYPES[dtype]
    raise TrimtabError(f"dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {dtype!r}")


def resolve_device(device: str) -> torch.device:
    if device not in DEVICES:
        raise TrimtabError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise TrimtabError("device='cuda' was asked for but PyTorch sees no CUDA GPU; use device='cpu'")
    return torch.device(device)


def _read_source(path: Path):
    """→ (config dict, weights mapping, Tokenizer) from a GGUF file or a model dir."""
    if path.is_dir():
        config = hf_loader.read_config(path)
        if "quantization_config" in config:  # only trimtab's own; its layers are read by the model's WeightReader
            qconfig.check(config["quantization_config"], path / hf_loader.CONFIG_NAME)
        return config, hf_loader.open_weights(path), Tokenizer.from_dir(path)
    if path.is_file() and is_gguf_file(path):
        contents = read_gguf(path)
        tokenizer = Tokenizer.from_parts(contents.tokenizer_json, contents.tokenizer_config,
                                         contents.generation_config, origin=str(path))
        return contents.config, contents.weights, tokenizer
    if not path.exists():
        raise ModelFileError(path, "no such file or directory")
    raise ModelFileError(path, "not a model directory (config.json + safetensors) or a GGUF file")


def load(path: str | os.PathLike | None = None, *, device: str = "cpu", tensor_parallel: int | None = None,
         dtype: str | torch.dtype | None = None) -> Model:
    """Load a Hugging Face model dir, a trimtab-quantized dir (`trimtab convert`), a .gguf file, or
    (None / "default") the embedded default model.

    dtype: the activations' (and float weights') dtype: float32, bfloat16 or float16; by default
    float32 on the CPU and bfloat16 on a GPU.

    tensor_parallel=N: this process is one of N started by torchrun and holds its share of every
    layer (backend/tensor_parallel.py); every rank runs the same calls and gets the same results."""
    device = resolve_device(device)
    compute_dtype = _compute_dtype(dtype, device)
    tp = SINGLE if tensor_parallel is None else TensorParallel.from_environment(device, tensor_parallel)
    source = default_model_path() if path in (None, "default") else Path(path).expanduser()
    config, weights, tokenizer = _read_source(source)
    try:
        arch = architecture_for(config)
        args = model_args(arch, config)
        transformer = arch.Model(args, arch.sanitize(weights), dtype=compute_dtype, device=device, tp=tp)
    except UnsupportedModelError as e:
        raise UnsupportedModelError(f"{source}: {e}") from None
    name = "default" if path in (None, "default") else str(source)
    return Model(transformer, tokenizer, name=name, config=config)
