"""Read a GGUF file into what trimtab's models consume: a Hugging Face config, HF-named float32
weights in HF layout, and a `tokenizers` tokenizer.

A GGUF file is untrusted input, so its header is parsed here, by `_scan`, with checked arithmetic
at every step: magic, version, counts against limits and against the file size, every metadata
value's extent, every tensor's dims, type, and data range (inside the file, aligned, not
overlapping another tensor). The `gguf` package supplies the type tables and dequantizes each
tensor's bytes once their extent is known to be sound. (`gguf.GGUFReader` is not used: it would
parse the same header a second time, unchecked, and takes 10-20x longer doing it — several
seconds for the embedded default model, one numpy view per vocabulary string.)

Layout differences undone here:
- ggml lists dims fastest-first, so a weight of ggml dims [in, out] is the numpy/HF array [out, in];
- for llama-family archs llama.cpp's converter reorders the rows of each Q and K head so that the
  rotary pairs sit next to each other (ggml's rope rotates rows 2i and 2i+1; HF's rotate_half
  rotates rows i and i + head_dim/2): `unpermute_rope_rows` puts them back. Qwen2 uses NeoX rope
  in GGUF, the same pairing as HF, so its rows are stored as-is.
"""
from __future__ import annotations

import math
import mmap
import os
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .errors import ModelFileError, UnsupportedModelError
from .gguf_tokenizer import build_tokenizer
from .rope import base_inv_freq, llama3_inv_freq

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_TENSORS = 1 << 20
MAX_METADATA_KEYS = 1 << 16
MAX_ARRAY_ELEMENTS = 1 << 22   # the largest vocabularies and merge lists are well under this
MAX_NAME_BYTES = 1 << 16
MAX_DIMS = 4
MAX_LAYERS = 4096
TENSORS_PER_LAYER = 9  # 2 norms + 4 attention + 3 feed-forward (or router + 3 stacked experts)
MAX_EXPERTS = 4096
PROGRESS_BAR_MIN_BYTES = 200 * 1024 * 1024

# The tensor types trimtab dequantizes (with the gguf package).
SUPPORTED_TENSOR_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K")


@dataclass
class GGUFContents:
    config: dict                      # like a HF config.json
    weights: dict[str, torch.Tensor]  # HF names, HF layout ([out, in]), float32
    tokenizer_json: str               # a serialized `tokenizers.Tokenizer`
    tokenizer_config: dict            # like tokenizer_config.json
    generation_config: dict           # like generation_config.json


def read_gguf(path: str | os.PathLike) -> GGUFContents:
    """Read a GGUF model file (llama, mistral, mixtral or qwen2 architecture).

    Raises ModelFileError (missing or malformed file) or UnsupportedModelError (an architecture,
    tensor type or tokenizer trimtab does not implement); both name the file and the problem.
    """
    path = os.fspath(path)
    layout = _scan_layout(path)
    metadata, tensor_infos = layout.metadata, layout.tensors

    arch = metadata.get("general.architecture")
    if arch is None:
        raise ModelFileError(path, "missing required metadata key 'general.architecture'")
    if not isinstance(arch, str) or arch not in ARCHITECTURES:
        raise UnsupportedModelError(
            f"{path}: architecture {arch!r} is not supported (supported: {', '.join(sorted(ARCHITECTURES))})"
        )
    hparams = _hyperparameters(arch, metadata, tensor_infos, path)
    plan = _plan_tensors(hparams, tensor_infos, path)

    file_data = np.memmap(path, mode="r")
    rope_freqs = next((info for info in tensor_infos if info.name == "rope_freqs.weight"), None)
    if rope_freqs is not None:
        rope_freqs = _dequantize(file_data, layout.data_start, rope_freqs, path).numpy().astype(np.float64)

    tokenizer = build_tokenizer(metadata, path)
    n_tokens = len(metadata["tokenizer.ggml.tokens"])
    if n_tokens > hparams.vocab_size:
        raise ModelFileError(path, f"tokenizer has {n_tokens} tokens but the embedding only {hparams.vocab_size} rows")

    tied = all(info.name != "output.weight" for info in tensor_infos)
    config = _hf_config(hparams, metadata, rope_freqs, tied, path)
    weights = _load_weights(plan, file_data, layout.data_start, layout.size, path)
    del file_data

    tokenizer_config = dict(tokenizer.config)
    tokenizer_config["model_max_length"] = hparams.context_length
    tokenizer_config["clean_up_tokenization_spaces"] = False
    tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    return GGUFContents(
        config=config,
        weights=weights,
        tokenizer_json=tokenizer.tokenizer.to_str(),
        tokenizer_config=tokenizer_config,
        generation_config=_generation_config(metadata),
    )


def is_gguf_file(path: str | os.PathLike) -> bool:
    """A .gguf name, or a file that starts with GGUF's magic."""
    if os.fspath(path).lower().endswith(".gguf"):
        return True
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


# --- the rope row order ------------------------------------------------------------------------

def unpermute_rope_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """GGUF (interleaved rope pairs) -> HF (rotate_half) row order of a Q or K weight or bias.

    Within one head of size d, GGUF row 2*i + h holds HF row h*d/2 + i (h in {0, 1}, i < d/2):
    view the rows as [head, i, h], swap the last two, and read them back as [head, h, i].
    """
    # weight: [n_heads * d, *rest]
    rows, rest = weight.shape[0], weight.shape[1:]
    return weight.reshape(n_heads, rows // n_heads // 2, 2, *rest).transpose(1, 2).reshape(rows, *rest)


def permute_rope_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF -> GGUF row order; the inverse of `unpermute_rope_rows`."""
    rows, rest = weight.shape[0], weight.shape[1:]
    return weight.reshape(n_heads, 2, rows // n_heads // 2, *rest).transpose(1, 2).reshape(rows, *rest)


# --- parsing the header, checking everything ----------------------------------------------------

@dataclass
class _TensorInfo:
    name: str
    dims: tuple[int, ...]  # ggml order: dims[0] is the fastest-varying (row length)
    type_name: str
    offset: int            # from the start of the data section
    nbytes: int

    @property
    def shape(self) -> tuple[int, ...]:
        """numpy/torch shape: the ggml dims reversed."""
        return tuple(reversed(self.dims))


@dataclass
class _Layout:
    size: int
    metadata: dict[str, Any]
    tensors: list[_TensorInfo]
    data_start: int


# GGUF metadata value types: id -> (struct format, numpy dtype) of the fixed-size ones.
_SCALARS = {
    0: ("<B", "<u1"), 1: ("<b", "<i1"), 2: ("<H", "<u2"), 3: ("<h", "<i2"), 4: ("<I", "<u4"),
    5: ("<i", "<i4"), 6: ("<f", "<f4"), 7: ("<?", "<u1"), 10: ("<Q", "<u8"), 11: ("<q", "<i8"), 12: ("<d", "<f8"),
}
_BOOL, _STRING, _ARRAY = 7, 8, 9


class _Cursor:
    """Bounds-checked little-endian reads from the mapped file."""

    def __init__(self, path: str, data: mmap.mmap, size: int):
        self.path, self.data, self.size, self.pos = path, data, size, 0

    def fail(self, problem: str) -> ModelFileError:
        return ModelFileError(self.path, problem)

    def skip(self, n: int, what: str) -> int:
        start = self.pos
        if n < 0 or n > self.size - start:
            raise self.fail(f"file ends inside {what} (at byte {start}, needs {n} more bytes, "
                            f"file has {self.size}): truncated or corrupt")
        self.pos = start + n
        return start

    def unpack(self, fmt: str, what: str):
        start = self.skip(struct.calcsize(fmt), what)
        return struct.unpack_from(fmt, self.data, start)

    def u32(self, what: str) -> int:
        return self.unpack("<I", what)[0]

    def u64(self, what: str) -> int:
        return self.unpack("<Q", what)[0]

    def string(self, what: str, max_bytes: int | None = None) -> str:
        length = self.u64(f"the length of {what}")
        if max_bytes is not None and length > max_bytes:
            raise self.fail(f"{what} is {length} bytes long, more than the {max_bytes} allowed")
        start = self.skip(length, what)
        try:
            return self.data[start:start + length].decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not valid UTF-8") from None


def _scan_layout(path: str) -> _Layout:
    """Parse and check the header and tensor layout of a GGUF file."""
    try:
        if os.path.isdir(path):
            raise ModelFileError(path, "is a directory, not a GGUF file")
        with open(path, "rb") as file:
            size = os.fstat(file.fileno()).st_size
            if size == 0:
                raise ModelFileError(path, "is empty, not a GGUF file")
            with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
                return _scan(_Cursor(path, data, size))
    except FileNotFoundError:
        raise ModelFileError(path, "no such file") from None
    except OSError as error:
        raise ModelFileError(path, f"cannot read: {error.strerror or error}") from None


def _scan(cur: _Cursor) -> _Layout:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    if cur.size < 4 or cur.data[:4] != GGUF_MAGIC:
        raise cur.fail(f"not a GGUF file (starts with {bytes(cur.data[:4])!r}, expected b'GGUF')")
    cur.pos = 4
    version = cur.u32("the header (version)")
    if version not in SUPPORTED_VERSIONS:
        if version & 0xFFFF == 0 and (version >> 24) in SUPPORTED_VERSIONS:
            raise cur.fail("is a big-endian GGUF file, which trimtab does not read")
        raise cur.fail(f"GGUF version {version} is not supported (supported: 2, 3)")
    tensor_count = cur.u64("the header (tensor count)")
    kv_count = cur.u64("the header (metadata count)")
    # Every metadata entry takes at least 8 + 4 + 1 bytes, every tensor info at least 8 + 4 + 8 + 4 + 8.
    if kv_count > MAX_METADATA_KEYS or kv_count * 13 > cur.size - cur.pos:
        raise cur.fail(f"header claims {kv_count} metadata entries, more than a file of {cur.size} bytes can hold "
                       f"or the limit of {MAX_METADATA_KEYS}: truncated or corrupt")
    if tensor_count > MAX_TENSORS or tensor_count * 32 > cur.size - cur.pos:
        raise cur.fail(f"header claims {tensor_count} tensors, more than a file of {cur.size} bytes can hold "
                       f"or the limit of {MAX_TENSORS}: truncated or corrupt")

    metadata: dict[str, Any] = {}
    for number in range(kv_count):
        key = cur.string(f"metadata key #{number}", MAX_NAME_BYTES)
        if key in metadata:
            raise cur.fail(f"metadata key '{key}' appears twice")
        value_type = cur.u32(f"the type of metadata '{key}'")
        metadata[key] = _read_value(cur, value_type, f"metadata '{key}'")
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0 or alignment & (alignment - 1):
        raise cur.fail(f"metadata 'general.alignment' = {alignment!r} is not a power of two")

    infos, names = [], set()
    for number in range(tensor_count):
        name = cur.string(f"the name of tensor #{number}", MAX_NAME_BYTES)
        if name in names:
            raise cur.fail(f"tensor '{name}' appears twice")
        names.add(name)
        n_dims = cur.u32(f"tensor '{name}' (dimension count)")
        if not 1 <= n_dims <= MAX_DIMS:
            raise cur.fail(f"tensor '{name}' has {n_dims} dimensions (must be 1 to {MAX_DIMS})")
        dims = cur.unpack(f"<{n_dims}Q", f"tensor '{name}' (dimensions)")
        type_id = cur.u32(f"tensor '{name}' (type)")
        offset = cur.u64(f"tensor '{name}' (data offset)")
        if any(dim == 0 for dim in dims):
            raise cur.fail(f"tensor '{name}' has a zero dimension {list(dims)}")
        n_elements = math.prod(dims)
        if n_elements >= 1 << 63:
            raise cur.fail(f"tensor '{name}' dimensions {list(dims)} multiply past 2**63 elements")
        try:
            ggml_type = GGMLQuantizationType(type_id)
        except ValueError:
            raise cur.fail(f"tensor '{name}' has unknown type id {type_id}") from None
        block, type_size = GGML_QUANT_SIZES[ggml_type]
        if dims[0] % block:
            raise cur.fail(f"tensor '{name}' row length {dims[0]} is not a multiple of the "
                           f"{ggml_type.name} block size {block}")
        infos.append(_TensorInfo(name, tuple(dims), ggml_type.name, offset, n_elements // block * type_size))

    data_start = -(-cur.pos // alignment) * alignment
    for info in infos:
        if info.offset % alignment:
            raise cur.fail(f"tensor '{info.name}' data offset {info.offset} is not a multiple of the "
                           f"alignment {alignment}")
        end = data_start + info.offset + info.nbytes
        if end > cur.size:
            raise cur.fail(f"tensor '{info.name}' data (bytes {data_start + info.offset} to {end}) runs past the "
                           f"end of the file ({cur.size} bytes): truncated or corrupt")
    by_offset = sorted(infos, key=lambda info: info.offset)
    for before, after in zip(by_offset, by_offset[1:]):
        if before.offset + before.nbytes > after.offset:
            raise cur.fail(f"tensors '{before.name}' and '{after.name}' overlap in the file")
    return _Layout(cur.size, metadata, infos, data_start)


def _read_value(cur: _Cursor, value_type: int, what: str) -> Any:
    if value_type == _STRING:
        return cur.string(what)
    if value_type in _SCALARS:
        value = cur.unpack(_SCALARS[value_type][0], what)[0]
        return bool(value) if value_type == _BOOL else value
    if value_type != _ARRAY:
        raise cur.fail(f"{what} has unknown value type {value_type}")
    item_type = cur.u32(f"{what} (array type)")
    length = cur.u64(f"{what} (array length)")
    if item_type == _ARRAY:
        raise cur.fail(f"{what} is an array of arrays, which GGUF models do not use")
    if item_type != _STRING and item_type not in _SCALARS:
        raise cur.fail(f"{what} is an array of unknown value type {item_type}")
    if length > MAX_ARRAY_ELEMENTS:
        raise cur.fail(f"{what} has {length} elements, more than the {MAX_ARRAY_ELEMENTS} allowed")
    if item_type == _STRING:
        if length * 8 > cur.size - cur.pos:
            raise cur.fail(f"{what} claims {length} strings, more than the rest of the file can hold")
        return [cur.string(f"{what}[{index}]") for index in range(length)]
    dtype = np.dtype(_SCALARS[item_type][1])
    start = cur.skip(length * dtype.itemsize, what)
    values = np.frombuffer(cur.data[start:cur.pos], dtype=dtype)
    return (values != 0).tolist() if item_type == _BOOL else values.tolist()


# --- architectures and hyperparameters --------------------------------------------------------

@dataclass(frozen=True)
class _Architecture:
    model_type: str
    hf_class: str
    rope_interleaved: bool      # llama.cpp permuted Q/K rows at conversion
    qkv_bias: bool = False      # q/k/v projections always have biases (Qwen2)


ARCHITECTURES = {
    "llama": _Architecture("llama", "LlamaForCausalLM", rope_interleaved=True),
    "mistral": _Architecture("mistral", "MistralForCausalLM", rope_interleaved=True),
    "mixtral": _Architecture("mixtral", "MixtralForCausalLM", rope_interleaved=True),
    "qwen2": _Architecture("qwen2", "Qwen2ForCausalLM", rope_interleaved=False, qkv_bias=True),
}
_MIXTRAL = ARCHITECTURES["mixtral"]
_MISTRAL = ARCHITECTURES["mistral"]


@dataclass
class _HParams:
    arch_name: str
    arch: _Architecture
    n_layers: int
    hidden: int
    intermediate: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    context_length: int
    rms_eps: float
    rope_theta: float
    n_experts: int = 0
    n_experts_used: int = 0
    sliding_window: int | None = None
    attention_bias: bool = False


def _hyperparameters(arch_name: str, meta: dict, infos: list[_TensorInfo], path: str) -> _HParams:
    def key(suffix):
        return f"{arch_name}.{suffix}"

    def integer(suffix, default=None, *, minimum=1):
        name = key(suffix)
        value = meta.get(name, default)
        if value is None:
            raise ModelFileError(path, f"missing required metadata key '{name}'")
        if isinstance(value, list):
            raise UnsupportedModelError(f"{path}: per-layer values for '{name}' are not supported")
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ModelFileError(path, f"metadata '{name}' = {value!r} is not an integer >= {minimum}")
        return value

    def number(suffix, default=None):
        name = key(suffix)
        value = meta.get(name, default)
        if value is None:
            raise ModelFileError(path, f"missing required metadata key '{name}'")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ModelFileError(path, f"metadata '{name}' = {value!r} is not a positive number")
        return _short_float(value)

    by_name = {info.name: info for info in infos}
    n_layers = integer("block_count")
    if n_layers > min(MAX_LAYERS, len(infos) // TENSORS_PER_LAYER):
        raise ModelFileError(path, f"metadata '{key('block_count')}' = {n_layers} layers, but the file has only "
                                   f"{len(infos)} tensors (each layer needs at least {TENSORS_PER_LAYER})")
    hidden = integer("embedding_length")
    n_heads = integer("attention.head_count")
    n_kv_heads = integer("attention.head_count_kv", n_heads)
    if n_heads % n_kv_heads:
        raise ModelFileError(path, f"{n_heads} attention heads are not a multiple of {n_kv_heads} key/value heads")
    if key("attention.key_length") not in meta and hidden % n_heads:
        raise ModelFileError(path, f"embedding length {hidden} is not a multiple of the head count {n_heads}")
    head_dim = integer("attention.key_length", hidden // n_heads)
    if integer("attention.value_length", head_dim) != head_dim:
        raise UnsupportedModelError(f"{path}: key and value head sizes differ")
    if head_dim % 2:
        raise ModelFileError(path, f"head size {head_dim} is odd; rope needs an even size")
    rope_dims = integer("rope.dimension_count", head_dim)
    if rope_dims != head_dim:
        raise UnsupportedModelError(f"{path}: rope over {rope_dims} of {head_dim} head dims (partial rotary) "
                                    f"is not supported")

    n_experts = integer("expert_count", 0, minimum=0)
    arch = ARCHITECTURES[arch_name]
    if arch is _MIXTRAL and not n_experts:
        raise ModelFileError(path, f"missing required metadata key '{key('expert_count')}'")
    if n_experts:
        if arch.qkv_bias:
            raise UnsupportedModelError(f"{path}: mixture-of-experts {arch_name} models are not supported")
        if n_experts > MAX_EXPERTS:
            raise ModelFileError(path, f"metadata '{key('expert_count')}' = {n_experts} is implausible")
        arch = _MIXTRAL
    n_experts_used = integer("expert_used_count", 2 if n_experts else 0, minimum=0)
    if n_experts and not 1 <= n_experts_used <= n_experts:
        raise ModelFileError(path, f"{n_experts_used} experts used per token out of {n_experts}")
    intermediate = integer("feed_forward_length", meta.get(key("expert_feed_forward_length")) if n_experts else None)

    sliding_window = meta.get(key("attention.sliding_window"))
    if sliding_window is not None:
        sliding_window = integer("attention.sliding_window")
        if arch.model_type == "llama":
            arch = _MISTRAL  # Llama has no sliding window; Mistral is Llama with one
        elif arch.qkv_bias:
            raise UnsupportedModelError(f"{path}: sliding-window attention in {arch_name} models is not supported")

    embedding = by_name.get("token_embd.weight")
    if embedding is None:
        raise ModelFileError(path, "missing tensor 'token_embd.weight'")
    if len(embedding.dims) != 2:
        raise ModelFileError(path, f"tensor 'token_embd.weight' has shape {list(embedding.shape)}, expected 2 dims")
    vocab_size = embedding.shape[0]
    declared_vocab = meta.get(key("vocab_size"))
    if declared_vocab is not None and declared_vocab != vocab_size:
        raise ModelFileError(path, f"metadata '{key('vocab_size')}' = {declared_vocab} but 'token_embd.weight' "
                                   f"has {vocab_size} rows")

    # Llama may carry q/k/v/o biases (HF's attention_bias); Qwen2 always has q/k/v ones.
    attention_bias = not arch.qkv_bias and "blk.0.attn_q.bias" in by_name
    if attention_bias and arch.model_type != "llama":
        raise UnsupportedModelError(f"{path}: attention biases in a {arch.model_type} model are not supported")

    return _HParams(
        arch_name=arch_name, arch=arch, n_layers=n_layers, hidden=hidden, intermediate=intermediate,
        n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim, vocab_size=vocab_size,
        context_length=integer("context_length"), rms_eps=number("attention.layer_norm_rms_epsilon"),
        rope_theta=number("rope.freq_base", 10000.0), n_experts=n_experts, n_experts_used=n_experts_used,
        sliding_window=sliding_window, attention_bias=attention_bias,
    )


def _short_float(value) -> float:
    """A float32 metadata value as the decimal it was written from (9.99999974e-06 -> 1e-05)."""
    return float(str(np.float32(value)))


# --- which tensor goes where ---------------------------------------------------------------

@dataclass
class _Target:
    shape: tuple[int, ...]   # expected numpy shape, HF orientation
    hf_names: list[str]      # one name, or one per expert (split along dim 0)
    rope_heads: int = 0      # >0: undo GGUF's rope row order with this many heads


def _plan_tensors(hp: _HParams, infos: list[_TensorInfo], path: str) -> list[tuple[_TensorInfo, _Target]]:
    """Match every tensor in the file to its HF name(s) and expected shape; refuse what doesn't fit."""
    present = {info.name for info in infos}
    H, F, D = hp.hidden, hp.intermediate, hp.head_dim
    q_rows, kv_rows = hp.n_heads * D, hp.n_kv_heads * D
    q_heads, kv_heads = (hp.n_heads, hp.n_kv_heads) if hp.arch.rope_interleaved else (0, 0)  # rows to reorder
    required: dict[str, _Target] = {
        "token_embd.weight": _Target((hp.vocab_size, H), ["model.embed_tokens.weight"]),
        "output_norm.weight": _Target((H,), ["model.norm.weight"]),
    }
    optional: dict[str, _Target | None] = {
        "output.weight": _Target((hp.vocab_size, H), ["lm_head.weight"]),
        "rope_freqs.weight": None,   # read for the config, not a weight
    }
    for i in range(hp.n_layers):
        if len(required) > len(present):
            break  # more tensors required than the file has: report the first missing one below
        blk, hf = f"blk.{i}.", f"model.layers.{i}."
        required.update({
            blk + "attn_norm.weight": _Target((H,), [hf + "input_layernorm.weight"]),
            blk + "ffn_norm.weight": _Target((H,), [hf + "post_attention_layernorm.weight"]),
            blk + "attn_q.weight": _Target((q_rows, H), [hf + "self_attn.q_proj.weight"], q_heads),
            blk + "attn_k.weight": _Target((kv_rows, H), [hf + "self_attn.k_proj.weight"], kv_heads),
            blk + "attn_v.weight": _Target((kv_rows, H), [hf + "self_attn.v_proj.weight"]),
            blk + "attn_output.weight": _Target((H, q_rows), [hf + "self_attn.o_proj.weight"]),
        })
        if hp.arch.qkv_bias or hp.attention_bias:
            required.update({
                blk + "attn_q.bias": _Target((q_rows,), [hf + "self_attn.q_proj.bias"], q_heads),
                blk + "attn_k.bias": _Target((kv_rows,), [hf + "self_attn.k_proj.bias"], kv_heads),
                blk + "attn_v.bias": _Target((kv_rows,), [hf + "self_attn.v_proj.bias"]),
            })
        if hp.attention_bias:
            required[blk + "attn_output.bias"] = _Target((H,), [hf + "self_attn.o_proj.bias"])
        optional[blk + "attn_rot_embd.weight"] = None  # old files: a rope table, not a weight
        if hp.n_experts:
            E, moe = hp.n_experts, hf + "block_sparse_moe."
            required[blk + "ffn_gate_inp.weight"] = _Target((E, H), [moe + "gate.weight"])
            # GGUF ffn_gate/down/up are HF's w1/w2/w3; current files stack the experts in one 3-D
            # tensor ([expert, out, in]), older ones have one tensor per expert.
            experts = {"ffn_gate": ("w1", (F, H)), "ffn_down": ("w2", (H, F)), "ffn_up": ("w3", (F, H))}
            stacked = blk + "ffn_gate_exps.weight" in present
            for gguf_name, (w, shape) in experts.items():
                hf_names = [f"{moe}experts.{e}.{w}.weight" for e in range(E)]
                if stacked:
                    required[f"{blk}{gguf_name}_exps.weight"] = _Target((E, *shape), hf_names)
                else:
                    for e in range(E):
                        required[f"{blk}{gguf_name}.{e}.weight"] = _Target(shape, [hf_names[e]])
        else:
            required.update({
                blk + "ffn_gate.weight": _Target((F, H), [hf + "mlp.gate_proj.weight"]),
                blk + "ffn_up.weight": _Target((F, H), [hf + "mlp.up_proj.weight"]),
                blk + "ffn_down.weight": _Target((H, F), [hf + "mlp.down_proj.weight"]),
            })

    missing = [name for name in required if name not in present]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ModelFileError(path, f"missing tensor '{missing[0]}'{more} for a {hp.arch_name} model "
                                   f"with {hp.n_layers} layers")
    plan = []
    for info in infos:
        target = required.get(info.name) or optional.get(info.name)
        if target is None:
            if info.name in optional:
                continue
            raise UnsupportedModelError(f"{path}: tensor '{info.name}' is not part of a {hp.arch_name} model "
                                        f"trimtab understands")
        if info.shape != target.shape:
            raise ModelFileError(path, f"tensor '{info.name}' has shape {list(info.shape)}, the metadata implies "
                                       f"{list(target.shape)}")
        if info.type_name not in SUPPORTED_TENSOR_TYPES:
            raise UnsupportedModelError(f"{path}: tensor '{info.name}' has type {info.type_name}, which trimtab does "
                                        f"not read (supported: {', '.join(SUPPORTED_TENSOR_TYPES)})")
        plan.append((info, target))
    rope_freqs = next((info for info in infos if info.name == "rope_freqs.weight"), None)
    if rope_freqs is not None:
        if rope_freqs.shape != (D // 2,) or rope_freqs.type_name not in ("F32", "F16", "BF16"):
            raise ModelFileError(path, f"tensor 'rope_freqs.weight' should be {D // 2} floats, one per rope frequency")
    return plan


def _load_weights(plan, file_data: np.memmap, data_start: int, file_size: int, path: str) -> dict[str, torch.Tensor]:
    """Dequantize one tensor at a time (numpy -> torch float32), in HF layout."""
    from tqdm.auto import tqdm

    weights: dict[str, torch.Tensor] = {}
    bar = tqdm(plan, desc=f"Reading {os.path.basename(path)}", unit="tensor", leave=False,
               disable=file_size < PROGRESS_BAR_MIN_BYTES)
    for info, target in bar:
        value = _dequantize(file_data, data_start, info, path)
        if target.rope_heads:
            value = unpermute_rope_rows(value, target.rope_heads)
        if len(target.hf_names) == 1:
            weights[target.hf_names[0]] = value
        else:
            for name, part in zip(target.hf_names, value.unbind(0)):
                weights[name] = part.clone()  # its own storage: safetensors refuses shared ones
    return weights


def _dequantize(file_data: np.memmap, data_start: int, info: _TensorInfo, path: str) -> torch.Tensor:
    """One tensor's bytes (their extent already checked) as a float32 torch tensor of its numpy shape."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quant_shape_to_byte_shape

    ggml_type = GGMLQuantizationType[info.type_name]
    start = data_start + info.offset
    raw = file_data[start:start + info.nbytes]
    try:
        if ggml_type == GGMLQuantizationType.F32:
            array = raw.view(np.float32).reshape(info.shape).copy()  # a copy: off the read-only mapping
        elif ggml_type == GGMLQuantizationType.F16:
            array = raw.view(np.float16).reshape(info.shape).astype(np.float32)
        else:
            array = dequantize(raw.reshape(quant_shape_to_byte_shape(info.shape, ggml_type)), ggml_type)
    except Exception as error:
        raise ModelFileError(path, f"cannot dequantize tensor '{info.name}': {type(error).__name__}: {error}") from None
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


# --- configs -------------------------------------------------------------------------------

def _hf_config(hp: _HParams, meta: dict, rope_freqs, tied: bool, path: str) -> dict:
    config: dict[str, Any] = {
        "architectures": [hp.arch.hf_class],
        "model_type": hp.arch.model_type,
        "vocab_size": hp.vocab_size,
        "hidden_size": hp.hidden,
        "intermediate_size": hp.intermediate,
        "num_hidden_layers": hp.n_layers,
        "num_attention_heads": hp.n_heads,
        "num_key_value_heads": hp.n_kv_heads,
        "head_dim": hp.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": hp.context_length,
        "rms_norm_eps": hp.rms_eps,
        "rope_theta": hp.rope_theta,
        "rope_scaling": _rope_scaling(hp, meta, rope_freqs, path),
        "tie_word_embeddings": tied,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        "torch_dtype": "float32",
    }
    if hp.arch.model_type == "llama":
        config["attention_bias"] = hp.attention_bias
        config["mlp_bias"] = False
    elif hp.arch.model_type in ("mistral", "mixtral"):
        config["sliding_window"] = hp.sliding_window
    elif hp.arch.model_type == "qwen2":
        config["use_sliding_window"] = False
        config["sliding_window"] = None
        config["max_window_layers"] = hp.n_layers
    if hp.n_experts:
        config["num_local_experts"] = hp.n_experts
        config["num_experts_per_tok"] = hp.n_experts_used
    return config


def _rope_scaling(hp: _HParams, meta: dict, rope_freqs, path: str) -> dict | None:
    """HF's rope_scaling from GGUF's rope.scaling.* keys, or from a rope_freqs tensor (Llama 3.1+)."""
    prefix = f"{hp.arch_name}.rope."
    kind = meta.get(prefix + "scaling.type")
    factor = meta.get(prefix + "scaling.factor", meta.get(prefix + "scale_linear"))
    if rope_freqs is not None:
        if not (np.isfinite(rope_freqs).all() and (rope_freqs > 0).all()):
            raise ModelFileError(path, "tensor 'rope_freqs.weight' holds values that are not positive numbers")
        if kind not in (None, "none"):
            raise UnsupportedModelError(f"{path}: both rope scaling '{kind}' and a rope_freqs tensor")
        return llama3_rope_scaling(rope_freqs, hp.rope_theta, hp.head_dim, path)
    if kind is None:
        kind = "linear" if factor is not None else "none"
    if kind == "none":
        return None
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 0:
        raise ModelFileError(path, f"rope scaling '{kind}' without a positive '{prefix}scaling.factor'")
    if kind == "linear":
        return None if factor == 1 else {"rope_type": "linear", "factor": _short_float(factor)}
    if kind == "yarn":
        original = meta.get(prefix + "scaling.original_context_length")
        if not isinstance(original, int) or isinstance(original, bool) or original <= 0:
            raise ModelFileError(path, f"yarn rope scaling without '{prefix}scaling.original_context_length'")
        scaling = {"rope_type": "yarn", "factor": _short_float(factor), "original_max_position_embeddings": original}
        for gguf_key, hf_key in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
            value = meta.get(prefix + "scaling." + gguf_key)
            if value is not None:
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise ModelFileError(path, f"metadata '{prefix}scaling.{gguf_key}' = {value!r} is not a number")
                scaling[hf_key] = _short_float(value)
        return scaling
    raise UnsupportedModelError(f"{path}: rope scaling type {kind!r} is not supported (supported: none, linear, yarn)")


def llama3_factors(theta: float, head_dim: int, factor: float, low_freq_factor: float,
                   high_freq_factor: float, original_context: int) -> np.ndarray:
    """Per-frequency divisors of Llama 3's rope scaling (what GGUF stores as rope_freqs)."""
    base = base_inv_freq(theta, head_dim).double()
    scaling = {"factor": factor, "low_freq_factor": low_freq_factor, "high_freq_factor": high_freq_factor,
               "original_max_position_embeddings": original_context}
    return (base / llama3_inv_freq(base, scaling)).numpy()


def llama3_rope_scaling(rope_freqs: np.ndarray, theta: float, head_dim: int, path: str) -> dict | None:
    """Recover HF's llama3 rope_scaling from the factors GGUF stores.

    Long waves are divided by `factor` (the largest value); in between, 1/f = (1-s)/factor + s with
    s = (L / wavelen - lo) / (hi - lo), a straight line in 1/wavelen. A line has two parameters and
    (L, lo, hi) three, so lo = 1 is taken, as every Llama 3 release uses; with fewer than two points on
    the line hi = 4 is taken too. Fitted values are rounded (stored factors are float32, sometimes
    computed in float32) and the result is checked by recomputing every factor.
    """
    factors = np.asarray(rope_freqs, dtype=np.float64)
    factor = float(factors.max())
    if np.allclose(factors, 1.0, rtol=0, atol=1e-6):
        return None
    wavelen = (2 * math.pi / base_inv_freq(theta, head_dim).double()).numpy()
    low = 1.0
    middle = (factors > 1 + 1e-4) & (factors < factor * (1 - 1e-4))
    smooth = (1 / factors[middle] - 1 / factor) / (1 - 1 / factor)
    x = 1 / wavelen[middle]
    if middle.sum() >= 2:
        slope, intercept = np.polyfit(x, smooth, 1)
        high = low - low / intercept if intercept < 0 else float("nan")
        original = slope * (high - low)
    else:
        high = 4.0
        if middle.sum() == 1:
            original = (smooth[0] * (high - low) + low) / x[0]
        else:  # no point in between: any L with short waves < L/hi and long waves > L/lo fits
            short, long = wavelen[factors <= 1 + 1e-4], wavelen[factors >= factor * (1 - 1e-4)]
            lower = short.max() * high if short.size else 0.0
            upper = long.min() * low if long.size else float("inf")
            original = 8192.0 if lower <= 8192 <= upper else math.ceil(lower)
    if math.isfinite(high) and math.isfinite(original) and high > low and original > 0:
        scaling = {
            "rope_type": "llama3",
            "factor": round(factor, 4),
            "low_freq_factor": low,
            "high_freq_factor": round(float(high), 4),
            "original_max_position_embeddings": int(round(original)),
        }
        expected = llama3_factors(theta, head_dim, scaling["factor"], low, scaling["high_freq_factor"],
                                  scaling["original_max_position_embeddings"])
        if np.allclose(expected, factors, rtol=1e-3, atol=0):
            return scaling
    raise UnsupportedModelError(f"{path}: tensor 'rope_freqs.weight' does not match Llama 3 rope scaling; "
                                f"no Hugging Face rope_scaling reproduces it")


def _generation_config(meta: dict) -> dict:
    eos = meta.get("tokenizer.ggml.eos_token_id")
    stops = []
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        token_id = meta.get(key)
        if isinstance(token_id, int) and token_id not in stops:
            stops.append(token_id)
    return {
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": stops if len(stops) > 1 else eos,
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
    }
