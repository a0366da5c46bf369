"""Llama (1, 2, 3, 3.1 with llama3 rope scaling) and Llama-shaped models such as SmolLM2."""
from __future__ import annotations

from typing import Mapping

import torch

from trimtab.backend.models import base

ModelArgs = base.ModelArgs


def sanitize(weights: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """Old checkpoints carry rotary frequency buffers; they are recomputed from config."""
    if not any(name.endswith("rotary_emb.inv_freq") for name in weights):
        return weights
    return {name: t for name, t in weights.items() if not name.endswith("rotary_emb.inv_freq")}


class Model(base.Transformer):
    pass
