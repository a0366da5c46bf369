"""The `trimtab` command line: generate, chat, import-gguf."""
from __future__ import annotations

import argparse
import os
import sys

from trimtab.backend.errors import TrimtabError
from trimtab.plugin.app_cli import add_app_command
from trimtab.plugin.convert_cli import add_convert_command
from trimtab.plugin.drift_cli import add_drift_command
from trimtab.plugin.eval_cli import add_eval_command
from trimtab.plugin.preset_cli import add_preset_commands
from trimtab.plugin.webui_cli import add_webui_extension_command

SAMPLE_PROMPT = "What is the capital of France?"


def add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", default="default",
                   help="HF model dir, .gguf file, or 'default' (embedded SmolLM2-135M-Instruct)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="activations' dtype (default: float32 on the CPU, bfloat16 on a GPU)")


def add_tensor_parallel_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tensor-parallel", type=int, metavar="N",
                   help="split every layer across N processes started by `torchrun --nproc-per-node N` "
                        "(NCCL on GPUs, gloo on the CPU); rank 0 prints")


SAMPLING_OPTIONS = {  # option → (type, help); each maps to the webui setting of the same name
    "max_new_tokens": (int, "most tokens to generate (default 512)"),
    "temperature": (float, "0 for greedy decoding"),
    "top_p": (float, "nucleus sampling mass"),
    "top_k": (int, "keep only the k most likely tokens"),
    "min_p": (float, "drop tokens below this fraction of the best one's probability"),
    "repetition_penalty": (float, "above 1 discourages repeats (the guard caps it at 1.01)"),
    "seed": (int, "random seed for reproducible sampling"),
}


def add_sampling_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", help="vetted preset (precise, balanced, creative) or a webui preset file; "
                                    "default balanced")
    p.add_argument("--guard", default="enforce", choices=["enforce", "warn", "off"],
                   help="enforce (default) replaces unsafe settings; warn only reports them; off is on you")
    for name, (kind, help_text) in SAMPLING_OPTIONS.items():
        p.add_argument("--" + name.replace("_", "-"), type=kind, help=help_text)
    p.add_argument("--stop", action="append", help="stop string (repeatable); never printed")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other webui setting, e.g. --set typical_p=0.9 (value parsed as YAML)")


def sampling_settings(args: argparse.Namespace) -> dict:
    import yaml

    settings = {name: getattr(args, name) for name in SAMPLING_OPTIONS if getattr(args, name) is not None}
    if args.stop:
        settings["stop"] = args.stop
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise TrimtabError(f"--set takes KEY=VALUE, got {item!r}")
        try:
            settings[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise TrimtabError(f"--set {key}: cannot read the value {value!r}") from None
    return {"preset": args.preset, "guard": args.guard, **settings}


def report_overrides(overrides) -> None:
    for o in overrides:
        print(f"trimtab: guard: {o.field}: {o.asked!r} → {o.applied!r} ({o.reason})", file=sys.stderr)


def load_model(args: argparse.Namespace):
    from trimtab.backend.api import load

    parallel = getattr(args, "tensor_parallel", None)
    if parallel is not None and parallel < 1:
        raise TrimtabError(f"--tensor-parallel takes a number of processes (1 or more), got {parallel}")
    model = load(args.model, device=args.device, tensor_parallel=parallel, dtype=getattr(args, "dtype", None))
    if model.transformer.tp.rank != 0:  # every rank computes; one prints
        sys.stdout = open(os.devnull, "w")
    return model


def print_stream(stream) -> str:
    """Print a reply as it decodes; Ctrl-C stops the reply (not the program). → the text shown."""
    report_overrides(stream.overrides)
    shown = []
    try:
        for piece in stream:
            shown.append(piece)
            print(piece, end="", flush=True)
    except KeyboardInterrupt:
        print(" [stopped]", end="")
    print(flush=True)
    return "".join(shown)


def cmd_generate(args: argparse.Namespace) -> int:
    model = load_model(args)
    print_stream(model.stream(args.prompt, **sampling_settings(args)))
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    if args.message is None and args.tensor_parallel:
        raise TrimtabError("an interactive chat cannot run under --tensor-parallel (every rank would need your "
                           "input); pass the message as an argument")
    model = load_model(args)
    history = [{"role": "system", "content": args.system}] if args.system else []
    settings = sampling_settings(args)
    if args.message is not None:  # one question, one answer: scriptable
        print_stream(model.stream(history + [{"role": "user", "content": args.message}], **settings))
        return 0
    print(f"trimtab chat with {model.name} — /reset clears the conversation, /exit or Ctrl-D quits.")
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            print()
            return 0
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            history = history[:1] if args.system else []
            continue
        if not line:
            continue
        history.append({"role": "user", "content": line})
        print("assistant> ", end="", flush=True)
        reply = print_stream(model.stream(history, **settings))
        history.append({"role": "assistant", "content": reply})


def confirm(question: str) -> bool:
    if not sys.stdin.isatty():
        return False
    return input(f"{question} [y/N] ").strip().lower() in ("y", "yes")


def cmd_import_gguf(args: argparse.Namespace) -> int:
    from pathlib import Path

    from trimtab.backend.gguf_loader import read_gguf
    from trimtab.backend.hf_export import write_hf_dir

    out = Path(args.out_dir)
    overwrite = args.force
    if out.exists() and any(out.iterdir()) and not overwrite:
        if not confirm(f"{out} is not empty; overwrite the model files in it?"):
            raise TrimtabError(f"{out} is not empty; choose another directory or pass --force to overwrite")
        overwrite = True
    contents = read_gguf(args.file)
    write_hf_dir(contents, out, overwrite=overwrite, dtype=args.dtype)
    print(f"wrote {out} (config.json, model.safetensors, tokenizer files)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trimtab", description="Quantized LLM inference that stays on course.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    p = commands.add_parser("generate", help="continue a text prompt")
    p.add_argument("prompt", help="the text to continue")
    add_model_options(p)
    add_tensor_parallel_option(p)
    add_sampling_options(p)
    p.set_defaults(run=cmd_generate)

    p = commands.add_parser("chat", help="chat with the model's own template (one message, or interactive)")
    p.add_argument("message", nargs="?", help="answer this one message and exit (omit for an interactive chat)")
    p.add_argument("--system", help="a system prompt")
    add_model_options(p)
    add_tensor_parallel_option(p)
    add_sampling_options(p)
    p.set_defaults(run=cmd_chat)

    p = commands.add_parser("import-gguf", help="write a GGUF file out as a Hugging Face model dir")
    p.add_argument("file", help="the .gguf file")
    p.add_argument("out_dir", help="where to write config.json, model.safetensors and tokenizer files")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--force", action="store_true", help="overwrite model files already in OUT_DIR")
    p.set_defaults(run=cmd_import_gguf)

    add_convert_command(commands)
    add_preset_commands(commands)
    add_drift_command(commands)
    add_eval_command(commands)
    add_app_command(commands)
    add_webui_extension_command(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except TrimtabError as e:
        print(f"trimtab: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ntrimtab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
