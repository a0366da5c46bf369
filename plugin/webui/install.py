"""Where things go in a text-generation-webui checkout, and `trimtab install-webui-extension`.

Two layouts: current webui keeps user files under user_data/ (user_data/extensions/NAME/script.py,
user_data/presets/NAME.yaml) and loads a user extension's script.py by its file path; older
checkouts have extensions/NAME/script.py and presets/ at the top. The extension installed is
one thin script.py that re-exports `trimtab.plugin.webui.extension`'s hooks, so it works
however webui loads it (by file path, or as a package module) and updates with trimtab.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from trimtab.backend.errors import TrimtabError

EXTENSION_NAME = "trimtab"
MARKER = "# trimtab webui extension: written by `trimtab install-webui-extension`"
SCRIPT = f'''{MARKER}; running it again replaces this file.
"""text-generation-webui extension: replies from trimtab's quantized engine, settings through its guard.

The extension lives in the trimtab package (trimtab.plugin.webui); this file hands webui its hooks.
"""
try:
    from trimtab.plugin.webui.extension import custom_generate_reply, params, setup, state_modifier, ui  # noqa: F401
except ModuleNotFoundError as error:
    if (error.name or "").split(".")[0] != "trimtab":
        raise
    import sys

    raise ModuleNotFoundError(
        "the trimtab extension needs the trimtab package (with trimtab.plugin.webui) in the Python that runs "
        f"text-generation-webui ({{sys.executable}}): install or upgrade it there (see trimtab's docs/WEBUI.md)") from None
'''


@dataclass(frozen=True)
class WebuiLayout:
    root: Path
    extensions: Path   # where extension folders go
    presets: Path      # where preset files go


def find_layout(webui_dir: str | os.PathLike) -> WebuiLayout:
    """The layout of a webui checkout; TrimtabError if the directory does not look like one."""
    root = Path(webui_dir).expanduser()
    if not root.is_dir():
        raise TrimtabError(f"{root}: no such directory" if not root.exists() else f"{root}: not a directory")
    if (root / "user_data").is_dir():
        return WebuiLayout(root, root / "user_data" / "extensions", root / "user_data" / "presets")
    if (root / "extensions").is_dir():
        return WebuiLayout(root, root / "extensions", root / "presets")
    raise TrimtabError(f"{root} does not look like a text-generation-webui checkout: "
                       "it has neither a user_data/ nor an extensions/ folder")


def install_extension(webui_dir: str | os.PathLike, *, force: bool = False) -> tuple[Path, bool]:
    """Write the extension's script.py; → (its path, whether an earlier one was replaced).
    Only that file (and its folder) is written. A different extension of the same name is left
    alone unless `force`, which replaces its script.py."""
    folder = find_layout(webui_dir).extensions / EXTENSION_NAME
    script = folder / "script.py"
    if folder.exists() and not folder.is_dir():
        raise TrimtabError(f"{folder} exists and is not a folder; not touching it")
    ours = script.is_file() and MARKER in script.read_text(encoding="utf-8", errors="replace")
    theirs = folder.is_dir() and any(p.name != "__pycache__" for p in folder.iterdir())
    if theirs and not ours and not force:
        raise TrimtabError(f"{folder} holds a different extension named {EXTENSION_NAME}; not touching it "
                           "(rename that folder, or pass --force to replace its script.py)")
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / ".script.py.trimtab-tmp"
    tmp.write_text(SCRIPT, encoding="utf-8")
    os.replace(tmp, script)  # an earlier script.py stays whole until the new one is complete
    return script, theirs
