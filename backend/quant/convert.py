"""`trimtab convert`: a float model (HF dir, .gguf, or the embedded default) → a trimtab-quantized dir.

    result = convert(ConvertOptions(input="default", output="out/smollm2-4", bits=4.0, calibration="text.txt"))

Two methods (docs/CONVERT.md):
  gptq (default)  calibrated: tokenize the calibration text (calibration.py) → measure every decoder
                  linear's output error at each candidate layout (measure.py) → allocate one layout per
                  layer to hit -b (allocate.py) → run the rows through the model layer by layer, each
                  layer's inputs coming from the already-quantized layers before it, and quantize each
                  linear with GPTQ on the Hessian of its inputs (gptq.py, layerwise.py) → pack;
  rtn             no calibration: round-to-nearest with a range search, two adjacent widths mixed by a
                  weight-range priority (rtn.py).
Both end in `finish`: shards of at most -ss MB, tokenizer files, config.json with quantization_config.
The output dir is also the work dir (output.py): it records the job, keeps the measurement and every
finished layer, so a gptq convert that is interrupted resumes after the last finished layer.

What is quantized: every 2-D `.weight` of the decoder except a mixture-of-experts router (tiny, and
routing decisions are sensitive), each Mixtral expert's linears separately, and the output head.
With tied embeddings the embedding matrix is stored once, as the quantized `lm_head`, and the loader
reads embedding rows from it (llama.cpp does the same with a tied GGUF's token_embd); an untied
model's embedding is stored as float16 (one row is read per token). Norms, biases and routers stay
as they were. The head of a tied model is quantized by rtn even under gptq: its rows are also the
embedding, whose own rows' error is what matters there, not the logits' error GPTQ would minimise.
"""
from __future__ import annotations

import dataclasses
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import torch

from trimtab.backend import hf_export, hf_loader
from trimtab.backend.default_model import default_model_path
from trimtab.backend.errors import ModelFileError, TrimtabError
from trimtab.backend.gguf_loader import is_gguf_file, read_gguf
from trimtab.backend.models import architecture_for, model_args
from trimtab.backend.quant import qconfig, rtn
from trimtab.backend.quant.allocate import ALLOCATORS, LayerGroups, mix_adjacent_widths
from trimtab.backend.quant.format import WIDTHS, split_groups
from trimtab.backend.quant.output import OutputDir
from trimtab.backend.tokenizer import Tokenizer

EMBEDDING = "model.embed_tokens.weight"
HEAD = "lm_head"
ROUTER_SUFFIX = ".block_sparse_moe.gate.weight"
GROUP_SIZES = (32, 128)            # smallest and largest -g
DEFAULT_GROUP_SIZE = 128           # measured on the default model: docs/FORMAT.md, BENCHMARKS.md
DEFAULT_HEAD_BITS = 6
DEFAULT_SHARD_MB = 8192
MB = 1024 * 1024
# rtn: (quantize one layer, per-group priority of a wider width); gptq is calibrated (calibrated.py)
METHODS = {"gptq": None, "rtn": (rtn.quantize_rtn, rtn.width_priority)}
MEASUREMENT_NAME = "measurement.json"
# file names convert writes besides the model's weights and config.json
RESERVED = Tokenizer.FILES + (MEASUREMENT_NAME,)


@dataclass(frozen=True)
class ConvertOptions:
    """ExLlamaV2's flags and defaults (-i -o -b -hb -l -r -mr -ml -ss -c -m -om), plus -g and --method."""
    input: str                       # -i: HF model dir, .gguf file, or "default"
    output: str                      # -o: output and work dir
    bits: float = 4.125              # -b: target bits per weight over the decoder's linear layers
    head_bits: int = DEFAULT_HEAD_BITS   # -hb
    group_size: int = DEFAULT_GROUP_SIZE  # -g
    method: str = "gptq"             # --method: gptq | rtn
    shard_mb: int = DEFAULT_SHARD_MB  # -ss
    force: bool = False
    length: int = 2048               # -l: tokens per calibration row
    rows: int = 100                  # -r: calibration rows
    measure_rows: int = 16           # -mr
    measure_length: int = 2048       # -ml
    calibration: str | None = None   # -c: .txt / .jsonl / .parquet; None: calibration.py's default
    measurement: str | None = None   # -m: a measurement.json to reuse
    measure_only: bool = False       # -om
    allocation: str = "dp"           # how widths are allocated from the measurement (allocate.ALLOCATORS)


@dataclass(frozen=True)
class ConvertResult:
    output: Path
    files: list[str]
    bits_per_weight: float           # decoder linear layers, every stored bit counted
    head_bits_per_weight: float
    seconds: float
    resumed: bool = False            # a previous, interrupted run's finished layers were kept
    starved: tuple[str, ...] = ()    # experts that saw too few calibration tokens (measure.py)

    @property
    def size_bytes(self) -> int:
        return sum((self.output / name).stat().st_size for name in self.files)


@dataclass(frozen=True)
class Source:
    path: Path
    config: dict
    weights: Mapping[str, torch.Tensor]          # HF names after the architecture's sanitize()
    write_tokenizer: Callable[[Path], tuple[str, ...]]
    tokenizer: Tokenizer


@dataclass(frozen=True)
class LayerPlan:
    name: str                        # the quantized layer's prefix in the output
    source: str                      # the float weight [out, in] it is made from
    group_sizes: list[int]
    group_bits: list[int]
    is_head: bool = False


def check_options(options: ConvertOptions) -> None:
    """Every flag checked before anything is read or written; TrimtabError naming the flag."""
    if not qconfig.MIN_BITS <= options.bits <= qconfig.MAX_BITS:
        raise TrimtabError(f"-b must be between {qconfig.MIN_BITS:g} and {qconfig.MAX_BITS:g} bits per weight, "
                           f"got {options.bits:g}")
    if options.head_bits not in WIDTHS:
        raise TrimtabError(f"-hb must be one of {', '.join(map(str, WIDTHS))}, got {options.head_bits}")
    if not GROUP_SIZES[0] <= options.group_size <= GROUP_SIZES[1]:
        raise TrimtabError(f"-g must be between {GROUP_SIZES[0]} and {GROUP_SIZES[1]} rows, got {options.group_size}")
    if options.method not in METHODS:
        raise TrimtabError(f"--method must be one of {', '.join(METHODS)}, got {options.method!r}")
    if options.shard_mb < 1:
        raise TrimtabError(f"-ss must be at least 1 MB, got {options.shard_mb}")
    for flag, value, least in (("-r", options.rows, 1), ("-l", options.length, 2), ("-mr", options.measure_rows, 1),
                               ("-ml", options.measure_length, 2)):
        if value < least:
            raise TrimtabError(f"{flag} must be at least {least}, got {value}")
    if options.allocation not in ALLOCATORS:
        raise TrimtabError(f"allocation must be one of {', '.join(ALLOCATORS)}, got {options.allocation!r}")
    if options.measurement is not None and not Path(options.measurement).expanduser().is_file():
        raise TrimtabError(f"{options.measurement}: measurement (-m) not found")
    if options.calibration is not None and not Path(options.calibration).expanduser().is_file():
        raise TrimtabError(f"{options.calibration}: calibration text (-c) not found")
    if options.method == "rtn" and (options.measure_only or options.measurement):
        raise TrimtabError("-om and -m belong to the calibrated method (--method gptq); rtn measures nothing")


def convert(options: ConvertOptions, *, progress: bool = True) -> ConvertResult:
    check_options(options)
    # every tokenizer file name is reserved: one left in the directory would be read with ours
    OutputDir.check(options.output, reserved=RESERVED, force=options.force, source=options.input)  # before the work
    started = time.perf_counter()
    source = read_source(options.input)
    if options.method == "gptq":
        from trimtab.backend.quant.calibrated import convert_calibrated

        return convert_calibrated(source, options, progress=progress, started=started)
    plans = plan(source, options, progress=progress)
    out = OutputDir.claim(options.output, dataclasses.asdict(options), reserved=RESERVED,
                          force=options.force, shard_bytes=options.shard_mb * MB)
    bits = quantize(source, plans, out, options.method, progress=progress)
    decoder_bpw = bits["decoder"][0] / bits["decoder"][1]
    config = dict(source.config, tie_word_embeddings=plans[-1].source == EMBEDDING, quantization_config=qconfig.make(
        method=options.method, bits=options.bits, bits_per_weight=decoder_bpw, head_bits=options.head_bits,
        group_size=options.group_size))
    files = out.finish(config, source.write_tokenizer)
    return ConvertResult(out.path, files, decoder_bpw, bits["head"][0] / bits["head"][1],
                         time.perf_counter() - started)


# -- 1. read ---------------------------------------------------------------------------------------

def read_source(name: str) -> Source:
    path = default_model_path() if name == "default" else Path(name).expanduser()
    if path.is_dir():
        config = hf_loader.read_config(path)
        if "quantization_config" in config:
            method = config["quantization_config"].get("quant_method", "?") \
                if isinstance(config["quantization_config"], dict) else "?"
            raise TrimtabError(f"{path}: already quantized ({method}); convert takes a float model")
        weights = hf_loader.open_weights(path)
        tokenizer = Tokenizer.from_dir(path)  # a broken tokenizer is reported now, not after quantizing
        write_tokenizer = _copier(path, tuple(n for n in Tokenizer.FILES if (path / n).is_file()))
    elif path.is_file() and is_gguf_file(path):
        contents = read_gguf(path)
        config, weights = contents.config, contents.weights
        tokenizer = Tokenizer.from_parts(contents.tokenizer_json, contents.tokenizer_config,
                                         contents.generation_config, origin=str(path))
        write_tokenizer = lambda out: hf_export.write_tokenizer_files(contents, out)  # noqa: E731
    elif not path.exists():
        raise ModelFileError(path, "no such file or directory")
    else:
        raise ModelFileError(path, "not a model directory (config.json + safetensors) or a GGUF file")
    arch = architecture_for(config)
    model_args(arch, config)  # an unsupported config is reported before any work
    return Source(path, config, arch.sanitize(weights), write_tokenizer, tokenizer)


def _copier(directory: Path, names: tuple[str, ...]) -> Callable[[Path], tuple[str, ...]]:
    def copy(out: Path) -> tuple[str, ...]:
        for name in names:
            hf_export.write_atomically(out / name, lambda tmp, name=name: shutil.copyfile(directory / name, tmp))
        return names
    return copy


# -- 2. plan ---------------------------------------------------------------------------------------

def plan(source: Source, options: ConvertOptions, *, progress: bool = True) -> list[LayerPlan]:
    """The decoder's layers at two adjacent widths near -b, then the head at -hb."""
    from tqdm.auto import tqdm

    weights = source.weights
    head_source = head_source_of(source)
    linears = decoder_linears(weights)
    priority_of = METHODS[options.method][1]
    groups = []
    for name in tqdm(linears, desc="Planning widths", unit="layer", disable=not progress, leave=False):
        weight = weights[name]                                                   # [out, in]
        sizes = split_groups(weight.shape[1], options.group_size)
        groups.append(LayerGroups(name, weight.shape[0], tuple(sizes), tuple(priority_of(name, weight, sizes))))
    try:
        widths = mix_adjacent_widths(groups, options.bits)
    except TrimtabError as e:
        raise TrimtabError(f"-b {options.bits:g} with -g {options.group_size}: {e}") from None
    plans = [LayerPlan(g.name.removesuffix(".weight"), g.name, list(g.group_sizes), widths[g.name]) for g in groups]
    head_sizes = split_groups(weights[head_source].shape[1], options.group_size)
    return plans + [LayerPlan(HEAD, head_source, head_sizes, [options.head_bits] * len(head_sizes), is_head=True)]


def head_source_of(source: Source) -> str:
    """The float tensor the head is made from: lm_head.weight, or the embedding it is tied to."""
    args = model_args(architecture_for(source.config), source.config)
    weights = source.weights
    head_source = EMBEDDING if args.tie_word_embeddings or f"{HEAD}.weight" not in weights else f"{HEAD}.weight"
    if head_source not in weights:
        raise ModelFileError(source.path, f"the checkpoint has no tensor {head_source!r}")
    return head_source


def decoder_linears(weights: Mapping[str, torch.Tensor]) -> list[str]:
    """The weights of the decoder's linear layers that are quantized ([out, in], names ending in .weight)."""
    return [name for name in weights
            if name.endswith(".weight") and name not in (EMBEDDING, f"{HEAD}.weight")
            and not name.endswith(ROUTER_SUFFIX) and weights[name].dim() == 2]


# -- 3. quantize -----------------------------------------------------------------------------------

def quantize(source: Source, plans: list[LayerPlan], out: OutputDir, method: str, *,
             progress: bool = True) -> dict[str, list[int]]:
    """Every planned layer into `out`, then the tensors that stay float. → {"decoder"|"head": [bits, weights]}"""
    from tqdm.auto import tqdm

    weights = source.weights
    quantize_layer = METHODS[method][0]
    bits = {"decoder": [0, 0], "head": [0, 0]}
    done = {f"{HEAD}.weight"}  # a tied checkpoint's copy of the embedding is not kept
    for p in tqdm(plans, desc=f"Quantizing ({method})", unit="layer", disable=not progress):
        try:
            layer = quantize_layer(weights[p.source].float(), p.group_sizes, p.group_bits)
        except TrimtabError as e:
            raise TrimtabError(f"{source.path}: {p.source}: {e}") from None
        tensors = layer.tensors(p.name)
        if not p.is_head and f"{p.name}.bias" in weights:
            tensors[f"{p.name}.bias"] = weights[f"{p.name}.bias"]
        out.add_tensors(tensors)
        done.update((p.source, f"{p.name}.bias"))
        totals = bits["head" if p.is_head else "decoder"]
        totals[0] += layer.bits()
        totals[1] += layer.in_features * layer.out_features
    add_float_tensors(source, out, done)
    return bits


def add_float_tensors(source: Source, out: OutputDir, done: set[str]) -> None:
    """Everything not quantized (`done` names the tensors already written or dropped): an untied
    model's embedding as float16, norms, routers, other biases as they are."""
    weights = source.weights
    if EMBEDDING not in done:  # untied: the embedding is not the head
        out.add_tensors({EMBEDDING: float16_embedding(source)})
        done = done | {EMBEDDING}
    out.add_tensors({name: weights[name] for name in weights if name not in done})


def float16_embedding(source: Source) -> torch.Tensor:
    embedding = source.weights[EMBEDDING].to(torch.float16)
    if not torch.isfinite(embedding).all():
        raise TrimtabError(f"{source.path}: {EMBEDDING} holds values beyond float16's range")
    return embedding
