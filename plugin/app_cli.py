"""`trimtab webui`: serve the standalone chat app (plugin/gradio_app.py, docs/APP.md).

    trimtab webui [-m MODEL] [--device cpu|cuda|auto] [--host HOST | --listen] [--port PORT]
                  [--auth USER:PASS | --auth FILE] [--preset NAME_OR_FILE] [--guard enforce|warn|off]

It binds 127.0.0.1 (this machine only) unless told otherwise; --listen (all interfaces) and
any other --host need --auth. Neither Gradio nor the model is touched before the options are
checked, and `trimtab --help` imports neither.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from trimtab.backend.errors import TrimtabError
from trimtab.backend.guard import GUARD_MODES

LISTEN_ALL = "0.0.0.0"


def add_app_command(commands) -> None:
    """Add `webui` to the `trimtab` command line's subparsers."""
    from trimtab.plugin.cli import add_model_options  # here, not at the top: cli imports this module

    p = commands.add_parser(
        "webui", help="the standalone chat app in your browser (needs trimtab[app])",
        description="Serve trimtab's chat app: load a model, pick or import a preset (with the guard's "
                    "report), chat with streaming replies and a Stop button. Binds 127.0.0.1 unless "
                    "--listen or --host says otherwise; those need --auth.")
    add_model_options(p)
    where = p.add_mutually_exclusive_group()
    where.add_argument("--host", default=None, help="address to bind (default 127.0.0.1: this machine only)")
    where.add_argument("--listen", action="store_true",
                       help=f"bind {LISTEN_ALL}, reachable from the network; needs --auth")
    p.add_argument("--port", type=int, help="port (default: the first free one from 7860)")
    p.add_argument("--auth", metavar="USER:PASS|FILE",
                   help="require a login: USER:PASS, or a file of USER:PASS lines (safer: a password on the "
                        "command line shows in the process list)")
    p.add_argument("--preset", default="balanced",
                   help="preset chosen when a page opens: precise, balanced (default), creative or a webui preset file")
    p.add_argument("--guard", default="enforce", choices=GUARD_MODES, help="guard mode chosen when a page opens")
    p.set_defaults(run=cmd_webui)


def bind_host(args: argparse.Namespace) -> str:
    from trimtab.plugin.gradio_app import DEFAULT_HOST

    return LISTEN_ALL if args.listen else (args.host or DEFAULT_HOST)


def parse_auth(value: str | None) -> list[tuple[str, str]] | None:
    """`--auth USER:PASS`, or the path of a file with one USER:PASS a line (# comments, blank
    lines skipped) → [(user, password), ...]; TrimtabError for anything else."""
    if value is None:
        return None
    path = Path(value).expanduser()
    if path.is_file():
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise TrimtabError(f"--auth {path}: cannot read it: {e}") from None
        entries = [(f"{path}: line {n}", line.strip()) for n, line in enumerate(lines, 1)
                   if line.strip() and not line.lstrip().startswith("#")]
        if not entries:
            raise TrimtabError(f"--auth {path}: no USER:PASS line in the file")
    else:
        entries = [("--auth", value)]
    users = []
    for where, entry in entries:
        user, sep, password = entry.partition(":")
        if not sep or not user.strip() or not password:  # never echo it: it may be a password
            raise TrimtabError(f"{where}: expected USER:PASS" + (" or an existing file" if where == "--auth" else ""))
        users.append((user.strip(), password))
    return users


def cmd_webui(args: argparse.Namespace) -> int:
    from trimtab.plugin import gradio_app

    host = bind_host(args)
    auth = parse_auth(args.auth)
    gradio_app.check_bind(host, auth)
    gradio_app.require_gradio()
    gradio_app.load_preset(args.preset)  # a bad --preset fails now, not after the model has loaded

    from trimtab.plugin.chat_engine import ChatEngine

    engine = ChatEngine()
    print(f"trimtab: loading {args.model} on {args.device}…", file=sys.stderr, flush=True)
    engine.load(args.model, args.device)
    models = [] if args.model == "default" else [args.model]
    gradio_app.launch(engine, host=host, port=args.port, auth=auth, preset=args.preset, guard=args.guard,
                      device=args.device, models=models)
    return 0
