"""The Python API of DESIGN.md: `trimtab.load()` and the `Model` every front end drives."""
from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Iterator, Sequence

import torch

from trimtab.backend import hf_loader
from trimtab.backend.completion import Completion, Usage
from trimtab.backend.default_model import default_model_path
from trimtab.backend.errors import ModelFileError, TrimtabError, UnsupportedModelError
from trimtab.backend.generation import generate_tokens, prefill
from trimtab.backend.models import architecture_for
from trimtab.backend.models.base import Transformer
from trimtab.backend.settings import parse_settings
from trimtab.backend.tokenizer import Tokenizer

DEVICES = ("cpu", "cuda", "auto")


class Stream:
    """Text pieces as they decode; after the last one, `.completion` holds the whole result."""

    def __init__(self, pieces_of: "callable", cancel: threading.Event):
        self._cancel = cancel
        self.completion: Completion | None = None
        self._pieces = pieces_of(self)

    def __iter__(self) -> Iterator[str]:
        return self._pieces

    def cancel(self) -> None:
        """Stop at the next token; the completion's finish_reason becomes "cancelled"."""
        self._cancel.set()


class Model:
    def __init__(self, transformer: Transformer, tokenizer: Tokenizer, *, name: str, config: dict):
        self.transformer = transformer
        self.tokenizer = tokenizer
        self.name = name
        self.config = config

    @property
    def context_length(self) -> int:
        return self.transformer.args.max_position_embeddings

    # -- generation -------------------------------------------------------------------------
    def generate(self, prompt: str, **settings) -> Completion:
        """Continue a plain text prompt."""
        return self._finish(self.stream(prompt, **settings))

    def chat(self, messages: list[dict], *, tools: list[dict] | None = None,
             documents: list[dict] | None = None, **settings) -> Completion:
        """Answer a conversation rendered with the model's own chat template (tools and
        documents are handed to the template, for templates that use them)."""
        if isinstance(messages, str):
            raise TrimtabError("chat() takes a list of messages such as [{'role': 'user', 'content': '...'}]")
        return self._finish(self.stream(messages, tools=tools, documents=documents, **settings))

    def stream(self, prompt_or_messages: str | list[dict], *, tools: list[dict] | None = None,
               documents: list[dict] | None = None, **settings) -> Stream:
        """Yield text pieces of a reply to a prompt (str) or a conversation (list of messages)."""
        parsed = parse_settings(settings)
        if isinstance(prompt_or_messages, str):
            if tools or documents:
                raise TrimtabError("tools and documents need a conversation (a list of messages), not a plain prompt")
            prompt_ids = self.tokenizer.encode(prompt_or_messages)
        else:
            prompt_ids = self.tokenizer.encode_chat(prompt_or_messages, add_generation_prompt=True,
                                                    tools=tools, documents=documents)
        if not prompt_ids:
            raise TrimtabError("the prompt is empty")
        room = self.context_length - len(prompt_ids)
        if room < 1:
            raise TrimtabError(
                f"the prompt has {len(prompt_ids)} tokens; the model's context holds {self.context_length}")
        max_new = min(parsed.max_new_tokens, room)
        cancel = threading.Event()

        def pieces(stream: Stream) -> Iterator[str]:
            decoder = self.tokenizer.stream_decoder()
            new_ids, text, finish = [], [], "length"
            for event in generate_tokens(self.transformer, prompt_ids, max_new_tokens=max_new,
                                         sampling=parsed.sampling, eos_ids=self.tokenizer.eos_token_ids,
                                         cancel=cancel):
                if event.is_eos:
                    finish = "eos"
                    break
                new_ids.append(event.token)
                piece = decoder.push(event.token)
                if piece:
                    text.append(piece)
                    yield piece
            if cancel.is_set():
                finish = "cancelled"
            tail = decoder.flush()
            if tail:
                text.append(tail)
                yield tail
            stream.completion = Completion(
                text="".join(text), finish_reason=finish, token_ids=new_ids,
                usage=Usage(prompt_tokens=len(prompt_ids), completion_tokens=len(new_ids)))

        return Stream(pieces, cancel)

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


def resolve_device(device: str) -> torch.device:
    if device not in DEVICES:
        raise TrimtabError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise TrimtabError("device='cuda' was asked for but PyTorch sees no CUDA GPU; use device='cpu'")
    return torch.device(device)


def _is_gguf(path: Path) -> bool:
    if path.suffix.lower() == ".gguf":
        return True
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def _read_source(path: Path):
    """→ (config dict, weights mapping, Tokenizer) from a GGUF file or a model dir."""
    if path.is_dir():
        config = hf_loader.read_config(path)
        if "quantization_config" in config:
            raise UnsupportedModelError(
                f"{path}: quantized models ({config['quantization_config'].get('quant_method', '?')}) "
                "are not supported by this version of trimtab yet")
        return config, hf_loader.open_weights(path), Tokenizer.from_dir(path)
    if path.is_file() and _is_gguf(path):
        from trimtab.backend.gguf_loader import read_gguf  # gguf is only needed for GGUF files

        contents = read_gguf(path)
        tokenizer = Tokenizer.from_parts(contents.tokenizer_json, contents.tokenizer_config,
                                         contents.generation_config, origin=str(path))
        return contents.config, contents.weights, tokenizer
    if not path.exists():
        raise ModelFileError(path, "no such file or directory")
    raise ModelFileError(path, "not a model directory (config.json + safetensors) or a GGUF file")


def load(path: str | os.PathLike | None = None, *, device: str = "cpu") -> Model:
    """Load a Hugging Face model dir, a .gguf file, or (None / "default") the embedded default model."""
    device = resolve_device(device)
    source = default_model_path() if path in (None, "default") else Path(path).expanduser()
    config, weights, tokenizer = _read_source(source)
    try:
        arch = architecture_for(config)
        try:
            args = arch.ModelArgs.from_config(config)
        except TypeError as e:
            raise UnsupportedModelError(f"config does not fit {arch.__name__.rsplit('.', 1)[-1]}: {e}") from None
        dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
        transformer = arch.Model(args, arch.sanitize(weights), dtype=dtype, device=device)
    except UnsupportedModelError as e:
        raise UnsupportedModelError(f"{source}: {e}") from None
    name = "default" if path in (None, "default") else str(source)
    return Model(transformer, tokenizer, name=name, config=config)
