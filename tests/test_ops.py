"""The compiled CPU ops against their plain-PyTorch references (and transformers' Llama)."""
from __future__ import annotations

import pytest
import torch

from trimtab.backend import ops
from trimtab.backend.reference_ops import rms_norm_reference, rotary_embedding_reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# Normalised error bounds. float32 differs from the reference only by summation order and
# cos/sin rounding; the half types by occasional one-ulp flips (the bounds allow ~2 ulps).
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected||, computed in float64."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


@pytest.fixture(autouse=True)
def fixed_seed():
    torch.manual_seed(1234)


@pytest.fixture(scope="module", autouse=True)
def engine():
    ops.load_extension()


# ---- rms_norm -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (2, 5, 33), (4, 576), (2, 3, 4096), (17, 100)])
def test_rms_norm_matches_reference(shape, dtype):
    x = (torch.randn(shape) * 3).to(dtype)
    weight = (torch.rand(shape[-1]) + 0.5).to(dtype)
    actual = ops.rms_norm(x, weight, 1e-6)
    assert actual.dtype == dtype and actual.shape == x.shape
    assert relative_error(actual, rms_norm_reference(x, weight, 1e-6)) < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rms_norm_float32_weight_keeps_input_dtype(dtype):
    x = torch.randn(5, 64).to(dtype)
    weight = torch.rand(64) + 0.5
    actual = ops.rms_norm(x, weight, 1e-5)
    assert actual.dtype == dtype
    assert relative_error(actual, rms_norm_reference(x, weight, 1e-5)) < TOLERANCE[dtype]


def test_rms_norm_large_eps_and_tiny_values():
    x = torch.randn(3, 40) * 1e-4
    weight = torch.randn(40)
    for eps in (1e-6, 1e-2):
        assert relative_error(ops.rms_norm(x, weight, eps), rms_norm_reference(x, weight, eps)) < 1e-5


def test_rms_norm_non_contiguous_input():
    x = torch.randn(48, 6).t()  # [6, 48], stride (1, 6)
    weight = torch.randn(48)
    assert not x.is_contiguous()
    assert relative_error(ops.rms_norm(x, weight, 1e-6), rms_norm_reference(x, weight, 1e-6)) < 1e-5


def test_rms_norm_empty_batch():
    assert ops.rms_norm(torch.randn(0, 16), torch.randn(16), 1e-6).shape == (0, 16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_transformers(dtype):
    modeling_llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    norm = modeling_llama.LlamaRMSNorm(96, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(96) + 0.5)
        x = torch.randn(2, 9, 96).to(dtype)
        expected = norm(x)
    assert relative_error(ops.rms_norm(x, norm.weight.detach(), 1e-5), expected) < TOLERANCE[dtype]


@pytest.mark.parametrize(
    "x, weight, message",
    [
        (torch.randn(2, 8, dtype=torch.float64), torch.randn(8), "x must be float32, float16 or bfloat16"),
        (torch.randint(0, 9, (2, 8)), torch.randn(8), "x must be float32, float16 or bfloat16"),
        (torch.randn(2, 8), torch.randn(7), r"weight must have shape \[8\]"),
        (torch.randn(2, 8), torch.randn(2, 8), r"weight must have shape \[8\]"),
        (torch.randn(2, 8), torch.randn(8, dtype=torch.float64), "weight must be float32"),
        (torch.randn(()), torch.randn(1), "at least one dimension"),
        (torch.randn(2, 0), torch.randn(0), "must not be empty"),
    ],
)
def test_rms_norm_rejects_bad_inputs(x, weight, message):
    with pytest.raises(RuntimeError, match=message):
        ops.rms_norm(x, weight, 1e-6)


# ---- rotary_embedding -----------------------------------------------------------------


def make_inv_freq(rot_dims: int, base: float = 10000.0) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, rot_dims, 2, dtype=torch.float) / rot_dims))


def make_positions(batch: int, seq: int, start: int = 0) -> torch.Tensor:
    """[B, S] int64: each batch row starts somewhere different (as with a KV cache)."""
    starts = start + torch.randint(0, 3000, (batch, 1))
    return starts + torch.arange(seq)


ROTARY_CASES = [
    # (B, S, H, D, R)
    (1, 1, 1, 64, 64),  # one decode token
    (2, 7, 3, 64, 64),
    (3, 5, 4, 80, 80),  # head_dim 80: R/2 = 40, not a multiple of 16
    (1, 9, 2, 128, 128),
    (2, 3, 5, 128, 64),  # partial rotary (half)
    (1, 4, 2, 80, 32),  # partial rotary, Phi-like
    (1, 3, 2, 6, 2),  # a single pair
    (3, 1, 32, 128, 128),  # many heads, one token each
]


@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "interleaved"])
@pytest.mark.parametrize("batch, seq, heads, head_dim, rot_dims", ROTARY_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_matches_reference(batch, seq, heads, head_dim, rot_dims, interleaved, dtype):
    x = torch.randn(batch, seq, heads, head_dim).to(dtype)
    positions = make_positions(batch, seq, start=5)
    inv_freq = make_inv_freq(rot_dims)
    actual = ops.rotary_embedding(x, positions, inv_freq, 1.0, interleaved)
    # Half types: the op computes in float32 and rounds once, so compare with a float32
    # reference rounded the same way.
    expected = rotary_embedding_reference(x.float(), positions, inv_freq, 1.0, interleaved).to(dtype)
    assert actual.dtype == dtype and actual.shape == x.shape
    assert relative_error(actual, expected) < TOLERANCE[dtype]
    # Dims past the rotary ones pass through bit for bit.
    assert torch.equal(actual[..., rot_dims:], x[..., rot_dims:])


@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "interleaved"])
def test_rotary_attention_scaling(interleaved):
    x = torch.randn(2, 6, 3, 64)
    positions = make_positions(2, 6)
    inv_freq = make_inv_freq(64, base=500000.0)
    actual = ops.rotary_embedding(x, positions, inv_freq, attention_scaling=1.1386, interleaved=interleaved)
    expected = rotary_embedding_reference(x, positions, inv_freq, 1.1386, interleaved)
    assert relative_error(actual, expected) < 1e-5


def test_rotary_position_zero_is_identity():
    x = torch.randn(1, 4, 2, 64)
    out = ops.rotary_embedding(x, torch.zeros(1, 4, dtype=torch.long), make_inv_freq(64))
    assert torch.equal(out, x)


def test_rotary_is_out_of_place_and_accepts_non_contiguous_input():
    x_bhsd = torch.randn(2, 3, 5, 64)  # [B, H, S, D]
    x = x_bhsd.transpose(1, 2)  # [B, S, H, D] view, not contiguous
    before = x.clone()
    positions = make_positions(2, 5)
    out = ops.rotary_embedding(x, positions, make_inv_freq(64))
    assert torch.equal(x, before)
    assert relative_error(out, rotary_embedding_reference(x, positions, make_inv_freq(64))) < 1e-5


def test_rotary_interleaved_equals_neox_on_permuted_dims():
    """GGUF's interleaved pairs are NeoX pairs after permuting the head dims (as importers do)."""
    head_dim = 16
    x = torch.randn(1, 3, 2, head_dim)
    positions = make_positions(1, 3)
    inv_freq = make_inv_freq(head_dim)
    to_neox = torch.cat((torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)))
    interleaved = ops.rotary_embedding(x, positions, inv_freq, 1.0, True)
    neox = ops.rotary_embedding(x[..., to_neox], positions, inv_freq, 1.0, False)
    assert relative_error(interleaved[..., to_neox], neox) < 1e-6


@pytest.mark.parametrize(
    "rope_parameters",
    [None, {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0, "original_max_position_embeddings": 256}],
    ids=["default", "yarn"],
)
def test_rotary_matches_transformers_llama(rope_parameters):
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    extra = {"rope_parameters": rope_parameters} if rope_parameters else {}
    config = transformers.LlamaConfig(
        hidden_size=128, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, **extra
    )
    rotary = LlamaRotaryEmbedding(config)
    head_dim = config.hidden_size // config.num_attention_heads
    q = torch.randn(2, 7, 4, head_dim)  # [B, S, H, D]
    k = torch.randn(2, 7, 2, head_dim)
    positions = torch.stack((torch.arange(7), torch.arange(100, 107)))  # [B, S]
    cos, sin = rotary(q, positions)
    q_expected, k_expected = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)
    inv_freq, scaling = rotary.inv_freq, rotary.attention_scaling
    assert relative_error(ops.rotary_embedding(q, positions, inv_freq, scaling), q_expected) < 1e-6
    assert relative_error(ops.rotary_embedding(k, positions, inv_freq, scaling), k_expected) < 1e-6


GOOD_X = torch.randn(2, 3, 4, 16)
GOOD_POSITIONS = torch.arange(3).repeat(2, 1)
GOOD_INV_FREQ = make_inv_freq(16)


@pytest.mark.parametrize(
    "x, positions, inv_freq, message",
    [
        (GOOD_X.double(), GOOD_POSITIONS, GOOD_INV_FREQ, "x must be float32, float16 or bfloat16"),
        (GOOD_X[0], GOOD_POSITIONS, GOOD_INV_FREQ, r"x must have shape \[B, S, H, D\]"),
        (GOOD_X, GOOD_POSITIONS.int(), GOOD_INV_FREQ, "positions must be int64"),
        (GOOD_X, GOOD_POSITIONS[:, :2], GOOD_INV_FREQ, r"positions must have shape \[2, 3\]"),
        (GOOD_X, GOOD_POSITIONS[0], GOOD_INV_FREQ, r"positions must have shape \[2, 3\]"),
        (GOOD_X, GOOD_POSITIONS, GOOD_INV_FREQ.half(), "inv_freq must be float32"),
        (GOOD_X, GOOD_POSITIONS, GOOD_INV_FREQ[None], "inv_freq must be 1-D"),
        (GOOD_X, GOOD_POSITIONS, make_inv_freq(18), "more than the head dim 16"),
    ],
)
def test_rotary_rejects_bad_inputs(x, positions, inv_freq, message):
    with pytest.raises(RuntimeError, match=message):
        ops.rotary_embedding(x, positions, inv_freq)


# ---- building -------------------------------------------------------------------------


def test_sources_ship_with_the_package():
    names = {path.name for path in ops._source_files()}
    assert {"ops.cpp", "vec.h"} <= names


def test_build_name_depends_on_host_cpu(monkeypatch):
    sources, flags = ops._source_files(), ["-O3", "-march=native"]
    here = ops._build_hash(sources, flags)
    monkeypatch.setattr(ops, "_host_isa", lambda: "sse2 another-cpu")
    assert ops._build_hash(sources, flags) != here


def test_build_root(monkeypatch, tmp_path):
    from torch.utils import cpp_extension

    monkeypatch.delenv("TRIMTAB_BUILD_DIR", raising=False)
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    assert str(ops._build_root()) == cpp_extension.get_default_build_root()
    monkeypatch.setenv("TRIMTAB_BUILD_DIR", str(tmp_path))
    assert ops._build_root() == tmp_path


def test_missing_compiler_is_a_clear_error(monkeypatch, tmp_path):
    from trimtab.backend.errors import TrimtabError

    monkeypatch.setenv("TRIMTAB_BUILD_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-c++"))  # also changes the build's name
    with pytest.raises(TrimtabError, match="needs a C\\+\\+ compiler.*no-such-c\\+\\+"):
        ops._build_and_load()


def test_exclusive_build_removes_an_interrupted_builds_lock(tmp_path, capsys):
    (tmp_path / "lock").write_text("")       # what torch leaves when a build is killed
    with ops.exclusive_build(tmp_path):
        assert not (tmp_path / "lock").exists()
    assert "interrupted build" in capsys.readouterr().err
    with ops.exclusive_build(tmp_path):      # nothing left over: nothing said
        pass
    assert capsys.readouterr().err == ""


def test_a_killed_builds_lock_does_not_hang_the_next_load():
    """torch waits forever on a `lock` file left in the build folder; the next process must load instead."""
    import subprocess
    import sys

    build_dir = ops.load_extension().parent
    (build_dir / "lock").write_text("")
    try:
        done = subprocess.run([sys.executable, "-c", "from trimtab.backend import ops; print(ops.load_extension())"],
                              capture_output=True, text=True, timeout=300)
    finally:
        (build_dir / "lock").unlink(missing_ok=True)
    assert done.returncode == 0, done.stderr
    assert "interrupted build" in done.stderr
