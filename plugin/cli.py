"""The `trimtab` command line: generate, chat, import-gguf."""
from __future__ import annotations

import argparse
import sys

from trimtab.backend.errors import TrimtabError

SAMPLE_PROMPT = "What is the capital of France?"


def add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", default="default",
                   help="HF model dir, .gguf file, or 'default' (embedded SmolLM2-135M-Instruct)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])


def add_sampling_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, help="0 for greedy decoding (default 0.2)")
    p.add_argument("--top-p", type=float, help="nucleus sampling mass (default 0.8)")
    p.add_argument("--top-k", type=int, help="keep only the k most likely tokens (default off)")
    p.add_argument("--seed", type=int, help="random seed for reproducible sampling")


def sampling_settings(args: argparse.Namespace) -> dict:
    names = ("max_new_tokens", "temperature", "top_p", "top_k", "seed")
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def load_model(args: argparse.Namespace):
    from trimtab.backend.api import load

    return load(args.model, device=args.device)


def print_stream(stream) -> None:
    try:
        for piece in stream:
            print(piece, end="", flush=True)
    except KeyboardInterrupt:
        stream.cancel()
        for _ in stream:  # let the generator finish cleanly so the completion is recorded
            pass
        print(" [stopped]", end="")
    print(flush=True)


def cmd_generate(args: argparse.Namespace) -> int:
    model = load_model(args)
    print_stream(model.stream(args.prompt, **sampling_settings(args)))
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
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
        stream = model.stream(history, **settings)
        print_stream(stream)
        history.append({"role": "assistant", "content": stream.completion.text})


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
    add_sampling_options(p)
    p.set_defaults(run=cmd_generate)

    p = commands.add_parser("chat", help="chat with the model's own template (one message, or interactive)")
    p.add_argument("message", nargs="?", help="answer this one message and exit (omit for an interactive chat)")
    p.add_argument("--system", help="a system prompt")
    add_model_options(p)
    add_sampling_options(p)
    p.set_defaults(run=cmd_chat)

    p = commands.add_parser("import-gguf", help="write a GGUF file out as a Hugging Face model dir")
    p.add_argument("file", help="the .gguf file")
    p.add_argument("out_dir", help="where to write config.json, model.safetensors and tokenizer files")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--force", action="store_true", help="overwrite model files already in OUT_DIR")
    p.set_defaults(run=cmd_import_gguf)
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
