"""Generation settings as users pass them (text-generation-webui's names), checked and typed."""
from __future__ import annotations

import math
from dataclasses import dataclass

from trimtab.backend.errors import TrimtabError
from trimtab.backend.sampling import SamplingSettings

DEFAULT_MAX_NEW_TOKENS = 512


@dataclass(frozen=True)
class GenerationSettings:
    sampling: SamplingSettings
    max_new_tokens: int


def _number(name: str, value, *, low: float, high: float, integer: bool = False):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TrimtabError(f"setting {name} must be a number, got {value!r}")
    if integer and int(value) != value:
        raise TrimtabError(f"setting {name} must be a whole number, got {value!r}")
    if not math.isfinite(value) or not low <= value <= high:
        raise TrimtabError(f"setting {name}={value!r} is out of range [{low}, {high}]")
    return int(value) if integer else float(value)


def parse_settings(settings: dict) -> GenerationSettings:
    """Check keyword settings; unknown names are an error, never silently dropped."""
    known = {"temperature", "top_p", "top_k", "seed", "max_new_tokens"}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise TrimtabError(f"unknown setting(s): {', '.join(unknown)}; supported: {', '.join(sorted(known))}")
    defaults = SamplingSettings()
    seed = settings.get("seed")
    sampling = SamplingSettings(
        temperature=_number("temperature", settings.get("temperature", defaults.temperature), low=0, high=10),
        top_p=_number("top_p", settings.get("top_p", defaults.top_p), low=0, high=1),
        top_k=_number("top_k", settings.get("top_k", defaults.top_k), low=0, high=2**31, integer=True),
        seed=None if seed is None or seed == -1 else _number("seed", seed, low=0, high=2**63 - 1, integer=True),
    )
    if sampling.top_p == 0:
        raise TrimtabError("setting top_p=0 leaves no token to sample; use temperature=0 for greedy decoding")
    max_new = _number("max_new_tokens", settings.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS),
                      low=1, high=2**20, integer=True)
    return GenerationSettings(sampling=sampling, max_new_tokens=max_new)
