"""`trimtab eval`: perplexity of a model, or its KL divergence from a reference, on a text file.

    trimtab eval ppl -m MODEL --text FILE [--ctx 512] [--max-tokens N]
    trimtab eval kld -m MODEL --ref FLOAT_MODEL --text FILE [--ctx 512] [--max-tokens N]
"""
from __future__ import annotations

import argparse
from pathlib import Path

from trimtab.backend.errors import TrimtabError
from trimtab.plugin.drift_cli import positive_int


def add_eval_command(commands) -> None:
    from trimtab.plugin.cli import add_model_options  # imported here: cli.py imports this module

    p = commands.add_parser("eval", help="perplexity, or KL divergence from a reference model, on a text file",
                            description=__doc__.split("\n\n")[0])
    p.add_argument("metric", choices=["ppl", "kld"], help="ppl: perplexity; kld: KL(reference ‖ model) in nats")
    add_model_options(p)
    p.add_argument("--ref", help="the reference (float) model for kld: HF dir, .gguf or 'default'")
    p.add_argument("--text", required=True, help="UTF-8 text file to evaluate on (held-out text)")
    p.add_argument("--ctx", type=positive_int, default=512, help="tokens per window (default 512)")
    p.add_argument("--max-tokens", type=positive_int, help="use only the first N tokens of the text")
    p.set_defaults(run=cmd_eval)


def read_text(path: str) -> str:
    try:
        return Path(path).expanduser().read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TrimtabError(f"{path}: no such file") from None
    except UnicodeDecodeError as e:
        raise TrimtabError(f"{path}: not UTF-8 text (bad byte at offset {e.start})") from None
    except OSError as e:
        raise TrimtabError(f"{path}: cannot be read: {e.strerror or e}") from None


def cmd_eval(args: argparse.Namespace) -> int:
    from trimtab.backend import evaluate
    from trimtab.backend.api import load

    if args.metric == "kld" and not args.ref:
        raise TrimtabError("eval kld needs --ref, the model to compare against (e.g. the float model)")
    text = read_text(args.text)
    model = load(args.model, device=args.device)
    ids = evaluate.evaluation_tokens(model, text, args.max_tokens)
    if args.metric == "ppl":
        ppl = evaluate.perplexity(model, ids, args.ctx)
        print(f"perplexity {ppl:.4f} over {len(ids) // args.ctx} windows of {args.ctx} tokens ({model.name})")
        return 0
    reference = load(args.ref, device=args.device)
    if evaluate.evaluation_tokens(reference, text, args.max_tokens) != ids:
        raise TrimtabError(f"{args.model} and {args.ref} tokenize the text differently; KL divergence needs "
                           "models with the same tokenizer")
    kld = evaluate.kl_divergence(model, reference, ids, args.ctx)
    print(f"KL divergence {kld.mean:.6f} nats per token, top-1 agreement {kld.top1_agreement:.2%}, over "
          f"{kld.positions} positions ({model.name} against {reference.name})")
    return 0
