"""Presets: trimtab's vetted ones (presets/*.yaml) and text-generation-webui preset files.

A preset maps settings names (webui's, or an alias from settings.ALIASES) to values. Reading
one checks every key and value against the settings table, so a nonsense file fails here with
the file and the key named, before anything is generated. Whether the values are *safe* is the
guard's job (backend/guard.py), not this module's.
"""
from __future__ import annotations

import difflib
import json
import os
import re
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

import yaml

from trimtab.backend.errors import TrimtabError
from trimtab.backend.settings import SETTINGS, canonical_name, check_value

VETTED_PRESETS = ("precise", "balanced", "creative")
DEFAULT_PRESET = "balanced"
PRESET_SUFFIXES = (".yaml", ".yml", ".json")
MAX_PRESET_BYTES = 1 << 20  # a preset is a few lines; anything this big is not one


def load_preset(preset: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    """A vetted preset's name, a webui preset file (.yaml/.yml/.json) or a dict → canonical
    settings names → checked values. TrimtabError naming the file and key for anything wrong."""
    if isinstance(preset, Mapping):
        return canonical_settings(preset, source="preset")
    if isinstance(preset, str) and preset in VETTED_PRESETS:
        text = resources.files("trimtab.presets").joinpath(f"{preset}.yaml").read_text(encoding="utf-8")
        return canonical_settings(_parse(text, f"vetted preset {preset!r}", ".yaml"), source=f"vetted preset {preset!r}")
    if not isinstance(preset, (str, os.PathLike)):
        raise TrimtabError(f"preset must be a vetted preset's name ({', '.join(VETTED_PRESETS)}), "
                           f"a preset file's path or a dict, got {type(preset).__name__}")
    path = Path(preset).expanduser()
    return canonical_settings(_read_file(path, preset), source=str(path))


def canonical_settings(values: Mapping[str, Any], *, source: str) -> dict[str, Any]:
    """Keys resolved to canonical names (unknown → error with a suggestion), supported values
    checked and converted, unsupported webui settings passed through for the guard to report."""
    out: dict[str, Any] = {}
    given_as: dict[str, str] = {}
    for key, value in values.items():
        if not isinstance(key, str):
            raise TrimtabError(f"{source}: setting names must be text, got {key!r}")
        name = canonical_name(key, source=source)
        if name in out:
            raise TrimtabError(f"{source}: {name} is given twice (as {given_as[name]} and as {key})")
        given_as[name] = key
        out[name] = check_value(name, value, source=source) if name in SETTINGS else value
    return out


def write_preset(values: Mapping[str, Any], path: str | os.PathLike, *, overwrite: bool = False,
                 comment: str = "") -> Path:
    """Write settings as a webui preset file (YAML, or JSON for a .json path), checked first.
    An existing file is never replaced unless `overwrite`; `comment` heads a YAML file."""
    path = Path(path).expanduser()
    if path.suffix.lower() not in PRESET_SUFFIXES:
        raise TrimtabError(f"{path}: a preset file ends in {', '.join(PRESET_SUFFIXES)}")
    data = {name: _plain(name, value) for name, value in canonical_settings(values, source=str(path)).items()}
    if path.suffix.lower() == ".json":
        text = json.dumps(data, indent=2) + "\n"
    else:
        header = "".join(f"# {line}".rstrip() + "\n" for line in comment.splitlines())
        text = header + yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True)
    if not overwrite:
        try:
            with open(path, "x", encoding="utf-8") as f:  # "x": fails if the file exists, atomically
                f.write(text)
        except FileExistsError:
            raise TrimtabError(f"{path} already exists; not overwriting it") from None
        return path
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)  # the old file stays whole until the new one is complete
    return path


def _plain(name: str, value: Any) -> Any:
    """A checked value in the form webui's preset files use."""
    if name == "custom_token_bans":
        return ", ".join(str(t) for t in value)  # webui keeps token bans as "1, 2, 3"
    if name == "seed" and value is None:
        return -1  # webui's "random seed"
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, Mapping):
        return dict(value)
    return value


def _read_file(path: Path, asked) -> Any:
    if not path.is_file():
        if isinstance(asked, str) and os.sep not in asked and not path.suffix:
            close = difflib.get_close_matches(asked, VETTED_PRESETS, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise TrimtabError(f"preset {asked!r} is neither a vetted preset ({', '.join(VETTED_PRESETS)}) "
                               f"nor a file{hint}")
        raise TrimtabError(f"{path}: no such preset file" if not path.exists() else f"{path}: not a file")
    if path.suffix.lower() not in PRESET_SUFFIXES:
        raise TrimtabError(f"{path}: not a preset file (expected {', '.join(PRESET_SUFFIXES)})")
    if path.stat().st_size > MAX_PRESET_BYTES:
        raise TrimtabError(f"{path}: {path.stat().st_size} bytes is too big for a preset file")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise TrimtabError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise TrimtabError(f"{path}: cannot read it: {e.strerror}") from None
    return _parse(text, str(path), path.suffix.lower())


def _parse(text: str, source: str, suffix: str) -> Mapping:
    if suffix == ".json":
        try:
            data = json.loads(text, object_pairs_hook=_no_duplicate_keys)
        except json.JSONDecodeError as e:
            raise TrimtabError(f"{source}: line {e.lineno}: invalid JSON: {e.msg}") from None
        except _DuplicateKey as e:
            raise TrimtabError(f"{source}: {e}") from None
    else:
        try:
            data = yaml.load(text, Loader=_PresetLoader)  # noqa: S506 — a SafeLoader subclass
        except yaml.MarkedYAMLError as e:
            mark = e.problem_mark or e.context_mark
            where = f"line {mark.line + 1}: " if mark else ""
            raise TrimtabError(f"{source}: {where}invalid YAML: {e.problem or e.context}") from None
        except yaml.YAMLError as e:
            raise TrimtabError(f"{source}: invalid YAML: {e}") from None
    if data is None:
        raise TrimtabError(f"{source}: the file is empty; a preset maps setting names to values")
    if not isinstance(data, Mapping):
        raise TrimtabError(f"{source}: a preset maps setting names to values, but this file holds "
                           f"a {_yaml_kind(data)}")
    return data


def _yaml_kind(data) -> str:
    return {list: "list", str: "string", int: "number", float: "number", bool: "boolean"}.get(type(data), type(data).__name__)


class _DuplicateKey(ValueError):
    pass


def _no_duplicate_keys(pairs):
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateKey(f"{key} is given twice")
        seen[key] = value
    return seen


class _PresetLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys (YAML would keep the last one silently) and reads
    1e9 as a number, as YAML 1.2 and JSON do (YAML 1.1 wants a dot: 1.0e+9)."""


def _construct_mapping(loader: _PresetLoader, node: yaml.MappingNode) -> dict:
    loader.flatten_mapping(node)
    out = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            duplicate = key in out
        except TypeError:
            raise yaml.constructor.ConstructorError(None, None, f"a {key_node.id} cannot be a key",
                                                    key_node.start_mark) from None
        if duplicate:
            raise yaml.constructor.ConstructorError(None, None, f"{key} is given twice", key_node.start_mark)
        out[key] = loader.construct_object(value_node, deep=True)
    return out


_PresetLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_PresetLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))
