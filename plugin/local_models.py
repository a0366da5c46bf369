"""The models in a folder that `trimtab.load` can be pointed at, for a front end's model menu.

A model is a directory with a config.json (Hugging Face safetensors, or a quantized model whose
config.json has a quantization_config) or a .gguf file, in the folder itself or one level down
(webui keeps GGUF files both ways). Nothing is opened but config.json.
"""
from __future__ import annotations

import json
import os
from pathlib import Path


def local_models(folder: str | os.PathLike | None) -> list[tuple[str, str]]:
    """(label, path) for each model in `folder`, sorted by label; [] if the folder is missing."""
    if folder is None or not Path(folder).is_dir():
        return []
    found = []
    for entry in Path(folder).iterdir():
        if entry.is_dir() and (entry / "config.json").is_file():
            found.append((f"{entry.name} ({_model_dir_kind(entry / 'config.json')})", str(entry)))
        elif entry.is_dir():
            found += [(f"{entry.name}/{f.name} (GGUF)", str(f)) for f in entry.glob("*.gguf") if _is_model_gguf(f)]
        elif _is_model_gguf(entry):
            found.append((f"{entry.name} (GGUF)", str(entry)))
    return sorted(found, key=lambda item: item[0].lower())


def _model_dir_kind(config_path: Path) -> str:
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return "unreadable config.json"
    quantization = config.get("quantization_config") if isinstance(config, dict) else None
    if isinstance(quantization, dict):
        return f"quantized: {quantization.get('quant_method', 'unknown method')}"
    return "Hugging Face"


def _is_model_gguf(path: Path) -> bool:
    # vision projectors (mmproj-*.gguf) sit beside models but are not models
    return path.is_file() and path.suffix.lower() == ".gguf" and not path.name.lower().startswith("mmproj")
