"""`trimtab install-webui-extension DIR`: install trimtab into a text-generation-webui checkout."""
from __future__ import annotations

import argparse


def add_webui_extension_command(commands) -> None:
    """Add `install-webui-extension` to the `trimtab` command line's subparsers."""
    p = commands.add_parser(
        "install-webui-extension", help="install trimtab as a text-generation-webui extension",
        description="Write trimtab's extension (one script.py that loads trimtab.plugin.webui) into a "
                    "text-generation-webui checkout: user_data/extensions/trimtab/, or extensions/trimtab/ in "
                    "older checkouts. Nothing else is touched. trimtab must also be installed in the Python "
                    "that runs webui (see docs/WEBUI.md).")
    add_webui_dir_arguments(p, force_help="replace the script.py of a different extension that is also named trimtab")
    p.set_defaults(run=cmd_install_webui_extension)


def add_webui_dir_arguments(p: argparse.ArgumentParser, *, force_help: str) -> None:
    """DIR (a text-generation-webui checkout) and --force, for the commands that write into one."""
    p.add_argument("webui_dir", metavar="DIR", help="the text-generation-webui checkout")
    p.add_argument("--force", action="store_true", help=force_help)


def cmd_install_webui_extension(args: argparse.Namespace) -> int:
    from trimtab.plugin.webui.install import EXTENSION_NAME, install_extension

    script, replaced = install_extension(args.webui_dir, force=args.force)
    print(f"{'updated' if replaced else 'wrote'} {script}")
    print(f"start webui with --extensions {EXTENSION_NAME} (or tick it in its Session tab); "
          f"`trimtab preset export {args.webui_dir}` adds trimtab's presets to its Parameters tab")
    return 0
