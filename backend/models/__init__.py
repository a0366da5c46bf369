"""One module per architecture; `architecture_for(config)` picks the one a config.json names."""
from __future__ import annotations

import importlib
from types import ModuleType

from trimtab.backend.errors import UnsupportedModelError

# config.json "model_type" → module; "architectures" entries map through the same table
MODEL_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "mixtral": "mixtral"}
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "MixtralForCausalLM": "mixtral",
}


def architecture_for(config: dict) -> ModuleType:
    """The module (with ModelArgs, sanitize, Model) for a config.json dict."""
    model_type = config.get("model_type")
    names = config.get("architectures") or []
    module = MODEL_TYPES.get(model_type) or next((ARCHITECTURES[a] for a in names if a in ARCHITECTURES), None)
    if module is None:
        asked = model_type or ", ".join(map(str, names)) or "(none given)"
        raise UnsupportedModelError(
            f"unknown architecture {asked!r}; trimtab supports {', '.join(sorted(ARCHITECTURES))}")
    return importlib.import_module(f"trimtab.backend.models.{module}")


def model_args(arch: ModuleType, config: dict):
    """The architecture's ModelArgs for a config.json dict; UnsupportedModelError if it does not fit."""
    try:
        return arch.ModelArgs.from_config(config)
    except TypeError as e:
        raise UnsupportedModelError(f"config does not fit {arch.__name__.rsplit('.', 1)[-1]}: {e}") from None
