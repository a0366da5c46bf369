"""trimtab: a quantized LLM inference engine that keeps generation on course.

    import trimtab
    model = trimtab.load()                 # the embedded default model
    print(model.chat([{"role": "user", "content": "Hi!"}]).text)
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"
__all__ = ["Completion", "Model", "TrimtabError", "load"]

# Imported on first use so that `import trimtab` (and `trimtab --help`) stays light.
_LAZY = {
    "load": "trimtab.backend.api",
    "Model": "trimtab.backend.api",
    "Completion": "trimtab.backend.completion",
    "TrimtabError": "trimtab.backend.errors",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'trimtab' has no attribute {name!r}")
