"""Tests for trimtab.backend.hf_loader: config.json and safetensors loading.

Every model file is made here: good ones with safetensors.torch.save_file, bad ones byte
by byte. Each bad input must raise ModelFileError naming the file and the problem.
"""
from __future__ import annotations

import json
import os
import random
import struct
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from trimtab.backend import hf_loader
from trimtab.backend.errors import ModelFileError, TrimtabError, UnsupportedModelError
from trimtab.backend.hf_loader import SafetensorsWeights, open_weights, read_config


# --------------------------------------------------------------------------------------
# helpers


def st_bytes(header, data: bytes = b"", *, length: int | None = None) -> bytes:
    """A safetensors file: 8-byte LE header length, header (dict -> JSON, or raw bytes), data."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(raw) if length is None else length
    return struct.pack("<Q", n) + raw + data


def f32_entry(shape, begin):
    n = 4
    for d in shape:
        n *= d
    return {"dtype": "F32", "shape": list(shape), "data_offsets": [begin, begin + n]}


def good_file_bytes(tmp_path) -> bytes:
    p = tmp_path / "_good.safetensors"
    save_file({"a": torch.arange(12, dtype=torch.float32).reshape(3, 4),
               "b": torch.ones(5, dtype=torch.bfloat16)}, str(p))
    data = p.read_bytes()
    p.unlink()
    return data


LLAMA_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "num_key_value_heads": 2,
    "vocab_size": 256,
    "rms_norm_eps": 1e-5,
    "rope_scaling": None,
    "torch_dtype": "bfloat16",
}


def write_config(d, cfg):
    (d / "config.json").write_text(json.dumps(cfg, indent=2))


# --------------------------------------------------------------------------------------
# good weights


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trip_single_file(tmp_path, dtype):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "model.embed_tokens.weight": torch.randn(16, 8, generator=g).to(dtype),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(8, 8, generator=g).to(dtype),
        "model.norm.weight": torch.randn(8, generator=g).to(dtype),
        "scalar": torch.tensor(3.5, dtype=dtype),
        "empty": torch.zeros(0, 4, dtype=dtype),
    }
    save_file(tensors, str(tmp_path / "model.safetensors"))
    w = open_weights(tmp_path)
    assert isinstance(w, SafetensorsWeights)
    assert w.files == (tmp_path / "model.safetensors",)
    assert len(w) == len(tensors)
    assert set(w) == set(tensors) and set(w.keys()) == set(tensors)
    for name, ref in tensors.items():
        assert name in w
        assert w.dtype_of(name) == dtype
        assert w.stored_dtype(name) == {torch.float32: "F32", torch.float16: "F16",
                                        torch.bfloat16: "BF16"}[dtype]
        assert w.shape_of(name) == tuple(ref.shape)
        got = w[name]
        assert got.dtype == dtype  # the stored dtype: no conversion
        assert tuple(got.shape) == tuple(ref.shape)
        assert torch.equal(got, ref)
    assert "missing.weight" not in w
    with pytest.raises(KeyError):
        w["missing.weight"]
    assert w.get("missing.weight") is None
    w.close()


def test_open_weights_accepts_a_file_path(tmp_path):
    save_file({"x": torch.ones(2)}, str(tmp_path / "only.safetensors"))
    w = open_weights(tmp_path / "only.safetensors")
    assert list(w) == ["x"] and torch.equal(w["x"], torch.ones(2))


def _sharded_dir(tmp_path, *, index=None, extra=None):
    s1 = {"model.embed_tokens.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3),
          "model.layers.0.mlp.weight": torch.full((4,), 2.0, dtype=torch.bfloat16)}
    s2 = {"model.layers.1.mlp.weight": torch.full((2, 2), -1.0, dtype=torch.float16),
          "lm_head.weight": torch.arange(3, dtype=torch.float32)}
    if extra:
        s2.update(extra)
    f1, f2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    save_file(s1, str(tmp_path / f1))
    save_file(s2, str(tmp_path / f2))
    if index is None:
        wm = {k: f1 for k in s1} | {k: f2 for k in s2}
        index = {"metadata": {"total_size": 0}, "weight_map": wm}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    return s1 | s2, f1, f2


def test_sharded_with_index(tmp_path):
    ref, f1, f2 = _sharded_dir(tmp_path)
    w = open_weights(tmp_path)
    assert w.files == (tmp_path / f1, tmp_path / f2)
    assert len(w) == 4 and set(w) == set(ref)
    assert w.file_of("lm_head.weight") == tmp_path / f2
    assert w.dtype_of("model.layers.0.mlp.weight") == torch.bfloat16
    assert w.shape_of("model.layers.1.mlp.weight") == (2, 2)
    for name, t in ref.items():
        assert torch.equal(w[name], t)
    assert dict(w.items()).keys() == ref.keys()


def test_single_file_preferred_over_index(tmp_path):
    _sharded_dir(tmp_path)
    save_file({"solo": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    assert list(open_weights(tmp_path)) == ["solo"]


def test_unsupported_dtype_clear_error_when_asked(tmp_path):
    save_file({"w": torch.ones(2, dtype=torch.float16),
               "ids": torch.arange(4, dtype=torch.int64)}, str(tmp_path / "model.safetensors"))
    w = open_weights(tmp_path)  # opening is fine: only asking for the I64 tensor fails
    assert w.dtype_of("ids") == torch.int64 and w.stored_dtype("ids") == "I64"
    with pytest.raises(UnsupportedModelError) as ei:
        w["ids"]
    msg = str(ei.value)
    assert "model.safetensors" in msg and "I64" in msg and "'ids'" in msg
    assert isinstance(ei.value, TrimtabError)
    assert torch.equal(w.raw("ids"), torch.arange(4))
    assert torch.equal(w["w"], torch.ones(2, dtype=torch.float16))


def test_fp8_weight_is_unsupported_not_garbage(tmp_path):
    if not hasattr(torch, "float8_e4m3fn"):
        pytest.skip("torch without float8")
    save_file({"w": torch.zeros(4, dtype=torch.float8_e4m3fn)}, str(tmp_path / "model.safetensors"))
    w = open_weights(tmp_path)
    with pytest.raises(UnsupportedModelError, match="F8_E4M3"):
        w["w"]


# --------------------------------------------------------------------------------------
# lazy, memory-mapped


def test_lazy_open_and_mmap_views(tmp_path, monkeypatch):
    a = torch.arange(4096, dtype=torch.float32)
    b = torch.arange(2048, dtype=torch.bfloat16)
    save_file({"a": a, "b": b}, str(tmp_path / "model.safetensors"))

    import safetensors

    opened = []
    real = safetensors.safe_open

    def counting_safe_open(*args, **kw):
        opened.append(args[0])
        return real(*args, **kw)

    monkeypatch.setattr(safetensors, "safe_open", counting_safe_open)
    w = open_weights(tmp_path)
    # Everything but the tensor data comes from the header: no file opened for data yet.
    assert len(w) == 2 and sorted(w.keys()) == ["a", "b"] and "a" in w
    assert w.shape_of("a") == (4096,) and w.dtype_of("b") == torch.bfloat16
    assert opened == []
    ta = w["a"]
    assert len(opened) == 1
    tb = w["b"]
    assert len(opened) == 1  # one mapping per file, reused
    assert torch.equal(ta, a) and torch.equal(tb, b)

    # Views on one mapping of the file: the distance between the tensors' data equals the
    # distance between their offsets in the file (a copy would land elsewhere).
    ia, ib = w.info("a"), w.info("b")
    assert tb.data_ptr() - ta.data_ptr() == ib.begin - ia.begin

    # The mapping is private: writing to a tensor never changes the file.
    before = (tmp_path / "model.safetensors").read_bytes()
    ta.add_(1)
    w.close()
    assert (tmp_path / "model.safetensors").read_bytes() == before
    assert torch.equal(open_weights(tmp_path)["a"], a)


def test_peak_rss_stays_near_file_size(tmp_path):
    """Reading every tensor of a 64 MB bf16 file grows peak RSS by well under 2x the file.

    Measured in a fresh interpreter (the file is written here, in the parent) from
    /proc/self/status, so other tests' allocations do not count. No timing involved.
    """
    if not os.path.exists("/proc/self/status"):
        pytest.skip("needs Linux /proc")
    g = torch.Generator().manual_seed(0)
    tensors = {f"model.layers.{i}.weight": torch.randn(1024, 2048, generator=g).to(torch.bfloat16)
               for i in range(16)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    del tensors
    size = (tmp_path / "model.safetensors").stat().st_size
    script = textwrap.dedent(f"""
        import torch
        from trimtab.backend.hf_loader import open_weights
        def kb(key):
            for line in open("/proc/self/status"):
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        try:  # reset the peak counter so import-time peaks do not count
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass
        base = kb("VmRSS")
        w = open_weights({str(tmp_path)!r})
        total = 0.0
        for name in w:
            t = w[name]
            total += float(t.max())  # touches every byte, allocates nothing big
        print(max(kb("VmHWM"), kb("VmRSS")) - base)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    growth = int(out.stdout.strip().splitlines()[-1])
    print(f"peak RSS growth {growth / 1e6:.1f} MB for a {size / 1e6:.1f} MB file "
          f"({growth / size:.2f}x)")
    assert growth < 1.5 * size


# --------------------------------------------------------------------------------------
# malformed safetensors: each a clear ModelFileError naming the file


def _overlap():
    h = {"a": f32_entry([2], 0), "b": f32_entry([2], 4)}
    return st_bytes(h, b"\0" * 12)


def _out_of_range():
    h = {"a": f32_entry([2], 0), "b": f32_entry([2], 64)}
    return st_bytes(h, b"\0" * 16)


def _gap():
    h = {"a": f32_entry([2], 0), "b": f32_entry([2], 12)}
    return st_bytes(h, b"\0" * 20)


BAD_SAFETENSORS = {
    # name: (bytes or a function of the good file's bytes, phrase in the message,
    #        whether the safetensors library itself rejects it too)
    "empty file": (b"", "file is empty", True),
    "shorter than 8 bytes": (b"\x10\x00\x00", "too short", True),
    "header length beyond file": (st_bytes(b'{"a": 1}', length=1000), "beyond the end of the file", True),
    "absurd header length": (st_bytes(b"{}", length=1 << 40), "absurd", True),
    "zero header length": (st_bytes(b"", length=0), "header length is 0", True),
    "header not JSON": (st_bytes(b'{"a": {"dtype": "F32",,}}'), "not valid JSON", True),
    "header not UTF-8": (st_bytes(b'{"\xff\xfe": 1}'), "not valid UTF-8", True),
    "header not an object": (st_bytes(b"[1, 2, 3]"), "must be a JSON object", True),
    "entry not an object": (st_bytes({"a": [1, 2]}), "must be an object", True),
    "entry lacks dtype": (st_bytes({"a": {"shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4),
                          "lacks 'dtype'", True),
    "unknown dtype": (st_bytes({"a": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 8]}},
                               b"\0" * 8), "unknown dtype 'Q7'", True),
    "negative dimension": (st_bytes({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}},
                                    b"\0" * 8), "invalid shape", True),
    "fractional dimension": (st_bytes({"a": {"dtype": "F32", "shape": [2.5], "data_offsets": [0, 8]}},
                                      b"\0" * 8), "invalid shape", True),
    "shape not a list": (st_bytes({"a": {"dtype": "F32", "shape": "2", "data_offsets": [0, 8]}},
                                  b"\0" * 8), "invalid shape", True),
    "offsets not a pair": (st_bytes({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0]}},
                                    b"\0" * 8), "invalid data_offsets", True),
    "negative offset": (st_bytes({"a": {"dtype": "U8", "shape": [0], "data_offsets": [-1, -1]}}),
                        "negative data_offsets", True),
    "begin after end": (st_bytes({"a": {"dtype": "U8", "shape": [2], "data_offsets": [4, 2]}},
                                 b"\0" * 4), "begin after end", True),
    "dtype/shape mismatch": (st_bytes({"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 8]}},
                                      b"\0" * 8), "dtype/shape mismatch", True),
    "absurd shape": (st_bytes({"a": {"dtype": "F32", "shape": [2 ** 40] * 4, "data_offsets": [0, 8]}},
                              b"\0" * 8), "absurd shape", True),
    "overlapping offsets": (_overlap(), "overlapping data_offsets", True),
    "out-of-range offsets": (_out_of_range(), "out of range", True),
    "gap between tensors": (_gap(), "belong to no tensor", True),
    "bytes after last tensor": (st_bytes({"a": f32_entry([2], 0)}, b"\0" * 12),
                                "unexpected bytes after the last tensor", True),
    "truncated file": (lambda good: good[:-7], "file is truncated", True),
    "truncated inside header": (lambda good: good[:20], "beyond the end of the file", True),
    "duplicate tensor name": (st_bytes(b'{"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},'
                                       b' "a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}',
                                       b"\0"), "names 'a' twice", False),
    "metadata not strings": (st_bytes({"__metadata__": {"format": 1}}), "'__metadata__'", True),
    "trailing NUL after header": (st_bytes(b'{}\0\0\0\0\0\0'), "not valid JSON", True),
}


@pytest.mark.parametrize("case", sorted(BAD_SAFETENSORS))
def test_malformed_safetensors(tmp_path, case):
    content, phrase, library_rejects = BAD_SAFETENSORS[case]
    if callable(content):
        content = content(good_file_bytes(tmp_path))
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    with pytest.raises(ModelFileError) as ei:
        open_weights(tmp_path)
    msg = str(ei.value)
    assert "model.safetensors" in msg, msg
    assert phrase in msg, msg
    assert ei.value.path == str(path)
    assert len(msg) < 600  # a message, not a dump
    if library_rejects:
        # Our checks are no looser than the safetensors library's own.
        with pytest.raises(Exception):
            with safe_open(str(path), framework="pt") as f:
                for k in f.keys():
                    f.get_tensor(k)


def test_header_json_error_gives_line_and_column(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(st_bytes(b'{\n  "a": {"dtype": "F32" "shape": []}\n}'))
    with pytest.raises(ModelFileError, match=r"line 2 column 24"):
        open_weights(tmp_path)


def test_not_a_regular_file_does_not_hang(tmp_path):
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs here")
    os.mkfifo(tmp_path / "model.safetensors")
    with pytest.raises(ModelFileError, match="not a regular file"):
        open_weights(tmp_path)


def test_random_corruption_never_crashes(tmp_path):
    """Seeded mutations of a good file: each either loads correctly or is a ModelFileError."""
    good = good_file_bytes(tmp_path)
    hlen = struct.unpack("<Q", good[:8])[0]
    rng = random.Random(1234)
    path = tmp_path / "model.safetensors"
    outcomes = {"ok": 0, "error": 0}
    for _ in range(300):
        buf = bytearray(good)
        kind = rng.randrange(4)
        if kind == 0:  # flip header bytes
            for _ in range(rng.randint(1, 4)):
                buf[rng.randrange(8, 8 + hlen)] = rng.randrange(256)
        elif kind == 1:  # cut anywhere
            buf = buf[: rng.randrange(len(buf))]
        elif kind == 2:  # change the header length
            buf[rng.randrange(8)] = rng.randrange(256)
        else:  # replace a digit in the header
            digits = [i for i in range(8, 8 + hlen) if chr(buf[i]).isdigit()]
            buf[rng.choice(digits)] = ord(str(rng.randrange(10)))
        path.write_bytes(bytes(buf))
        try:
            w = open_weights(tmp_path)
            for name in w:
                t = w.raw(name)
                assert tuple(t.shape) == w.shape_of(name)
            w.close()
            outcomes["ok"] += 1
        except ModelFileError as e:
            assert "model.safetensors" in str(e)
            outcomes["error"] += 1
    assert outcomes["error"] > 100


# --------------------------------------------------------------------------------------
# sharded: malformed indexes and shards


def test_missing_shard(tmp_path):
    _, f1, f2 = _sharded_dir(tmp_path)
    (tmp_path / f2).unlink()
    with pytest.raises(ModelFileError) as ei:
        open_weights(tmp_path)
    assert f2 in str(ei.value) and "shard is missing" in str(ei.value)
    assert ei.value.path == str(tmp_path / f2)


def test_index_names_tensor_its_shard_lacks(tmp_path):
    _, f1, f2 = _sharded_dir(tmp_path)
    idx = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    idx["weight_map"]["model.layers.9.ghost.weight"] = f1
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(ModelFileError) as ei:
        open_weights(tmp_path)
    msg = str(ei.value)
    assert f1 in msg and "lacks tensor 'model.layers.9.ghost.weight'" in msg


def test_duplicate_tensor_across_shards(tmp_path):
    _, f1, f2 = _sharded_dir(tmp_path, extra={"model.embed_tokens.weight": torch.zeros(2, 3)})
    with pytest.raises(ModelFileError) as ei:
        open_weights(tmp_path)
    msg = str(ei.value)
    assert "'model.embed_tokens.weight' is stored twice" in msg and f1 in msg and f2 in msg


def test_corrupt_shard_is_named(tmp_path):
    _, f1, f2 = _sharded_dir(tmp_path)
    data = (tmp_path / f2).read_bytes()
    (tmp_path / f2).write_bytes(data[:-3])
    with pytest.raises(ModelFileError) as ei:
        open_weights(tmp_path)
    assert ei.value.path == str(tmp_path / f2) and "truncated" in str(ei.value)


@pytest.mark.parametrize("index_text, phrase", [
    ('{"weight_map": {"a": "x.safetensors",}}', "not valid JSON: Expecting property name"),
    ("[]", "must be a JSON object"),
    ('{"metadata": {}}', "lacks a 'weight_map'"),
    ('{"weight_map": []}', "'weight_map' must be an object"),
    ('{"weight_map": {}}', "'weight_map' is empty"),
    ('{"weight_map": {"a": 3}}', "must be a file name"),
    ('{"weight_map": {"a": "../outside.safetensors"}}', "not a file inside the model directory"),
    ('{"weight_map": {"a": "/etc/passwd"}}', "not a file inside the model directory"),
    ('{"weight_map": {"a": "x.safetensors", "a": "y.safetensors"}}', "names 'a' twice"),
    ("", "is empty"),
])
def test_malformed_index(tmp_path, index_text, phrase):
    (tmp_path / "model.safetensors.index.json").write_text(index_text)
    with pytest.raises(ModelFileError) as ei:
        open_weights(tmp_path)
    msg = str(ei.value)
    assert "model.safetensors.index.json" in msg and phrase in msg, msg


def test_no_weights_at_all(tmp_path):
    with pytest.raises(ModelFileError, match="neither model.safetensors nor"):
        open_weights(tmp_path)
    with pytest.raises(ModelFileError, match="does not exist"):
        open_weights(tmp_path / "nope")


# --------------------------------------------------------------------------------------
# config.json


def test_read_config_returns_dict_unchanged(tmp_path):
    write_config(tmp_path, LLAMA_CONFIG)
    assert read_config(tmp_path) == LLAMA_CONFIG
    assert read_config(str(tmp_path)) == LLAMA_CONFIG


def test_read_config_model_type_only_and_text_config(tmp_path):
    cfg = {k: v for k, v in LLAMA_CONFIG.items() if k != "architectures"}
    write_config(tmp_path, cfg)
    assert read_config(tmp_path) == cfg
    mm = {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
          "text_config": {k: LLAMA_CONFIG[k] for k in hf_loader._REQUIRED_SIZES},
          "vision_config": {"hidden_size": 32}}
    write_config(tmp_path, mm)
    assert read_config(tmp_path) == mm


def _cfg(**changes):
    cfg = dict(LLAMA_CONFIG)
    for k, v in changes.items():
        if v is _DROP:
            cfg.pop(k)
        else:
            cfg[k] = v
    return json.dumps(cfg, indent=2)


_DROP = object()

BAD_CONFIGS = {
    "bad JSON": ('{\n  "architectures": ["X"],\n  "hidden_size": 64,,\n}', "not valid JSON", "line 3 column"),
    "not an object": ('["LlamaForCausalLM"]', "must be a JSON object", "array"),
    "empty": ("", "is empty", "config.json"),
    "missing architectures": (_cfg(architectures=_DROP, model_type=_DROP), "'architectures'", "model_type"),
    "architectures a string": (_cfg(architectures="LlamaForCausalLM"), "'architectures' must be a non-empty list", "string"),
    "architectures empty": (_cfg(architectures=[]), "'architectures' must be a non-empty list", "array"),
    "model_type a number": (_cfg(model_type=7), "'model_type' must be a non-empty string", "integer"),
    "negative hidden_size": (_cfg(hidden_size=-64), "'hidden_size' must be a positive integer", "-64"),
    "zero vocab_size": (_cfg(vocab_size=0), "'vocab_size' must be a positive integer", "0"),
    "string where int expected": (_cfg(num_hidden_layers="32"), "'num_hidden_layers' must be a positive integer", "string"),
    "float where int expected": (_cfg(intermediate_size=128.0), "'intermediate_size' must be a positive integer", "fraction"),
    "bool where int expected": (_cfg(num_attention_heads=True), "'num_attention_heads' must be a positive integer", "boolean"),
    "absurd layer count": (_cfg(num_hidden_layers=2 ** 20 + 1), "'num_hidden_layers'", "absurd"),
    "absurd vocab": (_cfg(vocab_size=10 ** 30), "'vocab_size'", "absurd"),
    "missing vocab_size": (_cfg(vocab_size=_DROP), "lacks the required key 'vocab_size'", "config.json"),
    "bad kv heads": (_cfg(num_key_value_heads=-1), "'num_key_value_heads' must be a positive integer", "-1"),
    "text_config not object": (_cfg(text_config=[1]), "'text_config' must be an object", "array"),
    "not UTF-8": (b'{"architectures": ["\xff"]}', "not valid UTF-8", "config.json"),
    "deeply nested": ("[" * 100000 + "]" * 100000, "config.json", "JSON"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_malformed_config(tmp_path, case):
    text, phrase, phrase2 = BAD_CONFIGS[case]
    p = tmp_path / "config.json"
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ModelFileError) as ei:
        read_config(tmp_path)
    msg = str(ei.value)
    assert ei.value.path == str(p)
    assert "config.json" in msg and phrase in msg and phrase2 in msg, msg


def test_missing_config(tmp_path):
    with pytest.raises(ModelFileError) as ei:
        read_config(tmp_path)
    assert ei.value.path == str(tmp_path / "config.json") and "missing" in str(ei.value)
    with pytest.raises(ModelFileError, match="does not exist"):
        read_config(tmp_path / "nope")


def test_config_not_a_regular_file(tmp_path):
    (tmp_path / "config.json").mkdir()
    with pytest.raises(ModelFileError, match="directory"):
        read_config(tmp_path)
    if hasattr(os, "mkfifo"):
        fifo_dir = tmp_path / "fifo"
        fifo_dir.mkdir()
        os.mkfifo(fifo_dir / "config.json")
        with pytest.raises(ModelFileError, match="not a regular file"):
            read_config(fifo_dir)
