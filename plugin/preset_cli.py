"""`trimtab preset check`, `trimtab preset import` and `trimtab preset export`: what the guard
makes of a text-generation-webui preset, a vetted copy of it, and the vetted presets for webui."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from trimtab.backend.errors import TrimtabError
from trimtab.backend.guard import ModelTraits, Override, guard, show_value as show
from trimtab.backend.presets import load_preset, write_preset
from trimtab.backend.settings import SETTINGS, UNSUPPORTED, is_neutral
from trimtab.plugin.webui_cli import add_webui_dir_arguments

EXIT_CLEAN, EXIT_WOULD_CHANGE, EXIT_MALFORMED = 0, 1, 2


def add_preset_commands(subparsers) -> None:
    """Add `preset check`, `preset import` and `preset export` to the `trimtab` command line's subparsers."""
    p = subparsers.add_parser("preset", help="check, import or export text-generation-webui presets")
    actions = p.add_subparsers(dest="preset_command", metavar="ACTION")
    actions.required = True

    p = actions.add_parser(
        "check", help="explain what trimtab's guard does to each setting of a preset",
        description="Explain, line by line, what trimtab's guard keeps, changes (and why) or ignores in "
                    "text-generation-webui preset files (YAML or JSON). Exit status: 0 if nothing would "
                    "change, 1 if something would, 2 if a file cannot be read as a preset.")
    p.add_argument("files", nargs="+", metavar="FILE", help="preset files (.yaml, .yml, .json)")
    add_model_kind_options(p)
    p.set_defaults(run=cmd_preset_check)

    p = actions.add_parser(
        "import", help="write a vetted copy of a preset",
        description="Write a vetted copy of a text-generation-webui preset: unsafe values replaced by the "
                    "guard's, settings trimtab does not support dropped (listed in a comment).")
    p.add_argument("file", metavar="FILE", help="the preset file (.yaml, .yml, .json)")
    p.add_argument("-o", "--out", help="where to write it (default: NAME.vetted.yaml next to FILE)")
    p.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    add_model_kind_options(p)
    p.set_defaults(run=cmd_preset_import)

    p = actions.add_parser(
        "export", help="write the vetted presets into a text-generation-webui checkout",
        description="Write trimtab's vetted presets (precise, balanced, creative) as trimtab-NAME.yaml into a "
                    "text-generation-webui checkout's presets folder (user_data/presets/, or presets/ in older "
                    "checkouts), where its Parameters tab lists them. A file there with other settings is "
                    "never replaced without --force.")
    add_webui_dir_arguments(p, force_help="replace trimtab-NAME.yaml files that hold other settings")
    p.set_defaults(run=cmd_preset_export)


def add_model_kind_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-model", action="store_true",
                   help="check as for a base model (no chat template): EOS bans are kept, with a warning")
    p.add_argument("--eos-id", type=int, action="append", metavar="ID",
                   help="the model's EOS token id, to find it in custom_token_bans and logit_bias (repeatable)")


def traits_of(args: argparse.Namespace) -> ModelTraits:
    return ModelTraits(has_chat_template=not args.base_model, eos_token_ids=tuple(args.eos_id or ()))


def describe_model(args: argparse.Namespace, *, hint: bool = True) -> str:
    kind = ("a base model (no chat template)" if args.base_model else
            "an instruct model (one with a chat template" + ("; pass --base-model for a base model)" if hint else ")"))
    eos = (f"EOS token id {', '.join(map(str, args.eos_id))}" if args.eos_id else
           "EOS token id unknown, so token bans and logit_bias are not checked for it"
           + (" (pass --eos-id)" if hint else ""))
    return f"checked as for {kind}; {eos}"


def explain(values: dict, overrides: list[Override]) -> tuple[list[str], bool]:
    """One line per setting of the preset (then per default the guard changes), and whether
    anything would run differently from what the preset says."""
    by_field = {o.field: o for o in overrides}
    lines, differs = [], False
    for name, value in values.items():
        override = by_field.pop(name, None)
        if name in UNSUPPORTED:
            if is_neutral(name, value):
                lines.append(f"{name}: {show(value)}: kept (not supported by trimtab, but this value does nothing)")
            else:
                lines.append(f"{name}: {show(value)}: not supported by trimtab; ignored")
                differs = True
        else:
            line, changed = describe(override)
            lines.append(f"{name}: {show(value)}: {line}")
            differs |= changed
    for override in by_field.values():  # defaults the preset left alone
        line, changed = describe(override)
        lines.append(f"{override.field} (not in the preset): {line}")
        differs |= changed
    return lines, differs


def describe(override: Override | None) -> tuple[str, bool]:
    if override is None:
        return "kept", False
    if override.reason.startswith("warning: "):
        return f"kept, with a warning: {override.reason.removeprefix('warning: ')}", False
    return f"changed to {show(override.applied)} because {override.reason}", True


def check_one(path: str, args: argparse.Namespace) -> int:
    try:
        values = load_preset(Path(path))
        _, overrides = guard(values, traits_of(args), "enforce", source=path)
    except TrimtabError as e:
        print(f"trimtab: error: {e}", file=sys.stderr)
        return EXIT_MALFORMED
    lines, differs = explain(values, overrides)
    print(f"{path}: {describe_model(args)}")
    for line in lines:
        print(f"  {line}")
    print(f"{path}: {'some settings would change' if differs else 'nothing would change'}")
    return EXIT_WOULD_CHANGE if differs else EXIT_CLEAN


def cmd_preset_check(args: argparse.Namespace) -> int:
    return max(check_one(path, args) for path in args.files)


def cmd_preset_import(args: argparse.Namespace) -> int:
    source = Path(args.file)
    out = Path(args.out) if args.out else source.with_name(f"{source.stem}.vetted.yaml")
    if out.exists() and not args.force:
        raise TrimtabError(f"{out} already exists; choose another path with -o or pass --force to overwrite it")
    values = load_preset(source)
    settings, overrides = guard(values, traits_of(args), "enforce", source=str(source))
    changed = [o for o in overrides if o.field in SETTINGS and o.applied != o.asked]
    dropped = [name for name in values if name in UNSUPPORTED]
    kept_names = [name for name in values if name in SETTINGS]
    vetted = {name: getattr(settings, name) for name in kept_names + [o.field for o in changed if o.field not in values]}

    comment = [f"Vetted by trimtab from {source.name}, {describe_model(args, hint=False)}."]
    comment += [f"Changed {o.field} from {show(o.asked)} to {show(o.applied)}: {o.reason}" for o in changed]
    if dropped:
        comment.append(f"Dropped, not supported by trimtab: {', '.join(dropped)}")
    write_preset(vetted, out, overwrite=args.force, comment="\n".join(comment))

    lines, _ = explain(values, overrides)
    for line in lines:
        print(f"  {line}")
    print(f"wrote {out}: {len(changed)} changed, {len(dropped)} dropped")
    return 0


def cmd_preset_export(args: argparse.Namespace) -> int:
    from trimtab.plugin.webui.preset_export import export_presets

    for path, state in export_presets(args.webui_dir, force=args.force):
        print(f"{state} {path}")
    return 0
