"""`trimtab convert --method gptq`: the calibrated conversion, stage by stage, resumable.

    result = convert_calibrated(source, options, progress=True, started=time.perf_counter())

Stages (each recorded in the work dir's job.json as it finishes; see output.py):
  1. text      the calibration text, tokenized into -mr × -ml rows (measurement) and -r × -l rows (quantize);
  2. head      of a tied model: rtn at -hb (it is also the embedding, whose rows the calibration runs read);
  3. measure   measure.py, saved after every decoder layer; or -m's file; or this dir's previous one
               when it was made from the same model, text, rows and group size;
  4. allocate  one layout (width, group size) per decoder linear, to land at or under -b (allocate.py);
  5. quantize  layer by layer: the rows run through the already-quantized layers before it; each
               part (attention, then MLP) runs in float once to collect its Hessians, is quantized by
               GPTQ, and runs again quantized to give the next part its inputs; each finished decoder
               layer is kept in the work dir, and a resumed job replays the kept layers to rebuild the
               activations (the same arithmetic, so the same bits);
  6. head      of an untied model: GPTQ at -hb on the final norm's outputs;
  7. finish    shards, tokenizer files, config.json (output.py).
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import torch

from trimtab.backend.errors import TrimtabError
from trimtab.backend.hf_export import write_json
from trimtab.backend.models import architecture_for, model_args
from trimtab.backend.models.base import RMSNorm
from trimtab.backend.quant import calibration, measure as measuring, qconfig, rtn
from trimtab.backend.quant.allocate import ALLOCATORS, Choice, planned_bits
from trimtab.backend.quant.convert import (EMBEDDING, HEAD, MB, MEASUREMENT_NAME, RESERVED, ConvertOptions,
                                           ConvertResult, Source, add_float_tensors, decoder_linears,
                                           float16_embedding, head_source_of)
from trimtab.backend.quant.format import WIDTHS, dequantize, from_tensors, split_groups
from trimtab.backend.quant.gptq import HessianSolver, single_thread
from trimtab.backend.quant.hessian import HessianAccumulator
from trimtab.backend.quant.layerwise import LayerRunner, quantized_copy
from trimtab.backend.quant.output import OutputDir

PERM_BITS = 32              # act-order's stored permutation: one int32 per input row


def convert_calibrated(source: Source, options: ConvertOptions, *, progress: bool, started: float) -> ConvertResult:
    arch = architecture_for(source.config)
    args = model_args(arch, source.config)
    weights = source.weights
    head_source = head_source_of(source)
    tied = head_source == EMBEDDING
    linears = [name.removesuffix(".weight") for name in decoder_linears(weights)]

    check_budget(weights, linears, options)
    # 1. text (before the directory is touched: a short text is an ordinary mistake)
    reuse_file = options.measurement is not None
    wanted = options.rows * options.length
    if not reuse_file:
        wanted = max(wanted, options.measure_rows * options.measure_length)
    text, label = calibration.read_text(options.calibration, tokens_wanted=wanted, tokenizer=source.tokenizer)
    identity = {"format": measuring.MEASUREMENT_FORMAT, "model": options.input, "dataset": label,
                "fingerprint": calibration.fingerprint(text), "rows": options.measure_rows,
                "length": options.measure_length, "group_size": options.group_size}
    quant_rows = None if options.measure_only else calibration.token_rows(
        source.tokenizer, text, rows=options.rows, length=options.length,
        flags=f"-r {options.rows} × -l {options.length}")
    measure_rows = None if reuse_file else calibration.token_rows(
        source.tokenizer, text, rows=options.measure_rows, length=options.measure_length,
        flags=f"-mr {options.measure_rows} × -ml {options.measure_length}")
    del text
    previous = _read_measurement(Path(options.output).expanduser() / MEASUREMENT_NAME, identity)

    job_options = {k: v for k, v in dataclasses.asdict(options).items() if k != "force"}
    out, resumed = OutputDir.resume_or_claim(options.output, job_options, reserved=RESERVED, force=options.force,
                                             shard_bytes=options.shard_mb * MB)
    if not resumed:
        out.update_job(stage="measure")
    runner = LayerRunner(arch, args, weights)

    # 2. the head of a tied model, which is also its embedding
    if tied:
        if not out.job.get("head_done"):
            sizes = split_groups(weights[EMBEDDING].shape[1], options.group_size)
            head = rtn.quantize_rtn(weights[EMBEDDING].float(), sizes, [options.head_bits] * len(sizes))
            out.save_part("head", head.tensors(HEAD), head_done=True)
        embedding = dequantize(from_tensors(out.read_part("head"), HEAD))          # [V, D] as the model reads it
    else:
        embedding = float16_embedding(source).float()

    # 3. measure
    if reuse_file:
        measurement = _load_measurement_file(Path(options.measurement).expanduser(), linears, weights)
    elif previous is not None:
        measurement = previous
    else:
        partial_path = out.work / MEASUREMENT_NAME     # kept across jobs: it resumes whenever made the same way
        state = _read_measurement(partial_path, identity, complete=False) or dict(identity, layers_done=0)
        measurement = measuring.measure(runner, measure_rows, embedding, layers=args.num_hidden_layers,
                                        group_size=options.group_size, state=state,
                                        save=lambda st: write_json(partial_path, st), progress=progress)
        measurement["complete"] = True
    out.update_job(files=sorted(set(out.job.get("files", [])) | {MEASUREMENT_NAME}))
    write_json(out.path / MEASUREMENT_NAME, measurement)
    if options.measure_only:
        out.update_job(stage="done")
        return ConvertResult(out.path, [MEASUREMENT_NAME], math.nan, math.nan, time.perf_counter() - started,
                             resumed, tuple(measurement.get("starved", [])))

    # 4. allocate
    if "layouts" not in out.job:
        choices = layout_choices(measurement, linears, options.group_size)
        total = sum(weights[f"{name}.weight"].numel() for name in linears)
        try:
            chosen = ALLOCATORS[options.allocation](choices, int(options.bits * total))
        except TrimtabError as e:
            raise TrimtabError(f"-b {options.bits:g} with -g {options.group_size}: {e}") from None
        out.update_job(stage="quantize",
                       layouts={name: [c.group_size, c.bits, c.act_order] for name, c in chosen.items()})
    layouts = out.job["layouts"]

    # 5. quantize, layer by layer (nothing to run when a job interrupted while finishing resumes)
    all_done = out.job.get("layers_done", 0) == args.num_hidden_layers and out.job.get("head_done")
    x = None if all_done else quantize_layers(runner, quant_rows, embedding, layouts, out, args.num_hidden_layers,
                                              progress=progress)

    # 6. the head of an untied model
    if not tied and not out.job.get("head_done"):
        norm = RMSNorm(weights["model.norm.weight"].float(), args.rms_norm_eps)
        accumulator = HessianAccumulator(x.shape[-1])
        for row in x:
            accumulator.add(norm(row))
        sizes = split_groups(x.shape[-1], options.group_size)
        with single_thread():
            head = HessianSolver.prepare(accumulator.hessian()).quantize(
                weights[head_source].float(), sizes, [options.head_bits] * len(sizes))
        out.save_part("head", head.tensors(HEAD), head_done=True)
    del x

    # 7. finish
    out.update_job(stage="finish")
    bits = {"decoder": [0, 0], "head": [0, 0]}
    for part in ["head"] + [f"layer-{i:05d}" for i in range(args.num_hidden_layers)]:
        tensors = out.read_part(part)
        for name in tensors:
            if name.endswith(".qweight"):
                layer = from_tensors(tensors, name.removesuffix(".qweight"))
                totals = bits["head" if part == "head" else "decoder"]
                totals[0] += layer.bits()
                totals[1] += layer.in_features * layer.out_features
        out.add_tensors(tensors)
    done = {f"{name}.{kind}" for name in linears for kind in ("weight", "bias")} | {f"{HEAD}.weight", head_source}
    add_float_tensors(source, out, done)
    decoder_bpw = bits["decoder"][0] / bits["decoder"][1]
    config = dict(source.config, tie_word_embeddings=tied, quantization_config=qconfig.make(
        method="gptq", bits=options.bits, bits_per_weight=decoder_bpw, head_bits=options.head_bits,
        group_size=options.group_size, allocation=options.allocation, calibration={
            "dataset": label, "rows": options.rows, "length": options.length,
            "measurement_rows": measurement.get("rows"), "measurement_length": measurement.get("length")}))
    files = out.finish(config, source.write_tokenizer, extra=(MEASUREMENT_NAME,))
    out.remove_parts()
    return ConvertResult(out.path, files, decoder_bpw, bits["head"][0] / bits["head"][1],
                         time.perf_counter() - started, resumed, tuple(out.job.get("starved", [])))


def layout_cost(out_features: int, in_features: int, group_size: int, bits: int, act_order: bool) -> int:
    """Stored bits of a layer at one layout, as format.py counts them, act-order's permutation included."""
    sizes = split_groups(in_features, group_size)
    return planned_bits(out_features, sizes, [bits] * len(sizes)) + (PERM_BITS * in_features if act_order else 0)


def layout_choices(measurement: dict, linears: list[str], group_size: int) -> dict[str, list[Choice]]:
    """Per decoder linear, every measured layout with its exact cost and its error: the output error per
    token, tr(ΔW H ΔWᵀ), times the layer's weight (1, or an expert's share of the routed tokens). The
    absolute error, not the error relative to the layer's output energy (tried first): on the
    default model, allocating by absolute error gave 0.19 nats of KL divergence at 4.63 bpw where relative
    error gave 0.34, and 0.74 against 0.80 at 4.0 (same measurement, same held-out text)."""
    choices = {}
    for name in linears:
        entry = measurement["layers"][name]
        choices[name] = [
            Choice(g, b, layout_cost(entry["out"], entry["in"], g, b, act),
                   entry["weight"] * entry["errors"][measuring.candidate_key(g, b, act)], act)
            for g in measurement["group_sizes"] if g <= group_size for b in measurement["widths"]
            for act in measuring.ACT_ORDERS]
    return choices


def check_budget(weights, linears: list[str], options: ConvertOptions) -> None:
    """-b too low for even the smallest layouts: said before any work, not after the measurement."""
    largest, cheapest = measuring.candidate_groups(options.group_size)[-1], {}
    for name in linears:
        out_features, in_features = weights[f"{name}.weight"].shape
        cheapest[name] = [Choice(largest, b, layout_cost(out_features, in_features, largest, b, False), 0.0, False)
                          for b in WIDTHS[:2]]
    total = sum(weights[f"{name}.weight"].numel() for name in linears)
    try:
        ALLOCATORS["lagrangian"](cheapest, int(options.bits * total))
    except TrimtabError as e:
        raise TrimtabError(f"-b {options.bits:g} with -g {options.group_size}: {e}") from None


def quantize_layers(runner: LayerRunner, rows: torch.Tensor, embedding: torch.Tensor, layouts: dict, out: OutputDir,
                    layers: int, *, progress: bool) -> torch.Tensor:
    """Stage 5; → the residual stream after the last decoder layer, [rows, length, D]."""
    from tqdm.auto import tqdm

    done = out.job.get("layers_done", 0)
    x = runner.embed(rows, embedding)
    for index in tqdm(range(layers), desc="Quantizing (gptq)", unit="layer", disable=not progress):
        layer = runner.build(index)
        if index < done:                               # kept from an interrupted run: replay it
            kept = out.read_part(f"layer-{index:05d}")
            for part in ("attention", "mlp"):
                runner.map_linears(layer, part, lambda name, linear: quantized_copy(from_tensors(kept, name), linear))
                x = runner.run(layer, x, part)
            continue
        tensors, starved = {}, []
        for part in ("attention", "mlp"):
            accumulators, in_features = measuring.tap_part(runner, layer, part)
            runner.run(layer, x, part)                 # in float: the Hessians of this part's inputs
            measuring.untap_part(runner, layer, part)
            hessians, _, part_starved = measuring.layer_hessians(accumulators, list(in_features), in_features)
            starved += part_starved
            quantized = {}
            with single_thread():
                for name in in_features:
                    group_size, bits, act_order = layouts[name]
                    sizes = split_groups(in_features[name], group_size)
                    weight = runner.weights[f"{name}.weight"].float()
                    solver = HessianSolver.prepare(hessians[name], act_order=act_order)
                    quantized[name] = solver.quantize(weight, sizes, [bits] * len(sizes))
                    tensors.update(quantized[name].tensors(name))
                    if f"{name}.bias" in runner.weights:
                        tensors[f"{name}.bias"] = runner.weights[f"{name}.bias"]
            runner.map_linears(layer, part, lambda name, linear: quantized_copy(quantized[name], linear))
            x = runner.run(layer, x, part)
        out.save_part(f"layer-{index:05d}", tensors, layers_done=index + 1,
                      starved=out.job.get("starved", []) + starved)
    return x


def _read_measurement(path: Path, identity: dict, *, complete: bool = True) -> dict | None:
    """A measurement at `path` made the same way (identity), or None."""
    try:
        measurement = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(measurement, dict) or any(measurement.get(k) != v for k, v in identity.items()):
        return None
    return measurement if measurement.get("complete") or not complete else None


def _load_measurement_file(path: Path, linears: list[str], weights) -> dict:
    """-m: a measurement.json from an earlier convert of this model; checked against its layers."""
    try:
        measurement = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TrimtabError(f"{path}: not a measurement.json ({e})") from None
    if not isinstance(measurement, dict) or not measurement.get("complete") or not isinstance(
            measurement.get("layers"), dict):
        raise TrimtabError(f"{path}: not a complete trimtab measurement (made by `trimtab convert -om`)")
    for name in linears:
        entry = measurement["layers"].get(name)
        shape = list(weights[f"{name}.weight"].shape)
        if not isinstance(entry, dict) or [entry.get("out"), entry.get("in")] != shape:
            raise TrimtabError(f"{path}: measures another model (layer {name} is missing or not {shape})")
    return measurement
