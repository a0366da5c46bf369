"""Qwen2: bias on the q/k/v projections (not on o); optional sliding window on upper layers."""
from __future__ import annotations

from dataclasses import dataclass

from trimtab.backend.models import base
from trimtab.backend.models.llama import sanitize  # same checkpoint quirks as Llama

__all__ = ["Model", "ModelArgs", "sanitize"]


@dataclass
class ModelArgs(base.ModelArgs):
    use_sliding_window: bool = False
    max_window_layers: int = 0

    qkv_bias_only = True

    def layer_sliding_window(self, layer: int) -> int | None:
        # Qwen2 windows only layers at or above max_window_layers, and only when asked to
        if self.use_sliding_window and self.sliding_window and layer >= self.max_window_layers:
            return self.sliding_window
        return None


class Model(base.Transformer):
    pass
