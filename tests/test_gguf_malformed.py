"""Malformed GGUF files: each must give a clear error naming the file and the problem, at once,
never a traceback from inside a parser, a hang, or a huge allocation."""
from __future__ import annotations

import math
import random
import signal
import struct
import tracemalloc
from dataclasses import dataclass, field, replace

import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from trimtab.backend.errors import ModelFileError, TrimtabError, UnsupportedModelError
from trimtab.backend.gguf_loader import read_gguf

# GGUF value type ids
U8, I32, U32, F32, BOOL, STR, ARR, U64 = 0, 5, 4, 6, 7, 8, 9, 10
F32_TYPE, Q8_0_TYPE, Q2_K_TYPE = 0, 8, 10


def gguf_string(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def scalar(value_type: int, value) -> bytes:
    fmt = {U8: "<B", U32: "<I", I32: "<i", F32: "<f", BOOL: "<?", U64: "<Q"}[value_type]
    return struct.pack("<I", value_type) + struct.pack(fmt, value)


def string(text: str) -> bytes:
    return struct.pack("<I", STR) + gguf_string(text)


def array(item_type: int, items: list, length: int | None = None) -> bytes:
    head = struct.pack("<IIQ", ARR, item_type, len(items) if length is None else length)
    if item_type == STR:
        return head + b"".join(gguf_string(item) for item in items)
    fmt = {I32: "<i", U32: "<I", F32: "<f"}[item_type]
    return head + b"".join(struct.pack(fmt, item) for item in items)


@dataclass
class Tensor:
    name: str
    dims: list[int]             # ggml order
    type_id: int = F32_TYPE
    offset: int | None = None   # None: laid out after the previous one
    n_dims: int | None = None   # None: len(dims)


@dataclass
class GGUFSpec:
    """A GGUF file as parts, so each test can break exactly one of them."""
    kvs: dict[str, bytes] = field(default_factory=dict)   # key -> encoded type + value
    tensors: list[Tensor] = field(default_factory=list)
    magic: bytes = b"GGUF"
    version: int = 3
    tensor_count: int | None = None
    kv_count: int | None = None
    alignment: int = 32

    def to_bytes(self) -> bytes:
        out = bytearray(self.magic + struct.pack("<I", self.version))
        out += struct.pack("<QQ", len(self.tensors) if self.tensor_count is None else self.tensor_count,
                           len(self.kvs) if self.kv_count is None else self.kv_count)
        for key, value in self.kvs.items():
            out += gguf_string(key) + value
        data, offset = bytearray(), 0
        for tensor in self.tensors:
            sizes = GGML_QUANT_SIZES.get(GGMLQuantizationType(tensor.type_id)) if tensor.type_id < 64 else None
            n_bytes = math.prod(tensor.dims) // sizes[0] * sizes[1] if sizes else 0
            at = offset if tensor.offset is None else tensor.offset
            n_dims = len(tensor.dims) if tensor.n_dims is None else tensor.n_dims
            out += gguf_string(tensor.name) + struct.pack("<I", n_dims)
            out += b"".join(struct.pack("<Q", dim) for dim in tensor.dims)
            out += struct.pack("<IQ", tensor.type_id, at)
            if tensor.offset is None and n_bytes < 1 << 20:
                data += bytes(n_bytes) + bytes(-n_bytes % self.alignment)
                offset = len(data)
        out += bytes(-len(out) % self.alignment)
        return bytes(out + data)


TOKENS = ["<s>", "</s>", "a", "b", "ab", "Ġ"]
HIDDEN, FF, VOCAB = 32, 256, len(TOKENS)  # FF = 256: ffn_down rows fit a k-quant block


def valid_spec(arch: str = "llama") -> GGUFSpec:
    """A complete, loadable one-layer model."""
    kvs = {
        "general.architecture": string(arch),
        f"{arch}.block_count": scalar(U32, 1),
        f"{arch}.context_length": scalar(U32, 128),
        f"{arch}.embedding_length": scalar(U32, HIDDEN),
        f"{arch}.feed_forward_length": scalar(U32, FF),
        f"{arch}.attention.head_count": scalar(U32, 2),
        f"{arch}.attention.layer_norm_rms_epsilon": scalar(F32, 1e-5),
        "tokenizer.ggml.model": string("gpt2"),
        "tokenizer.ggml.tokens": array(STR, TOKENS),
        "tokenizer.ggml.token_type": array(I32, [3, 3, 1, 1, 1, 1]),
        "tokenizer.ggml.merges": array(STR, ["a b"]),
        "tokenizer.ggml.eos_token_id": scalar(U32, 1),
    }
    tensors = [Tensor("token_embd.weight", [HIDDEN, VOCAB]), Tensor("output_norm.weight", [HIDDEN])]
    for name, dims in (("attn_norm", [HIDDEN]), ("ffn_norm", [HIDDEN]), ("attn_q", [HIDDEN, HIDDEN]),
                       ("attn_k", [HIDDEN, HIDDEN]), ("attn_v", [HIDDEN, HIDDEN]), ("attn_output", [HIDDEN, HIDDEN]),
                       ("ffn_gate", [HIDDEN, FF]), ("ffn_up", [HIDDEN, FF]), ("ffn_down", [FF, HIDDEN])):
        tensors.append(Tensor(f"blk.0.{name}.weight", dims))
    return GGUFSpec(kvs=kvs, tensors=tensors)


def with_kvs(spec: GGUFSpec, drop=(), **changes) -> GGUFSpec:
    kvs = {key: value for key, value in spec.kvs.items() if key not in drop}
    kvs.update({key.replace("__", "."): value for key, value in changes.items()})
    return replace(spec, kvs=kvs)


def with_tensor(spec: GGUFSpec, index: int, **changes) -> GGUFSpec:
    tensors = list(spec.tensors)
    tensors[index] = replace(tensors[index], **changes)
    return replace(spec, tensors=tensors)


VALID = valid_spec()
VALID_BYTES = VALID.to_bytes()


def test_the_valid_base_file_loads(tmp_path):
    path = tmp_path / "valid.gguf"
    path.write_bytes(VALID_BYTES)
    contents = read_gguf(path)
    assert contents.config["num_hidden_layers"] == 1 and len(contents.weights) == 11


# (case id, file bytes, expected error class, words the message must contain)
CASES = [
    ("bad-magic", VALID_BYTES.replace(b"GGUF", b"GGML", 1), ModelFileError, "not a GGUF file"),
    ("version-1", replace(VALID, version=1).to_bytes(), ModelFileError, "version 1 is not supported"),
    ("version-99", replace(VALID, version=99).to_bytes(), ModelFileError, "version 99 is not supported"),
    ("big-endian", VALID_BYTES[:4] + struct.pack(">I", 3) + VALID_BYTES[8:], ModelFileError, "big-endian"),
    ("truncated-in-magic", b"GG", ModelFileError, "not a GGUF file"),
    ("truncated-header", VALID_BYTES[:20], ModelFileError, "file ends inside"),
    ("truncated-metadata", VALID_BYTES[:300], ModelFileError, "truncated or corrupt"),
    ("truncated-tensor-infos", VALID_BYTES[:VALID_BYTES.index(b"blk.0.ffn_down")], ModelFileError, "file ends inside"),
    ("truncated-tensor-data", VALID_BYTES[:-1000], ModelFileError, "runs past the end of the file"),
    ("absurd-tensor-count", replace(VALID, tensor_count=2**40).to_bytes(), ModelFileError,
     "claims 1099511627776 tensors"),
    ("max-tensor-count", replace(VALID, tensor_count=2**64 - 1).to_bytes(), ModelFileError, "tensors"),
    ("absurd-kv-count", replace(VALID, kv_count=2**40).to_bytes(), ModelFileError, "claims 1099511627776 metadata"),
    ("kv-count-too-high", replace(VALID, kv_count=len(VALID.kvs) + 5).to_bytes(), ModelFileError, "metadata"),
    ("absurd-key-length", VALID_BYTES[:24] + struct.pack("<Q", 2**62) + VALID_BYTES[32:], ModelFileError,
     "metadata key #0 is 4611686018427387904 bytes long"),
    ("absurd-array-length", with_kvs(VALID, tokenizer__ggml__token_type=array(I32, [3], length=2**40)).to_bytes(),
     ModelFileError, "1099511627776 elements"),
    ("string-array-beyond-file", with_kvs(VALID, tokenizer__ggml__merges=array(STR, ["a b"], length=2**21)).to_bytes(),
     ModelFileError, "more than the rest of the file"),
    ("array-of-arrays", with_kvs(VALID, general__nested=struct.pack("<IIQ", ARR, ARR, 1)).to_bytes(),
     ModelFileError, "array of arrays"),
    ("unknown-value-type", with_kvs(VALID, general__odd=struct.pack("<I", 77)).to_bytes(), ModelFileError,
     "unknown value type 77"),
    ("bad-utf8-key", VALID_BYTES.replace(gguf_string("general.architecture"), gguf_string(b"general.\xffarch"), 1),
     ModelFileError, "not valid UTF-8"),
    ("duplicate-tensor", with_tensor(VALID, 1, name="token_embd.weight").to_bytes(), ModelFileError, "appears twice"),
    ("absurd-dims", with_tensor(VALID, 0, dims=[2**40, 2**40]).to_bytes(), ModelFileError, "multiply past 2**63"),
    ("huge-tensor", with_tensor(VALID, 0, dims=[2**31, 2**20]).to_bytes(), ModelFileError, "runs past the end"),
    ("too-many-dims", with_tensor(VALID, 0, dims=[1, 1, 1, 1, HIDDEN * VOCAB]).to_bytes(), ModelFileError,
     "5 dimensions"),
    ("absurd-dim-count", with_tensor(VALID, 0, n_dims=2**31).to_bytes(), ModelFileError, "dimensions (must be 1 to 4)"),
    ("zero-dim", with_tensor(VALID, 1, dims=[0]).to_bytes(), ModelFileError, "zero dimension"),
    ("unknown-tensor-type", with_tensor(VALID, 1, type_id=1000).to_bytes(), ModelFileError, "unknown type id 1000"),
    ("bad-block-multiple", with_tensor(VALID, 1, type_id=Q8_0_TYPE, dims=[33]).to_bytes(), ModelFileError,
     "not a multiple of the Q8_0 block size"),
    ("offset-beyond-end", with_tensor(VALID, 1, offset=2**40).to_bytes(), ModelFileError, "runs past the end"),
    ("offset-misaligned", with_tensor(VALID, 1, offset=4).to_bytes(), ModelFileError,
     "not a multiple of the alignment"),
    ("overlapping-tensors", with_tensor(VALID, 2, offset=0).to_bytes(), ModelFileError, "overlap"),
    ("bad-alignment", with_kvs(VALID, general__alignment=scalar(U32, 24)).to_bytes(), ModelFileError,
     "not a power of two"),
    ("unknown-architecture", with_kvs(VALID, general__architecture=string("frobnicator")).to_bytes(),
     UnsupportedModelError, "architecture 'frobnicator' is not supported"),
    ("no-architecture", with_kvs(VALID, drop=["general.architecture"]).to_bytes(), ModelFileError,
     "missing required metadata key 'general.architecture'"),
    ("missing-block-count", with_kvs(VALID, drop=["llama.block_count"]).to_bytes(), ModelFileError,
     "missing required metadata key 'llama.block_count'"),
    ("absurd-block-count", with_kvs(VALID, llama__block_count=scalar(U32, 2**31)).to_bytes(), ModelFileError,
     "block_count"),
    ("block-count-too-high", with_kvs(VALID, llama__block_count=scalar(U32, 2)).to_bytes(), ModelFileError,
     "2 layers, but the file has only 11 tensors"),
    ("missing-tensor", replace(VALID, tensors=[t for t in VALID.tensors if t.name != "blk.0.attn_k.weight"]).to_bytes(),
     ModelFileError, "missing tensor 'blk.0.attn_k.weight'"),
    ("wrong-type-for-key", with_kvs(VALID, llama__embedding_length=string("big")).to_bytes(), ModelFileError,
     "llama.embedding_length"),
    ("shape-disagrees", with_kvs(VALID, llama__feed_forward_length=scalar(U32, 512)).to_bytes(), ModelFileError,
     "has shape"),
    ("heads-do-not-divide", with_kvs(VALID, llama__attention__head_count=scalar(U32, 3)).to_bytes(), ModelFileError,
     "not a multiple of the head count"),
    ("unexpected-tensor", replace(VALID, tensors=[*VALID.tensors, Tensor("blk.0.mystery.weight", [HIDDEN])]).to_bytes(),
     UnsupportedModelError, "tensor 'blk.0.mystery.weight'"),
    ("unsupported-quant", with_tensor(VALID, -1, type_id=Q2_K_TYPE).to_bytes(), UnsupportedModelError,
     "tensor 'blk.0.ffn_down.weight' has type Q2_K"),
    ("no-tokenizer", with_kvs(VALID, drop=["tokenizer.ggml.model"]).to_bytes(), ModelFileError, "has no tokenizer"),
    ("unsupported-tokenizer", with_kvs(VALID, tokenizer__ggml__model=string("bert")).to_bytes(), UnsupportedModelError,
     "tokenizer model 'bert'"),
    ("unknown-pre-tokenizer", with_kvs(VALID, tokenizer__ggml__pre=string("mystery")).to_bytes(), UnsupportedModelError,
     "pre-tokenizer 'mystery'"),
    ("merge-outside-vocab", with_kvs(VALID, tokenizer__ggml__merges=array(STR, ["x y"])).to_bytes(), ModelFileError,
     "cannot build the BPE tokenizer"),
    ("token-id-out-of-range", with_kvs(VALID, tokenizer__ggml__eos_token_id=scalar(U32, 999)).to_bytes(),
     ModelFileError, "tokenizer.ggml.eos_token_id"),
    ("token-types-wrong-length", with_kvs(VALID, tokenizer__ggml__token_type=array(I32, [1])).to_bytes(),
     ModelFileError, "tokenizer.ggml.token_type"),
    ("empty-file", b"", ModelFileError, "is empty"),
]


@pytest.fixture(autouse=True)
def fail_instead_of_hanging():
    """A hang becomes a failure (Unix): every case here must finish at once."""
    if not hasattr(signal, "SIGALRM"):
        yield
        return

    def hung(signum, frame):
        raise TimeoutError("read_gguf hung on a malformed file")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(10)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("data, error, words", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_malformed_file_gives_a_clear_error(tmp_path, data, error, words):
    path = tmp_path / "broken-model.gguf"
    path.write_bytes(data)
    tracemalloc.start()
    try:
        with pytest.raises(error) as raised:
            read_gguf(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20, f"{peak} bytes allocated for a file of {len(data)}"  # sizes in it are never trusted
    message = str(raised.value)
    assert "broken-model.gguf" in message
    assert words in message
    # the CLI prints these without a traceback: no internal exception may hide behind one
    assert raised.value.__cause__ is None
    assert raised.value.__context__ is None or raised.value.__suppress_context__


def test_directory_instead_of_file(tmp_path):
    folder = tmp_path / "model-folder.gguf"
    folder.mkdir()
    with pytest.raises(ModelFileError, match="model-folder.gguf: is a directory"):
        read_gguf(folder)


def test_missing_file(tmp_path):
    with pytest.raises(ModelFileError, match="nowhere.gguf: no such file"):
        read_gguf(tmp_path / "nowhere.gguf")


def test_random_corruptions_give_only_clear_errors(tmp_path):
    """Seeded byte flips, overwrites, cuts and insertions in the header: every result is a load or
    one of trimtab's errors naming the file, never another exception."""
    rng = random.Random(1234)
    header_end = VALID_BYTES.index(b"blk.0.ffn_down") + 64
    path = tmp_path / "fuzzed-model.gguf"
    for _ in range(300):
        data = bytearray(VALID_BYTES)
        for _ in range(rng.randint(1, 3)):
            at, kind = rng.randrange(header_end), rng.random()
            if kind < 0.5:
                data[at] = rng.randrange(256)
            elif kind < 0.7:
                data[at:at + 8] = rng.randrange(2**64).to_bytes(8, "little")
            elif kind < 0.85:
                del data[at:at + rng.randint(1, 16)]
            else:
                data[at:at] = rng.randbytes(rng.randint(1, 8))
        path.write_bytes(data)
        try:
            read_gguf(path)
        except TrimtabError as error:
            assert "fuzzed-model.gguf" in str(error)
