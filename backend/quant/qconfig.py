"""The `quantization_config` block of a trimtab-quantized model's config.json (docs/FORMAT.md).

    {"quant_method": "trimtab", "format_version": 1, "method": "rtn", "bits": 4.5,
     "bits_per_weight": 4.497, "head_bits": 6, "group_size": 64}

`bits` is the target the converter was given (-b), `bits_per_weight` what the decoder's linear
layers measure with every stored bit counted, `head_bits` the output head's width (-hb). A calibrated
method (gptq) adds `calibration` (the text's name, -r rows of -l tokens, -mr rows of -ml tokens for the
measurement) and `allocation` (how widths were chosen). Those keys are optional: directories written
before them (rtn) load as they are.
"""
from __future__ import annotations

import os

from trimtab.backend.errors import ModelFileError, UnsupportedModelError
from trimtab.backend.quant.format import WIDTHS

QUANT_METHOD = "trimtab"
FORMAT_VERSION = 1
METHODS = ("rtn", "gptq")
MIN_BITS, MAX_BITS = 2.0, 8.0


def make(*, method: str, bits: float, bits_per_weight: float, head_bits: int, group_size: int,
         calibration: dict | None = None, allocation: str | None = None) -> dict:
    block = {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION, "method": method, "bits": bits,
             "bits_per_weight": round(bits_per_weight, 6), "head_bits": head_bits, "group_size": group_size}
    if calibration is not None:
        block["calibration"] = calibration      # {"dataset", "rows", "length", "measurement_rows", "measurement_length"}
    if allocation is not None:
        block["allocation"] = allocation
    return block


def check(block, path: str | os.PathLike) -> dict:
    """A config.json's quantization_config, checked; UnsupportedModelError for another tool's
    quantization, ModelFileError (naming `path`) for a malformed block."""
    if not isinstance(block, dict):
        raise ModelFileError(path, "'quantization_config' must be an object")
    method = block.get("quant_method")
    if method != QUANT_METHOD:
        raise UnsupportedModelError(
            f"{os.fspath(path)}: quantized with {method or 'an unnamed method'!r}; trimtab loads float models, "
            f"GGUF files and its own quantized format (quant_method {QUANT_METHOD!r}, made by `trimtab convert`)")

    def fail(problem: str) -> ModelFileError:
        return ModelFileError(path, f"quantization_config: {problem}")

    version = block.get("format_version")
    if not _is_int(version) or version < 1:
        raise fail(f"'format_version' must be a positive integer, found {version!r}")
    if version > FORMAT_VERSION:
        raise fail(f"format_version {version} was written by a newer trimtab; this one reads version {FORMAT_VERSION}")
    if block.get("method") not in METHODS:
        raise fail(f"'method' must be one of {', '.join(METHODS)}, found {block.get('method')!r}")
    for key in ("bits", "bits_per_weight"):
        value = block.get(key)
        if not _is_number(value) or not 0 < value <= 2 * MAX_BITS:
            raise fail(f"{key!r} must be a number of bits per weight, found {value!r}")
    if block.get("head_bits") not in WIDTHS or not _is_int(block.get("head_bits")):
        raise fail(f"'head_bits' must be one of {', '.join(map(str, WIDTHS))}, found {block.get('head_bits')!r}")
    if not _is_int(block.get("group_size")) or block["group_size"] < 1:
        raise fail(f"'group_size' must be a positive integer, found {block.get('group_size')!r}")
    if "calibration" in block and not isinstance(block["calibration"], dict):
        raise fail(f"'calibration' must be an object, found {block['calibration']!r}")
    return block


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
