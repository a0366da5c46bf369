"""`trimtab drift`: do long answers stay on topic and end naturally, per prompt and preset?

    trimtab drift -m MODEL --prompts FILE.jsonl --presets A,B,... [--max-new-tokens 512] [--out DIR]

Each preset entry is NAME_OR_PATH[@GUARDMODE] (guard mode enforce, warn or off; enforce by
default), e.g. `--presets presets/unsafe/seed-unsafe.yaml@off,presets/unsafe/seed-unsafe.yaml,balanced`.
Writes DIR/drift.json and DIR/drift.png and prints the summary as a markdown table.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from trimtab.backend.drift import GUARD_MODES, DriftConfig, check_dependencies, read_prompts, run_drift
from trimtab.backend.errors import TrimtabError

GUARD_LABELS = {"enforce": "guard on", "warn": "guard warn", "off": "guard off"}
PRESET_SUFFIXES = (".yaml", ".yml")


def _is_path(preset: str) -> bool:
    return preset.lower().endswith(PRESET_SUFFIXES) or "/" in preset or "\\" in preset


def parse_preset_entry(entry: str) -> DriftConfig:
    """`NAME_OR_PATH[@GUARDMODE]` → a DriftConfig labelled "<name or file stem> (guard <mode>)"."""
    preset, at, guard = entry.strip().rpartition("@")
    if not at:
        preset, guard = guard, "enforce"
    preset, guard = preset.strip(), guard.strip()
    if not preset:
        raise TrimtabError(f"--presets: {entry!r} names no preset")
    if guard not in GUARD_MODES:
        raise TrimtabError(f"--presets: {entry!r}: unknown guard mode {guard!r} (use {', '.join(GUARD_MODES)})")
    if _is_path(preset):
        path = Path(preset).expanduser()
        if not path.is_file():
            raise TrimtabError(f"--presets: {path}: no such preset file")
        return DriftConfig(f"{path.stem} ({GUARD_LABELS[guard]})", str(path), guard)
    return DriftConfig(f"{preset} ({GUARD_LABELS[guard]})", preset, guard)


def parse_presets(text: str) -> list[DriftConfig]:
    configs = [parse_preset_entry(entry) for entry in text.split(",") if entry.strip()]
    if not configs:
        raise TrimtabError("--presets: name at least one preset")
    labels = [c.label for c in configs]
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise TrimtabError(f"--presets: {', '.join(repeated)} given more than once")
    return configs


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def cmd_drift(args: argparse.Namespace) -> int:
    # every mistake that can be caught before loading the model and generating, is
    configs = parse_presets(args.presets)
    prompts = read_prompts(args.prompts)[:args.limit]
    check_dependencies()
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise TrimtabError(f"--out: {out} exists and is not a directory")
    from trimtab.plugin import cli  # imported here: cli.py imports this module

    model = cli.load_model(args)
    report = run_drift(model, prompts, configs, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    out.mkdir(parents=True, exist_ok=True)
    report.to_json(out / "drift.json")
    report.plot(out / "drift.png")
    print(report.markdown_table())
    print(f"\nwrote {out / 'drift.json'} and {out / 'drift.png'}")
    return 0


def add_drift_command(subparsers) -> argparse.ArgumentParser:
    from trimtab.plugin.cli import add_model_options  # imported here: cli.py imports this module

    p = subparsers.add_parser("drift", help="measure whether long answers stay on topic and end naturally",
                              description=__doc__.split("\n\n")[0])
    add_model_options(p)
    p.add_argument("--prompts", required=True, help='JSONL file of {"topic": ..., "prompt": ...} lines')
    p.add_argument("--presets", required=True,
                   help="comma-separated NAME_OR_PATH[@enforce|warn|off] entries (guard enforce by default), "
                        "e.g. presets/unsafe/seed-unsafe.yaml@off,presets/unsafe/seed-unsafe.yaml,balanced")
    p.add_argument("--max-new-tokens", type=positive_int, default=512)
    p.add_argument("--batch-size", type=positive_int, default=8, help="prompts generated together")
    p.add_argument("--limit", type=positive_int, help="use only the first N prompts (a quick check)")
    p.add_argument("--out", default="out", help="where to write drift.json and drift.png (default ./out)")
    p.set_defaults(run=cmd_drift)
    return p
