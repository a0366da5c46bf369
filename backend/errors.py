"""Errors a user can act on. Each message names the file (or input) and the problem."""
from __future__ import annotations

import os


class TrimtabError(Exception):
    """An ordinary mistake in input or usage; the CLI prints it without a traceback."""


class ModelFileError(TrimtabError):
    """A model file (safetensors, GGUF, config.json, tokenizer files) is missing or malformed."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = os.fspath(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class ChatTemplateError(TrimtabError):
    """A chat template is unsafe, malformed, too large or too slow to render."""


class UnsupportedModelError(TrimtabError):
    """The model uses an architecture or feature trimtab does not implement."""
