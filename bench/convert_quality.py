"""Quality per bit of `trimtab convert` on the embedded default model: gptq and rtn at 2.5-8 bits per
weight against llama.cpp's k-quants of the same float model, KL divergence and perplexity on held-out
text; the two allocators compared; and the time of one whole convert at -b 4 with CI-sized calibration.
Writes BENCHMARKS.md (section convert_quality) and docs/quality_vs_bits.png.

    python bench/convert_quality.py [--threads 2] [--tokens 2048] [--ctx 512] [-r 16 -l 512 -mr 8 -ml 512]
                                    [--work out/convert-quality]

The float model is the embedded Q4_1 GGUF dequantized (what trimtab.load() runs); llama.cpp's types are
made from that same file with requantizing allowed (bench/llamacpp_models.py). bpw counts the decoder's
linear layers, every stored bit (trimtab: format.py's accounting; llama.cpp: the GGUF tensor types).
Calibration: shared/data/text/wiki.utf8. Held out: shared/data/text/technical.utf8 — no calibration
reads it (bench/quality.py holds it out too).
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llamacpp_models import (LlamaCppModel, head_bits_per_weight, linear_bits_per_weight,  # noqa: E402
                             make_gguf)
from report import markdown_table, write_section  # noqa: E402

import trimtab  # noqa: E402
from trimtab.backend import evaluate  # noqa: E402
from trimtab.backend.quant import calibrated  # noqa: E402
from trimtab.backend.quant.allocate import ALLOCATORS  # noqa: E402
from trimtab.backend.quant.convert import ConvertOptions, convert, decoder_linears, read_source  # noqa: E402

TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "text"
CALIBRATION = TEXT / "wiki.utf8"
HELD_OUT = TEXT / "technical.utf8"
BITS = (2.5, 3.0, 4.0, 5.0, 6.0, 8.0)
LLAMA_CPP_TYPES = ("Q3_K_M", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0")
PLOT = Path(__file__).resolve().parents[1] / "docs" / "quality_vs_bits.png"


def evaluate_model(model, reference, ids, ctx) -> dict:
    kld = evaluate.kl_divergence(model, reference, ids, ctx, progress=False)
    return {"kld": kld.mean, "top1": kld.top1_agreement, "ppl": evaluate.perplexity(model, ids, ctx, progress=False)}


def allocator_comparison(measurement: dict, group_size: int) -> list[list]:
    """Both allocators on the same measurement at each target: total weighted error reached, and time."""
    source = read_source("default")
    linears = [n.removesuffix(".weight") for n in decoder_linears(source.weights)]
    choices = calibrated.layout_choices(measurement, linears, group_size)
    total = sum(source.weights[f"{n}.weight"].numel() for n in linears)
    rows = []
    for bits in BITS:
        cells = [f"{bits:g}"]
        for name in ("dp", "lagrangian"):
            start = time.perf_counter()
            chosen = ALLOCATORS[name](choices, int(bits * total))
            seconds = time.perf_counter() - start
            error = sum(c.error for c in chosen.values())
            cells += [f"{sum(c.cost for c in chosen.values()) / total:.4f}", f"{error:.4f}", f"{seconds * 1000:.0f}"]
        rows.append(cells)
    return rows


def plot(points: dict[str, list[tuple[float, float]]]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (label, series), marker in zip(points.items(), "osD"):
        xs, ys = zip(*sorted(series))
        ax.plot(xs, ys, marker=marker, label=label)
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (decoder linear layers, every stored bit)")
    ax.set_ylabel("KL divergence from the float model (nats/token)")
    ax.set_title("SmolLM2-135M-Instruct, held-out technical text")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    ax.set_xlim(left=2)
    fig.tight_layout()
    fig.savefig(PLOT, dpi=120)


def load_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def model_makers(args, work: Path, models: dict) -> list[tuple[str, object]]:
    """Every model of the comparison, in the order they are made: (key, make() → facts). The llama.cpp
    files and gptq at their sizes come first, the timed whole convert last (every gptq model reuses
    one measurement, from a first timed convert when there is none yet)."""
    calibration = dict(calibration=str(CALIBRATION), rows=args.rows, length=args.length,
                       measure_rows=args.measure_rows, measure_length=args.measure_length)
    measurement = work / "measurement.json"

    def trimtab_model(key, **options):
        def make():
            result = convert(ConvertOptions("default", str(work / key), **options), progress=False)
            if not measurement.is_file() and (result.output / "measurement.json").is_file():
                shutil.copyfile(result.output / "measurement.json", measurement)
            return {"path": str(result.output), "bpw": result.bits_per_weight,
                    "head_bpw": result.head_bits_per_weight, "seconds": result.seconds}
        return make

    def gguf(kind):
        def make():
            path = make_gguf(kind, work, args.threads)
            return {"path": str(path), "bpw": linear_bits_per_weight(path), "head_bpw": head_bits_per_weight(path)}
        return make

    def gptq_at(kind):
        def make():
            bits = math.floor(models[f"llama.cpp-{kind}"]["bpw"] * 1000) / 1000
            if bits >= BITS[-1]:                         # -b stops at 8: the -b 8 model stands in
                key = f"gptq-{BITS[-1]}"
                if key not in models:
                    models[key] = trimtab_model(key, bits=BITS[-1], measurement=str(measurement), **calibration)()
                return models[key]
            return trimtab_model(f"gptq@{kind}", bits=bits, measurement=str(measurement), **calibration)()
        return make

    timed = ("timed-b4", trimtab_model("timed-b4", bits=4.0, **calibration))
    makers = [] if measurement.is_file() else [timed]
    makers += [(f"llama.cpp-{kind}", gguf(kind)) for kind in ("Q4_1",) + LLAMA_CPP_TYPES]
    makers += [(f"gptq@{kind}", gptq_at(kind)) for kind in LLAMA_CPP_TYPES]
    makers += [(f"gptq-{bits}", trimtab_model(f"gptq-{bits}", bits=bits, measurement=str(measurement), **calibration))
               for bits in BITS]
    makers += [(f"rtn-{bits}", trimtab_model(f"rtn-{bits}", bits=bits, method="rtn")) for bits in BITS]
    return makers + ([timed] if measurement.is_file() else [])


def make_and_evaluate(args, work: Path) -> tuple[dict, dict]:
    """Each model made (work/models.json) then scored on the held-out text (work/evaluations.json), one
    after the other; a rerun skips what either file already holds."""
    models, scores = load_json(work / "models.json"), load_json(work / "evaluations.json")
    reference = trimtab.load()
    ids = evaluate.evaluation_tokens(reference, HELD_OUT.read_text(encoding="utf-8"), args.tokens)
    if "float" not in scores:
        scores["float"] = {"ppl": evaluate.perplexity(reference, ids, args.ctx, progress=False), "tokens": len(ids)}
    for key, make in tqdm(model_makers(args, work, models), desc="models"):
        if key not in models:
            models[key] = make()
            (work / "models.json").write_text(json.dumps(models, indent=1))
        same = [k for k in scores if k in models and k != key and models[k]["path"] == models[key]["path"]]
        if key not in scores and same:                   # a stand-in: the same files, scored once
            scores[key] = scores[same[0]]
        if key not in scores:
            path = Path(models[key]["path"])
            model = (LlamaCppModel(path, threads=args.threads, context=args.ctx) if key.startswith("llama.cpp")
                     else trimtab.load(path))
            scores[key] = evaluate_model(model, reference, ids, args.ctx)
            del model
            (work / "evaluations.json").write_text(json.dumps(scores, indent=1))
        tqdm.write(f"{key}: {models[key]} {scores[key]}")
    return models, scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=2048, help="held-out tokens evaluated")
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("-r", "--rows", type=int, default=16, help="calibration rows (CI-sized by default)")
    parser.add_argument("-l", "--length", type=int, default=512)
    parser.add_argument("-mr", "--measure-rows", type=int, default=8)
    parser.add_argument("-ml", "--measure-length", type=int, default=512)
    parser.add_argument("--work", default="out/convert-quality", help="models and partial results (reused)")
    parser.add_argument("--report-only", action="store_true", help="rewrite the section from the work dir's results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        models, scores = load_json(work / "models.json"), load_json(work / "evaluations.json")
    else:
        models, scores = make_and_evaluate(args, work)
    write_report(args, work, models, scores)


def write_report(args, work: Path, models: dict, scores: dict) -> None:
    results = {key: dict(models[key], **scores[key]) for key in models}
    measurement = json.loads((work / "measurement.json").read_text())
    ci = results.pop("timed-b4")
    float_ppl, tokens = scores["float"]["ppl"], scores["float"]["tokens"]

    def cells(name, r):
        return [name, f"{r['bpw']:.3f}", f"{r['head_bpw']:.2f}", f"{r['kld']:.4f}", f"{r['top1']:.1%}", f"{r['ppl']:.3f}"]

    def label(key):
        if "@" in key:
            return f"trimtab gptq at {key.split('@')[1]}'s size"
        method, _, what = key.partition("-")
        return f"llama.cpp {what}" if method == "llama.cpp" else f"trimtab {method} -b {float(what):g}"

    def series(method):
        return sorted((r["bpw"], r["kld"]) for key, r in results.items()
                      if (key.startswith(method + "-") or key.startswith(method + "@")) and key != "llama.cpp-Q4_1")

    quality_rows = [["float (GGUF Q4_1 dequantized)", "—", "—", "0", "100%", f"{float_ppl:.3f}"]]
    # targets that reached the same layout (same method, same bpw) share one row naming them all
    same_layout: dict[tuple, list[str]] = {}
    for key, r in sorted(results.items(), key=lambda item: item[1]["bpw"]):
        method = "gptq" if key.startswith("gptq") else key
        same_layout.setdefault((method, round(r["bpw"], 3)), []).append(key)
    def shared_label(keys):                          # "trimtab gptq -b 6, 8 = at Q4_K_M/Q6_K's size"
        if len(keys) == 1:
            return label(keys[0])
        targets = sorted(float(key[5:]) for key in keys if "@" not in key)
        sizes = [key.split("@")[1] for key in keys if "@" in key]
        named = ([f"-b {', '.join(f'{t:g}' for t in targets)}"] if targets else []) + (
            [f"at {'/'.join(sizes)}'s size"] if sizes else [])
        return "trimtab gptq " + " = ".join(named)

    for keys in same_layout.values():
        quality_rows.append(cells(shared_label(keys), results[keys[0]]))
    gptq_top = max(r["bpw"] for key, r in results.items() if key.startswith("gptq"))
    def target(key):                                 # the bpw a gptq key asked for
        return results[f"llama.cpp-{key[5:]}"]["bpw"] if "@" in key else float(key[5:])

    stopped = sorted(target(key) for key, r in results.items()
                     if key.startswith("gptq") and round(r["bpw"], 3) == round(gptq_top, 3))
    saturation = (
        f"Every gptq target from {stopped[0]:.3f} bpw up stops at {gptq_top:.3f} bpw: there the "
        f"measured output error of every linear layer is already zero (the float model is itself Q4_1, whose grid "
        f"4-bit groups of 32 reproduce), so the allocator spends no more bits; the KLD left is not the linear "
        f"layers' (the head is 6-bit).\n\n"
    ) if len(stopped) > 1 else ""
    # the target: below llama.cpp at every bpw from 3 to 6; measured at each k-quant's own size
    verdicts = []
    for kind in LLAMA_CPP_TYPES:
        peer, ours = results[f"llama.cpp-{kind}"], results[f"gptq@{kind}"]
        verdicts.append([kind, f"{peer['bpw']:.3f}", f"{peer['kld']:.4f}", f"{ours['bpw']:.3f}", f"{ours['kld']:.4f}",
                         f"{peer['kld'] / max(ours['kld'], 1e-9):.1f}×"])
    allocation_rows = allocator_comparison(measurement, 128)
    body = (
        f"Embedded default model (SmolLM2-135M-Instruct); float model: its Q4_1 GGUF dequantized. trimtab: "
        f"`trimtab convert -i default -b B -c wiki.utf8 -r {args.rows} -l {args.length}`, every target reusing "
        f"the measurement of the timed convert below (`-mr {args.measure_rows} -ml {args.measure_length}`) "
        f"with `-m`; -hb 6, -g 128 (gptq picks per layer groups of 32/64/128, a width, and act-order "
        f"or not). rtn: no calibration. "
        f"llama.cpp: `llama_model_quantize` of the Q4_1 file with requantizing allowed. bpw: the decoder's "
        f"linear layers, every stored bit (scales, mins, group metadata, act-order permutation; GGUF: the tensor "
        f"types' bytes); head bpw beside it. Held out: the first {tokens} tokens of `technical.utf8`, windows "
        f"of {args.ctx}; KLD is KL(float ‖ quantized) in nats per token. The llama.cpp Q4_1 row is the float "
        f"model's own weights run by llama.cpp: the two engines' numerical difference, a floor for its rows.\n\n"
        + markdown_table(["model", "bpw", "head bpw", "KLD", "top-1 agree", "ppl"], quality_rows)
        + "\n\n![KLD vs bpw](docs/quality_vs_bits.png)\n\n"
        + saturation
        + "Against each llama.cpp k-quant: trimtab gptq converted with `-b` at that k-quant's bpw (rounded down), "
        "and how many times lower its KLD is.\n\n"
        + markdown_table(["llama.cpp", "bpw", "KLD", "trimtab gptq bpw", "KLD", "llama.cpp KLD / trimtab KLD"],
                         verdicts)
        + "\n\nAllocators on the same measurement (`--allocation`): bpw reached, total measured output "
        "error per token (the objective; lower is better) and time. dp: multiple-choice knapsack by dynamic programming "
        "(exact on costs rounded to 1/8192 of the budget); lagrangian: bisection on the price of a bit, then "
        "greedy upgrades.\n\n"
        + markdown_table(["-b", "dp bpw", "dp error", "dp ms", "lagrangian bpw", "lagrangian error",
                          "lagrangian ms"], allocation_rows)
        + f"\n\nOne whole convert, timed: `trimtab convert -i default -b 4 -c wiki.utf8 -r {args.rows} -l "
        f"{args.length} -mr {args.measure_rows} -ml {args.measure_length}` (measurement included), "
        f"{args.threads} threads: **{ci['seconds'] / 60:.1f} minutes**; {ci['bpw']:.3f} bpw, KLD {ci['kld']:.4f}, "
        f"ppl {ci['ppl']:.3f}.\n"
    )
    plot({"trimtab gptq": series("gptq"), "trimtab rtn": series("rtn"), "llama.cpp k-quants": series("llama.cpp")})
    write_section("convert_quality", body, script="convert_quality")
    print(body)


if __name__ == "__main__":
    main()
