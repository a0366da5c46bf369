"""One loaded model per (model, device), shared by every front end in the process.

Loading the embedded default model takes seconds and its weights take memory; two LangChain
objects (or a chat model and a plain LLM) naming the same model must not load it twice. A
`trimtab.Model` is safe to use from several threads at once (each call has its own KV cache),
so sharing one is safe; only the loading needs a lock, held per model so that loading one model
never waits on another.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path

from trimtab.backend.api import Model, load, resolve_device

_lock = threading.Lock()                       # guards the two dicts below
_models: dict[tuple[str, str], Model] = {}
_loading: dict[tuple[str, str], threading.Lock] = {}


def model_key(model: str | os.PathLike | None = "default", device: str = "cpu") -> tuple[str, str]:
    """The cache key: "default", or the model's real path; the device after resolving "auto"."""
    if model in (None, "default"):
        name = "default"
    else:
        name = os.path.realpath(Path(model).expanduser())
    return name, resolve_device(device).type


def get_model(model: str | os.PathLike | None = "default", device: str = "cpu") -> Model:
    """The loaded model for `model` ("default" or a path) on `device`, loading it on first use.
    Errors from loading (a missing file, a malformed model) propagate and nothing is cached."""
    key = model_key(model, device)
    with _lock:
        if key in _models:
            return _models[key]
        loading = _loading.setdefault(key, threading.Lock())
    with loading:                              # one loader per key; the others wait for it here
        with _lock:
            if key in _models:
                return _models[key]
        loaded = load(None if key[0] == "default" else model, device=key[1])
        with _lock:
            _models[key] = loaded
            _loading.pop(key, None)
        return loaded


def forget(model: str | os.PathLike | None = "default", device: str = "cpu") -> None:
    """Drop a cached model (its memory is freed once no object uses it any more)."""
    with _lock:
        _models.pop(model_key(model, device), None)
