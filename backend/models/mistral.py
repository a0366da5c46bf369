"""Mistral: Llama with sliding-window attention (`sliding_window` in config.json)."""
from __future__ import annotations

from trimtab.backend.models import base
from trimtab.backend.models.llama import sanitize  # same checkpoint quirks as Llama

ModelArgs = base.ModelArgs  # sliding_window is honoured by the shared attention mask

__all__ = ["Model", "ModelArgs", "sanitize"]


class Model(base.Transformer):
    pass
