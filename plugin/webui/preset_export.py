"""`trimtab preset export DIR`: the vetted presets as text-generation-webui preset files.

Each goes to webui's presets folder as trimtab-NAME.yaml, holding only webui's preset
parameters (what its Parameters tab loads from a preset); anything else a vetted preset sets is
named in the file's header. A file already there is left alone when it holds the same values,
and never replaced with different ones unless asked (`force`).
"""
from __future__ import annotations

import os
from pathlib import Path

from trimtab.backend.errors import TrimtabError
from trimtab.backend.guard import show_value
from trimtab.backend.presets import VETTED_PRESETS, load_preset, write_preset
from trimtab.plugin.webui.install import find_layout
from trimtab.plugin.webui.state_keys import WEBUI_PRESET_PARAMS


def export_presets(webui_dir: str | os.PathLike, *, force: bool = False) -> list[tuple[Path, str]]:
    """→ (path, "written" | "replaced" | "unchanged") per vetted preset. Nothing is written if
    any file there differs and `force` is not set."""
    presets_dir = find_layout(webui_dir).presets
    plans = []
    for name in VETTED_PRESETS:
        values = load_preset(name)
        kept = {key: value for key, value in values.items() if key in WEBUI_PRESET_PARAMS}
        left_out = {key: value for key, value in values.items() if key not in WEBUI_PRESET_PARAMS}
        path = presets_dir / f"trimtab-{name}.yaml"
        state = "written"
        if path.exists():
            state = "unchanged" if _holds(path, kept) else "replaced"
            if state == "replaced" and not force:
                raise TrimtabError(f"{path} already exists with other settings; not overwriting it "
                                   "(pass --force to replace it)")
        plans.append((name, path, kept, left_out, state))
    presets_dir.mkdir(parents=True, exist_ok=True)
    for name, path, kept, left_out, state in plans:
        if state != "unchanged":
            write_preset(kept, path, overwrite=state == "replaced", comment=_header(name, left_out))
    return [(path, state) for _, path, _, _, state in plans]


def _holds(path: Path, values: dict) -> bool:
    try:
        return load_preset(path) == values
    except TrimtabError:  # not a preset trimtab can read: certainly not ours
        return False


def _header(name: str, left_out: dict) -> str:
    lines = [f'trimtab "{name}" preset, written by `trimtab preset export`. Choose it in the Parameters tab.']
    if left_out:
        shown = ", ".join(f"{key}: {show_value(value)}" for key, value in left_out.items())
        lines.append(f"Not webui preset parameters, so set them in the Parameters tab: {shown}")
    return "\n".join(lines)
