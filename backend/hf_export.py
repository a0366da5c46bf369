"""Write what `read_gguf` returned as a Hugging Face model directory.

The directory gets config.json, model.safetensors, tokenizer.json, tokenizer_config.json and
generation_config.json. Each file is written under a temporary name in the same directory and
renamed into place when complete, so an interrupted export never leaves a half-written file under
a final name. A directory that already holds anything is refused unless `overwrite=True`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import torch

from .errors import TrimtabError
from .gguf_loader import GGUFContents

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def write_hf_dir(contents: GGUFContents, out_dir: str | os.PathLike, *, overwrite: bool = False,
                 dtype: torch.dtype | str = torch.float32) -> Path:
    """Write `contents` as a HF model directory; return its path.

    dtype: what the weights are stored as, a torch dtype or its name: float32 (the default) keeps
    the dequantized values exactly; float16 or bfloat16 halve the size.
    """
    from safetensors.torch import save_file

    dtype_name = dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")
    if dtype_name not in _DTYPES:
        raise TrimtabError(f"cannot store weights as {dtype_name}; choose one of {', '.join(_DTYPES)}")
    dtype = _DTYPES[dtype_name]
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise TrimtabError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise TrimtabError(f"{out}: directory exists and is not empty; choose another or allow overwriting it")
    out.mkdir(parents=True, exist_ok=True)

    config = dict(contents.config, torch_dtype=dtype_name)
    # safetensors wants contiguous tensors that share no storage
    weights = {name: tensor.to(dtype).contiguous() for name, tensor in contents.weights.items()}
    write_atomically(out / "model.safetensors", lambda tmp: save_file(weights, tmp, metadata={"format": "pt"}))
    del weights
    write_tokenizer_files(contents, out)
    write_json(out / "config.json", config)  # config.json last: its presence marks a complete dir
    return out


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


def write_tokenizer_files(contents: GGUFContents, out: Path) -> tuple[str, ...]:
    """The GGUF's tokenizer as TOKENIZER_FILES in `out`, each written atomically; → their names."""
    write_atomically(out / "tokenizer.json", lambda tmp: _write_text(tmp, contents.tokenizer_json))
    write_json(out / "tokenizer_config.json", contents.tokenizer_config)
    write_json(out / "generation_config.json", contents.generation_config)
    return TOKENIZER_FILES


def write_json(final: Path, data) -> None:
    write_atomically(final, lambda tmp: _write_text(tmp, json.dumps(data, indent=2) + "\n"))


def _write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as file:
        file.write(text)


def write_atomically(final: Path, write: Callable[[str], None]) -> None:
    """`write(tmp_path)`, flush it to disk, then rename it to `final`; on any failure remove it."""
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    try:
        write(str(tmp))
        with open(tmp, "rb+") as file:
            os.fsync(file.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
