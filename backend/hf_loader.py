"""Read Hugging Face model directories: ``config.json`` and safetensors weights.

Safety first: every file is checked by this module before anything else reads it, so a
truncated download, a hand-edited index or a hostile header gives a
:class:`~trimtab.backend.errors.ModelFileError` that names the file and says what is wrong
in plain words -- never a crash, a hang or a multi-gigabyte allocation.

Memory second: weights are memory-mapped through the ``safetensors`` library
(``safe_open(framework="pt")``). Opening a model reads only the headers; each
``weights[name]`` is a view on the mapped file, so the pages are read on first touch and
peak RAM stays near the size of the weights actually used.

Format rules checked here (they match what the safetensors library itself enforces):

* 8-byte little-endian header length N, N <= 100 MB, N <= file size - 8;
* the header is UTF-8 JSON, an object; ``__metadata__`` (optional) maps strings to strings;
  every other key is a tensor ``{"dtype": str, "shape": [int...], "data_offsets": [b, e]}``;
* offsets are relative to the data section that follows the header; b <= e;
  e - b == prod(shape) * itemsize;
* sorted by offset, the tensors tile the data section exactly: no overlap, no gap and no
  bytes after the last tensor (the library calls these "invalid offset" and "incomplete
  metadata"); a data section shorter than the tensors need means the file is truncated.
"""
from __future__ import annotations

import collections.abc
import json
import os
import stat
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from .errors import ModelFileError, UnsupportedModelError

__all__ = [
    "read_config",
    "open_weights",
    "SafetensorsWeights",
    "TensorInfo",
    "read_safetensors_header",
    "SUPPORTED_WEIGHT_DTYPES",
    "SAFETENSORS_DTYPE_BITS",
]

CONFIG_NAME = "config.json"
SINGLE_WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"

MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
MAX_JSON_FILE_BYTES = 64 * 1024 * 1024  # config.json / index.json: real ones are kilobytes
_SHAPE_ELEMENT_LIMIT = 1 << 62  # stop multiplying past this: no file holds that much

# Bits per element of every dtype the safetensors format defines.
SAFETENSORS_DTYPE_BITS: dict[str, int] = {
    "BOOL": 8,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "C64": 64,
    "F64": 64,
    "I64": 64,
    "U64": 64,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
}


def _torch_dtype_table() -> dict[str, torch.dtype]:
    names = {
        "BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "U16": "uint16",
        "F16": "float16", "BF16": "bfloat16", "I32": "int32", "U32": "uint32",
        "F32": "float32", "C64": "complex64", "F64": "float64", "I64": "int64",
        "U64": "uint64", "F8_E5M2": "float8_e5m2", "F8_E4M3": "float8_e4m3fn",
        "F8_E8M0": "float8_e8m0fnu", "F8_E4M3FNUZ": "float8_e4m3fnuz",
        "F8_E5M2FNUZ": "float8_e5m2fnuz", "F4": "float4_e2m1fn_x2",
    }
    table = {}
    for code, attr in names.items():
        dt = getattr(torch, attr, None)  # older torch lacks some of these
        if isinstance(dt, torch.dtype):
            table[code] = dt
    return table


_TORCH_DTYPES = _torch_dtype_table()

# Dtypes trimtab computes with; a model asking for a weight stored otherwise gets a clear error.
SUPPORTED_WEIGHT_DTYPES: frozenset[str] = frozenset({"F32", "F16", "BF16"})


# ---------------------------------------------------------------------------------------
# Small safe file reading helpers


def _open_regular(path: Path, what: str) -> int:
    """Open ``path`` read-only and return the fd; ModelFileError unless a regular file.

    O_NONBLOCK keeps a FIFO or device node from blocking the open (it would hang forever).
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise ModelFileError(path, f"{what} is missing") from None
    except IsADirectoryError:
        raise ModelFileError(path, f"{what} is a directory, not a file") from None
    except PermissionError:
        raise ModelFileError(path, f"{what} cannot be read: permission denied") from None
    except OSError as e:
        raise ModelFileError(path, f"{what} cannot be opened: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)
    except OSError as e:
        os.close(fd)
        raise ModelFileError(path, f"{what} cannot be examined: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        if stat.S_ISDIR(st.st_mode):
            raise ModelFileError(path, f"{what} is a directory, not a file")
        raise ModelFileError(path, f"{what} is not a regular file")
    if hasattr(os, "set_blocking"):
        try:
            os.set_blocking(fd, True)
        except OSError:
            pass
    return fd


def _read_exact(fd: int, n: int, path: Path, what: str) -> bytes:
    chunks = []
    left = n
    while left > 0:
        try:
            chunk = os.read(fd, min(left, 1 << 24))
        except OSError as e:
            raise ModelFileError(path, f"reading {what} failed: {e.strerror or e}") from None
        if not chunk:
            raise ModelFileError(
                path, f"file ended while reading {what} ({n - left} of {n} bytes read): "
                "the file is truncated")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number with a fraction or exponent"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class _DuplicateKey(Exception):
    def __init__(self, key: str):
        self.key = key


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


def _parse_json(raw: bytes, path: Path, what: str, *, reject_duplicates: bool) -> Any:
    """Decode UTF-8 JSON, turning every failure into a ModelFileError with a position."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ModelFileError(
            path, f"{what} is not valid UTF-8 (bad byte at offset {e.start})") from None
    if text.startswith("\ufeff"):  # tolerate a byte-order mark some editors write
        text = text[1:]
    hook = _no_duplicates if reject_duplicates else None
    try:
        return json.loads(text, object_pairs_hook=hook)
    except json.JSONDecodeError as e:
        raise ModelFileError(
            path, f"{what} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}"
        ) from None
    except _DuplicateKey as e:
        raise ModelFileError(path, f"{what} names {e.key!r} twice") from None
    except RecursionError:
        raise ModelFileError(path, f"{what} is not valid JSON: nested too deeply") from None
    except ValueError as e:  # e.g. an integer literal with too many digits
        raise ModelFileError(path, f"{what} is not valid JSON: {e}") from None


def _read_json_file(path: Path, what: str, *, reject_duplicates: bool = False) -> Any:
    fd = _open_regular(path, what)
    try:
        size = os.fstat(fd).st_size
        if size > MAX_JSON_FILE_BYTES:
            raise ModelFileError(
                path, f"{what} is {size} bytes, far larger than any real one "
                f"(limit {MAX_JSON_FILE_BYTES} bytes)")
        raw = _read_exact(fd, size, path, what)
    finally:
        os.close(fd)
    if not raw.strip():
        raise ModelFileError(path, f"{what} is empty")
    return _parse_json(raw, path, what, reject_duplicates=reject_duplicates)


# ---------------------------------------------------------------------------------------
# config.json

# key -> inclusive upper bound; each must be a positive integer.
_REQUIRED_SIZES: dict[str, int] = {
    "hidden_size": 1 << 20,
    "num_hidden_layers": 1 << 16,
    "num_attention_heads": 1 << 16,
    "intermediate_size": 1 << 22,
    "vocab_size": 1 << 24,
}
# Checked only when present and not null.
_OPTIONAL_SIZES: dict[str, int] = {
    "num_key_value_heads": 1 << 16,
    "head_dim": 1 << 16,
    "max_position_embeddings": 1 << 30,
}


def _check_size(path: Path, where: str, key: str, value: Any, limit: int) -> None:
    if not _is_int(value):
        raise ModelFileError(
            path, f"{where}{key!r} must be a positive integer, found {_kind(value)} "
            f"({json.dumps(value)[:40]})")
    if value <= 0:
        raise ModelFileError(path, f"{where}{key!r} must be a positive integer, found {value}")
    if value > limit:
        raise ModelFileError(
            path, f"{where}{key!r} = {value} is absurdly large (limit {limit}); "
            "the file is corrupt")


def read_config(model_dir: str | os.PathLike) -> dict:
    """Read and check ``model_dir/config.json``; return the dict unchanged.

    Requires ``architectures`` (a non-empty list of strings) or ``model_type`` (a non-empty
    string) -- at least one, and each well-typed where present -- and the sizes
    ``hidden_size``, ``num_hidden_layers``, ``num_attention_heads``, ``intermediate_size`` and
    ``vocab_size`` as positive integers within sane bounds. Multimodal configs that keep the
    language model's sizes under ``text_config`` are accepted: a size missing at the top
    level is looked up there.
    """
    path = Path(model_dir) / CONFIG_NAME
    if not Path(model_dir).is_dir():
        if Path(model_dir).exists():
            raise ModelFileError(model_dir, "not a directory (expected a model directory "
                                 "holding config.json)")
        raise ModelFileError(model_dir, "model directory does not exist")
    cfg = _read_json_file(path, "config.json")
    if not isinstance(cfg, dict):
        raise ModelFileError(path, f"config.json must be a JSON object, found {_kind(cfg)}")

    has_arch = "architectures" in cfg and cfg["architectures"] is not None
    has_type = "model_type" in cfg and cfg["model_type"] is not None
    if not has_arch and not has_type:
        raise ModelFileError(
            path, "config.json has neither 'architectures' nor 'model_type'; "
            "cannot tell which model this is")
    if has_arch:
        arch = cfg["architectures"]
        if not isinstance(arch, list) or not arch or not all(
                isinstance(a, str) and a for a in arch):
            raise ModelFileError(
                path, "'architectures' must be a non-empty list of strings, found "
                f"{_kind(arch)} ({json.dumps(arch)[:60]})")
    if has_type:
        mt = cfg["model_type"]
        if not isinstance(mt, str) or not mt:
            raise ModelFileError(
                path, f"'model_type' must be a non-empty string, found {_kind(mt)}")

    text_cfg = cfg.get("text_config")
    if text_cfg is not None and not isinstance(text_cfg, dict):
        raise ModelFileError(path, f"'text_config' must be an object, found {_kind(text_cfg)}")
    for key, limit in _REQUIRED_SIZES.items():
        if key in cfg:
            _check_size(path, "", key, cfg[key], limit)
        elif text_cfg is not None and key in text_cfg:
            _check_size(path, "text_config.", key, text_cfg[key], limit)
        else:
            raise ModelFileError(path, f"config.json lacks the required key {key!r}")
    for scope, where in ((cfg, ""), (text_cfg or {}, "text_config.")):
        for key, limit in _OPTIONAL_SIZES.items():
            if scope.get(key) is not None:
                _check_size(path, where, key, scope[key], limit)
    return cfg


# ---------------------------------------------------------------------------------------
# safetensors headers


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives. Offsets are absolute positions in ``file``."""

    name: str
    file: Path
    dtype: str  # safetensors code, e.g. "BF16"
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def _shape_numel(shape: list[int]) -> int:
    if any(d == 0 for d in shape):
        return 0
    n = 1
    for d in shape:
        n *= d
        if n > _SHAPE_ELEMENT_LIMIT:
            return -1
    return n


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Read and fully check a safetensors file's header, without touching its data.

    Returns ``({name: TensorInfo}, metadata)``; raises ModelFileError naming ``path`` and
    the problem for anything the format forbids.
    """
    path = Path(path)
    fd = _open_regular(path, "safetensors file")
    try:
        file_size = os.fstat(fd).st_size
        if file_size == 0:
            raise ModelFileError(
                path, "file is empty (0 bytes); a safetensors file starts with an 8-byte "
                "header length")
        if file_size < 8:
            raise ModelFileError(
                path, f"file is too short ({file_size} bytes) to be a safetensors file: "
                "it must start with an 8-byte header length")
        (n,) = struct.unpack("<Q", _read_exact(fd, 8, path, "the header length"))
        if n > MAX_HEADER_BYTES:
            raise ModelFileError(
                path, f"header length {n} is absurd (over {MAX_HEADER_BYTES} bytes): "
                "this is not a safetensors file, or it is corrupt")
        if n > file_size - 8:
            raise ModelFileError(
                path, f"header length {n} reaches beyond the end of the file "
                f"({file_size} bytes): the file is truncated or not a safetensors file")
        if n == 0:
            raise ModelFileError(path, "header length is 0; the header must be a JSON object")
        raw = _read_exact(fd, n, path, "the header")
    finally:
        os.close(fd)

    header = _parse_json(raw, path, "header", reject_duplicates=True)
    if not isinstance(header, dict):
        raise ModelFileError(path, f"header must be a JSON object, found {_kind(header)}")

    data_start = 8 + n
    data_len = file_size - data_start
    metadata: dict[str, str] = {}
    entries: list[tuple[str, str, tuple[int, ...], int, int]] = []
    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict) or not all(
                    isinstance(v, str) for v in entry.values()):
                raise ModelFileError(
                    path, "header '__metadata__' must map strings to strings")
            metadata = dict(entry)
            continue
        entries.append(_check_entry(path, name, entry, data_len))

    _check_layout(path, entries, data_len)
    infos = {
        name: TensorInfo(name, path, dtype, shape, data_start + b, data_start + e)
        for name, dtype, shape, b, e in entries
    }
    return infos, metadata


def _check_entry(path: Path, name: str, entry: Any, data_len: int):
    t = f"tensor {name!r}"
    if not isinstance(entry, dict):
        raise ModelFileError(path, f"header entry for {t} must be an object, found {_kind(entry)}")
    for key in ("dtype", "shape", "data_offsets"):
        if key not in entry:
            raise ModelFileError(path, f"header entry for {t} lacks {key!r}")
    dtype = entry["dtype"]
    if not isinstance(dtype, str):
        raise ModelFileError(path, f"{t} has dtype of the wrong type ({_kind(dtype)})")
    if dtype not in SAFETENSORS_DTYPE_BITS:
        raise ModelFileError(
            path, f"{t} has unknown dtype {dtype[:40]!r} (known: "
            f"{', '.join(sorted(SAFETENSORS_DTYPE_BITS))})")
    shape = entry["shape"]
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise ModelFileError(
            path, f"{t} has an invalid shape {json.dumps(shape)[:80]}: "
            "it must be a list of non-negative integers")
    offs = entry["data_offsets"]
    if not (isinstance(offs, list) and len(offs) == 2 and all(_is_int(o) for o in offs)):
        raise ModelFileError(
            path, f"{t} has invalid data_offsets {json.dumps(offs)[:80]}: "
            "they must be [begin, end], two integers")
    begin, end = offs
    if begin < 0 or end < 0:
        raise ModelFileError(path, f"{t} has negative data_offsets [{begin}, {end}]")
    if begin > end:
        raise ModelFileError(
            path, f"{t} has data_offsets [{begin}, {end}] with begin after end")
    numel = _shape_numel(shape)
    bits = SAFETENSORS_DTYPE_BITS[dtype]
    if numel < 0:
        raise ModelFileError(path, f"{t} has an absurd shape {shape}: too many elements")
    if (numel * bits) % 8:
        raise ModelFileError(
            path, f"{t}: {numel} elements of {dtype} ({bits} bits each) "
            "do not fill a whole number of bytes")
    want = numel * bits // 8
    if end - begin != want:
        raise ModelFileError(
            path, f"{t}: dtype/shape mismatch: {dtype} {shape} needs {want} bytes but "
            f"data_offsets [{begin}, {end}] span {end - begin}")
    return name, dtype, tuple(shape), begin, end


def _check_layout(path: Path, entries, data_len: int) -> None:
    """Tensors, sorted by offset, must tile the data section exactly."""
    order = sorted(entries, key=lambda e: (e[3], e[4]))
    expected = 0
    prev = None
    first_gap = None
    for name, _dtype, _shape, b, e in order:
        if b < expected:
            raise ModelFileError(
                path, f"tensors {prev[0]!r} [{prev[3]}, {prev[4]}] and {name!r} [{b}, {e}] "
                "have overlapping data_offsets")
        if b > expected and first_gap is None:
            first_gap = (expected, b, name)
        expected = e
        prev = (name, _dtype, _shape, b, e)
    if expected > data_len:
        if first_gap is None:
            raise ModelFileError(
                path, f"file is truncated: the header describes {expected} bytes of tensor "
                f"data but only {data_len} bytes follow the header")
        for name, _dtype, _shape, b, e in order:
            if e > data_len:
                raise ModelFileError(
                    path, f"tensor {name!r} has data_offsets [{b}, {e}] out of range: "
                    f"beyond the end of the data section ({data_len} bytes)")
    if first_gap is not None:
        g0, g1, name = first_gap
        raise ModelFileError(
            path, f"bytes {g0}..{g1} of the data section (before tensor {name!r}) belong "
            "to no tensor; the format requires tensors to cover the data without gaps")
    if expected < data_len:
        raise ModelFileError(
            path, f"{data_len - expected} unexpected bytes after the last tensor: the data "
            f"section is {data_len} bytes but the tensors cover {expected}")


# ---------------------------------------------------------------------------------------
# weights


class SafetensorsWeights(collections.abc.Mapping[str, torch.Tensor]):
    """Read-only ``Mapping[str, torch.Tensor]`` over one or more safetensors files.

    Headers are read and checked up front; keys, ``len``, ``dtype_of``, ``shape_of`` never
    touch tensor data. Each file is opened (memory-mapped, through ``safetensors.safe_open``)
    the first time one of its tensors is read. ``weights[name]`` returns the stored tensor
    (no dtype conversion: the model chooses its compute dtype) as a view on the mapping,
    pages read on first touch. The mapping is private: writing to a returned tensor never
    changes the file. Only F32, F16 and BF16 weights are served; :meth:`raw` returns a
    tensor of any dtype torch knows.
    """

    def __init__(self, infos: dict[str, TensorInfo], files: list[Path]):
        self._infos = dict(infos)
        self._files = tuple(files)
        self._handles: dict[Path, Any] = {}
        self._lock = threading.Lock()

    # Mapping protocol ---------------------------------------------------------------
    def __getitem__(self, name: str) -> torch.Tensor:
        info = self._info(name)
        if info.dtype not in SUPPORTED_WEIGHT_DTYPES:
            raise UnsupportedModelError(
                f"{info.file}: tensor {name!r} is stored as {info.dtype}; trimtab loads "
                f"weights stored as F32, F16 or BF16 only")
        return self._load(info)

    def __iter__(self) -> Iterator[str]:
        return iter(self._infos)

    def __len__(self) -> int:
        return len(self._infos)

    def __contains__(self, name: object) -> bool:
        return name in self._infos

    def __repr__(self) -> str:
        return f"<SafetensorsWeights {len(self)} tensors in {len(self._files)} file(s)>"

    # metadata without loading ---------------------------------------------------------
    @property
    def files(self) -> tuple[Path, ...]:
        """The safetensors files, in the order they were listed."""
        return self._files

    def info(self, name: str) -> TensorInfo:
        return self._info(name)

    def file_of(self, name: str) -> Path:
        return self._info(name).file

    def stored_dtype(self, name: str) -> str:
        """The safetensors dtype code as stored, e.g. ``"BF16"``."""
        return self._info(name).dtype

    def dtype_of(self, name: str) -> torch.dtype:
        """The torch dtype ``self.raw(name)`` would have, without loading it."""
        info = self._info(name)
        dt = _TORCH_DTYPES.get(info.dtype)
        if dt is None:
            raise UnsupportedModelError(
                f"{info.file}: tensor {name!r} is stored as {info.dtype}, which this "
                f"torch ({torch.__version__}) cannot represent")
        return dt

    def shape_of(self, name: str) -> tuple[int, ...]:
        return self._info(name).shape

    # loading --------------------------------------------------------------------------
    def raw(self, name: str) -> torch.Tensor:
        """The stored tensor whatever its dtype (no F32/F16/BF16 restriction)."""
        info = self._info(name)
        self.dtype_of(name)  # clear error for dtypes torch lacks
        return self._load(info)

    def read_copy(self, name: str) -> torch.Tensor:
        """A private in-memory copy of the stored tensor (any dtype), read with ordinary file
        reads. Unlike a view on the mapping it leaves no file pages counted in the process's
        memory once the caller has turned it into something else (a quantized layer's repacking)."""
        info = self._info(name)
        tensor = torch.empty(info.shape, dtype=self.dtype_of(name))
        if info.nbytes:
            buffer = memoryview(tensor.view(-1).view(torch.uint8).numpy())
            try:
                with open(info.file, "rb") as file:
                    file.seek(info.begin)
                    got = file.readinto(buffer)
            except OSError as e:
                raise ModelFileError(info.file, f"reading tensor {name!r} failed: {e.strerror or e}") from None
            if got != info.nbytes:
                raise ModelFileError(info.file, f"file ended inside tensor {name!r}: the file is truncated")
        return tensor

    def close(self) -> None:
        """Drop the open file handles. Tensors already returned stay valid."""
        with self._lock:
            handles, self._handles = self._handles, {}
        for h in handles.values():
            try:
                h.__exit__(None, None, None)
            except Exception:
                pass

    def __enter__(self) -> "SafetensorsWeights":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _info(self, name: str) -> TensorInfo:
        try:
            return self._infos[name]
        except (KeyError, TypeError):
            raise KeyError(name) from None

    def _handle(self, file: Path):
        with self._lock:
            h = self._handles.get(file)
            if h is not None:
                return h
            from safetensors import safe_open

            try:
                h = safe_open(os.fspath(file), framework="pt", device="cpu")
                h.__enter__()
            except Exception as e:  # the file changed since its header was checked
                raise ModelFileError(file, f"safetensors could not open it: {e}") from None
            self._handles[file] = h
            return h

    def _load(self, info: TensorInfo) -> torch.Tensor:
        h = self._handle(info.file)
        try:
            t = h.get_tensor(info.name)
        except Exception as e:
            raise ModelFileError(
                info.file, f"reading tensor {info.name!r} failed: {e}") from None
        if tuple(t.shape) != info.shape and info.dtype != "F4":
            raise ModelFileError(
                info.file, f"tensor {info.name!r} changed since the header was read "
                f"(shape {tuple(t.shape)}, expected {info.shape})")
        return t


def _resolve_shard(model_dir: Path, index_path: Path, fname: Any, tensor: str) -> Path:
    if not isinstance(fname, str) or not fname:
        raise ModelFileError(
            index_path, f"weight_map entry for {tensor!r} must be a file name, "
            f"found {_kind(fname)}")
    p = Path(fname)
    if p.is_absolute() or ".." in p.parts or "\\" in fname or "\0" in fname:
        raise ModelFileError(
            index_path, f"weight_map entry for {tensor!r} names {fname!r}, which is not a "
            "file inside the model directory")
    return model_dir / p


def open_weights(model_dir: str | os.PathLike) -> SafetensorsWeights:
    """Open a model directory's safetensors weights (headers read and checked now).

    ``model.safetensors`` if present, else shards listed by ``model.safetensors.index.json``.
    ``model_dir`` may also be a single ``.safetensors`` file.
    """
    model_dir = Path(model_dir)
    if model_dir.is_file():
        infos, _ = read_safetensors_header(model_dir)
        return SafetensorsWeights(infos, [model_dir])
    if not model_dir.is_dir():
        raise ModelFileError(model_dir, "model directory does not exist")

    single = model_dir / SINGLE_WEIGHTS_NAME
    index_path = model_dir / INDEX_NAME
    if single.exists() or single.is_symlink():
        infos, _ = read_safetensors_header(single)
        return SafetensorsWeights(infos, [single])
    if not (index_path.exists() or index_path.is_symlink()):
        raise ModelFileError(
            model_dir, f"no weights: neither {SINGLE_WEIGHTS_NAME} nor {INDEX_NAME} is here")

    index = _read_json_file(index_path, INDEX_NAME, reject_duplicates=True)
    if not isinstance(index, dict):
        raise ModelFileError(index_path, f"index must be a JSON object, found {_kind(index)}")
    wmap = index.get("weight_map")
    if not isinstance(wmap, dict):
        raise ModelFileError(
            index_path, "index lacks a 'weight_map' object mapping tensor names to files"
            if wmap is None else f"'weight_map' must be an object, found {_kind(wmap)}")
    if not wmap:
        raise ModelFileError(index_path, "'weight_map' is empty: the index lists no tensors")

    shards: dict[Path, list[str]] = {}
    for tensor, fname in wmap.items():
        shards.setdefault(_resolve_shard(model_dir, index_path, fname, tensor), []).append(tensor)

    infos: dict[str, TensorInfo] = {}
    for shard, wanted in shards.items():
        if not shard.exists():
            raise ModelFileError(
                shard, f"shard is missing; {INDEX_NAME} lists it for {len(wanted)} "
                f"tensor(s), e.g. {wanted[0]!r}")
        shard_infos, _ = read_safetensors_header(shard)
        for tensor in wanted:
            if tensor not in shard_infos:
                raise ModelFileError(
                    shard, f"shard lacks tensor {tensor!r}, which {INDEX_NAME} "
                    "says it holds")
        for name, info in shard_infos.items():
            other = infos.get(name)
            if other is not None:
                raise ModelFileError(
                    shard, f"tensor {name!r} is stored twice: in {other.file.name} and "
                    f"in {shard.name}")
            infos[name] = info
    # Keys in the index's order first, then anything a shard holds beyond the index.
    ordered = {name: infos[name] for name in wmap}
    for name, info in infos.items():
        ordered.setdefault(name, info)
    return SafetensorsWeights(ordered, list(shards))
