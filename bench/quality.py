"""Quality of `trimtab convert --method rtn` on the embedded default model: bits per weight, convert time,
file size, peak memory while loading, and KL divergence / perplexity against the float model (the
default GGUF dequantized) on held-out text. Then the group-size sweep behind the default -g.
Writes both tables into BENCHMARKS.md (section quality_rtn).

    python bench/quality.py [--threads 2] [--tokens 4096] [--ctx 512]

Held-out text: `shared/data/text/technical.utf8` (calibrating methods must not use it).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import markdown_table, write_section  # noqa: E402

import trimtab  # noqa: E402
from trimtab.backend import evaluate  # noqa: E402
from trimtab.backend.quant.convert import DEFAULT_GROUP_SIZE, DEFAULT_HEAD_BITS, ConvertOptions, convert  # noqa: E402

HELD_OUT = Path(__file__).resolve().parents[2] / "shared" / "data" / "text" / "technical.utf8"
MAIN_BITS = (4.5, 6.5)
SWEEP_BITS = (4.5, 5.5, 6.5)
SWEEP_GROUPS = (32, 64, 128)


def measure_load(model_dir: str) -> None:
    """In a fresh process: resident memory before trimtab.load(model_dir) and its peak during it."""
    import trimtab.backend.api  # noqa: F401  (imports are not the model's memory)

    def status(key: str) -> int:
        return next(int(line.split()[1]) * 1024 for line in Path("/proc/self/status").read_text().splitlines()
                    if line.startswith(key + ":"))

    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the present size
    before = status("VmRSS")
    trimtab.load(model_dir)
    print(json.dumps({"before": before, "peak": status("VmHWM")}))


def load_peak_bytes(model_dir: Path) -> int:
    result = subprocess.run([sys.executable, __file__, "--measure-load", str(model_dir)],
                            capture_output=True, text=True, check=True)
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    return figures["peak"] - figures["before"]


def run_one(bits: float, group_size: int, work: Path, reference, ids: list[int], ctx: int, *, full: bool) -> dict:
    out = work / f"rtn-b{bits}-g{group_size}"
    result = convert(ConvertOptions(input="default", output=str(out), bits=bits, group_size=group_size, method="rtn"),
                     progress=False)
    model = trimtab.load(out)
    row = {"bits": bits, "group_size": group_size, "bpw": result.bits_per_weight, "seconds": result.seconds,
           "size": result.size_bytes, "kld": evaluate.kl_divergence(model, reference, ids, ctx, progress=False)}
    if full:
        row["ppl"] = evaluate.perplexity(model, ids, ctx, progress=False)
        row["load_peak"] = load_peak_bytes(out)
    del model
    for name in result.files:
        (out / name).unlink()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=4096, help="held-out tokens evaluated")
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--measure-load", help=argparse.SUPPRESS)  # one load, in a child process
    args = parser.parse_args()
    if args.measure_load:
        return measure_load(args.measure_load)

    torch.set_num_threads(args.threads)
    reference = trimtab.load()
    ids = evaluate.evaluation_tokens(reference, HELD_OUT.read_text(encoding="utf-8"), args.tokens)
    float_ppl = evaluate.perplexity(reference, ids, args.ctx, progress=False)
    runs = [(bits, DEFAULT_GROUP_SIZE, True) for bits in MAIN_BITS]
    runs += [(bits, g, False) for g in SWEEP_GROUPS for bits in SWEEP_BITS
             if not (g == DEFAULT_GROUP_SIZE and bits in MAIN_BITS)]
    results = {}
    with tempfile.TemporaryDirectory(prefix="trimtab-quality-") as work:
        for bits, g, full in tqdm(runs, desc="conversions"):
            results[bits, g] = run_one(bits, g, Path(work), reference, ids, args.ctx, full=full)
            tqdm.write(f"-b {bits:g} -g {g}: {results[bits, g]}")

    main_rows = [["float (GGUF Q4_1 dequantized)", "—", "—", "—", "0", "100%", f"{float_ppl:.3f}", "—"]]
    for bits in MAIN_BITS:
        r = results[bits, DEFAULT_GROUP_SIZE]
        main_rows.append([f"rtn -b {bits:g}", f"{r['bpw']:.3f}", f"{r['seconds']:.1f}", f"{r['size'] / 1e6:.1f}",
                          f"{r['kld'].mean:.4f}", f"{r['kld'].top1_agreement:.1%}", f"{r['ppl']:.3f}",
                          f"{r['load_peak'] / 1e6:.0f} ({r['load_peak'] / r['size']:.2f}×)"])
    sweep_rows = [[f"{bits:g}"] + [f"{results[bits, g]['bpw']:.3f} / {results[bits, g]['kld'].mean:.4f}"
                                   for g in SWEEP_GROUPS] for bits in SWEEP_BITS]
    body = (
        f"Embedded default model (SmolLM2-135M-Instruct): its Q4_1 GGUF dequantized is the float model, "
        f"converted with `trimtab convert -i default -b B --method rtn` (-hb {DEFAULT_HEAD_BITS}, "
        f"-g {DEFAULT_GROUP_SIZE}), {args.threads} threads. Evaluated on the first {len(ids)} tokens of "
        f"`technical.utf8` (held out: no calibration may use it), windows of {args.ctx} tokens. bpw: the "
        "decoder's linear layers, every stored bit counted (scales, mins, group metadata); the head is "
        f"{DEFAULT_HEAD_BITS}-bit and the embedding float16 on top. KLD: KL(float ‖ quantized) in nats per "
        "token. Load peak: resident memory added by `trimtab.load` in a fresh process (peak minus before), "
        "and its ratio to the files' size.\n\n"
        + markdown_table(["model", "bpw", "convert s", "files MB", "KLD", "top-1 agree", "ppl", "load peak MB"],
                         main_rows)
        + "\n\nGroup size (-g) sweep, each cell bpw / KLD. The float model's weights are themselves 4-bit "
        "groups of 32 (Q4_1), so 4-bit groups of 32 reproduce them exactly: read the g=32 column with that "
        "in mind.\n\n"
        + markdown_table(["-b"] + [f"g={g}" for g in SWEEP_GROUPS], sweep_rows)
    )
    write_section("quality_rtn", body, script="quality")
    print(body)


if __name__ == "__main__":
    main()
