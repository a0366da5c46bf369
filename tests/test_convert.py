"""`trimtab convert --method rtn` on tiny models of every architecture, loading what it wrote, the
output directory's rules, bad flags, and malformed quantized directories."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import trimtab
from tiny_models import TINY_CONFIGS, write_tiny_model_dir
from trimtab.backend.errors import ModelFileError, TrimtabError, UnsupportedModelError
from trimtab.backend.quant import convert as convert_module
from trimtab.backend.quant.convert import ConvertOptions, convert
from trimtab.plugin.cli import main

pytest.importorskip("transformers")

IDS = [5, 17, 42, 99, 7, 150, 3, 64, 12, 80]


def kl(reference: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean KL(reference ‖ logits) over positions, in nats."""
    p, q = reference.double().log_softmax(-1), logits.double().log_softmax(-1)
    return (p.exp() * (p - q)).sum(-1).mean().item()


@pytest.fixture(scope="module")
def float_dirs(tmp_path_factory):
    dirs = {}
    for arch in TINY_CONFIGS:
        dirs[arch] = tmp_path_factory.mktemp(arch)
        write_tiny_model_dir(arch, dirs[arch])
    return dirs


@pytest.fixture(scope="module")
def quantized_llama(float_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "llama-6"
    convert(ConvertOptions(str(float_dirs["llama"]), str(out), bits=6.0, group_size=32), progress=False)
    return out


@pytest.mark.parametrize("arch", sorted(TINY_CONFIGS))
def test_convert_then_load_every_architecture(float_dirs, tmp_path, arch):
    reference = trimtab.load(float_dirs[arch]).logits(IDS)
    divergence = {}
    for bits, head_bits in ((4.0, 4), (6.0, 6), (8.0, 8)):
        out = tmp_path / f"{arch}-{bits}"
        result = convert(ConvertOptions(str(float_dirs[arch]), str(out), bits=bits, head_bits=head_bits,
                                        group_size=32), progress=False)
        assert bits - 0.05 < result.bits_per_weight <= bits
        block = json.loads((out / "config.json").read_text())["quantization_config"]
        assert block == {"quant_method": "trimtab", "format_version": 1, "method": "rtn", "bits": bits,
                         "bits_per_weight": round(result.bits_per_weight, 6), "head_bits": head_bits,
                         "group_size": 32}
        model = trimtab.load(out)
        assert model.transformer.unused_weights == []
        divergence[bits] = kl(reference, model.logits(IDS))
    assert divergence[8.0] < 5e-3 and divergence[6.0] < 0.05 and divergence[4.0] < 0.5
    assert divergence[8.0] < divergence[6.0] < divergence[4.0]


def test_quantized_model_generates_chats_and_streams(quantized_llama):
    model = trimtab.load(quantized_llama)
    assert type(model.transformer.layers[0].mlp.down_proj).__name__.endswith("PackedLinear")
    assert type(model.transformer.lm_head).__name__.endswith("PackedLinear")
    assert model.transformer.embed_tokens.dtype == torch.float16
    out = model.generate("w5 w6 w7", temperature=0, max_new_tokens=6)
    assert out.finish_reason in ("eos", "length") and out.usage.completion_tokens > 0
    reply = model.chat([{"role": "user", "content": "w8 w9"}], temperature=0, max_new_tokens=6)
    stream = model.stream([{"role": "user", "content": "w8 w9"}], temperature=0, max_new_tokens=6)
    assert "".join(stream) == reply.text and stream.completion.finish_reason == reply.finish_reason


def test_tied_model_stores_its_vocabulary_once_and_decodes_fused(float_dirs, tmp_path):
    from safetensors import safe_open

    out = tmp_path / "qwen2-tied"
    convert(ConvertOptions(str(float_dirs["qwen2"]), str(out), bits=6.0, group_size=32), progress=False)
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert "lm_head.qweight" in f.keys() and "model.embed_tokens.weight" not in f.keys()
    model = trimtab.load(out)
    transformer = model.transformer
    assert transformer.embed_tokens is None and transformer.fused_decoder is not None
    ids = torch.tensor(IDS)
    assert torch.equal(transformer.embed(ids.view(1, -1))[0], transformer.lm_head.dequantized_rows(ids))
    fused = model.generate("w5 w6 w7", temperature=0, max_new_tokens=12, ban_eos_token=True)
    transformer.fused_decoder = None  # the op-by-op path over the same packed layers
    op_by_op = model.generate("w5 w6 w7", temperature=0, max_new_tokens=12, ban_eos_token=True)
    assert fused.text == op_by_op.text and fused.usage.completion_tokens == 12


def test_gguf_input_with_tied_head(tmp_path):
    from test_gguf import make_tiny_model

    path, _ = make_tiny_model(tmp_path, "llama", tied=True)
    out = tmp_path / "q"
    result = convert(ConvertOptions(str(path), str(out), bits=8.0, head_bits=8, group_size=32), progress=False)
    assert set(result.files) == {"model.safetensors", "tokenizer.json", "tokenizer_config.json",
                                 "generation_config.json", "config.json"}
    ids = [3, 4, 5, 6, 7]
    assert kl(trimtab.load(path).logits(ids), trimtab.load(out).logits(ids)) < 1e-3


def test_shards_and_index(float_dirs, quantized_llama, tmp_path, monkeypatch):
    monkeypatch.setattr(convert_module, "MB", 20_000)  # -ss 1 → shards of about 20 kB
    out = tmp_path / "sharded"
    result = convert(ConvertOptions(str(float_dirs["llama"]), str(out), bits=6.0, group_size=32, shard_mb=1),
                     progress=False)
    shards = sorted(f for f in result.files if f.startswith("model-"))
    assert len(shards) > 2 and "model.safetensors.index.json" in result.files
    assert torch.equal(trimtab.load(out).logits(IDS), trimtab.load(quantized_llama).logits(IDS))


PEAK_SCRIPT = """
import sys, trimtab
trimtab.load(sys.argv[1])                      # warm-up: imports, compiled kernels, tokenizer code
def status(key):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key))
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the present size
before = status("VmRSS")
model = trimtab.load(sys.argv[2])
print(status("VmHWM") - before)
"""


def test_loading_peaks_below_one_and_a_half_times_the_file_size(float_dirs, quantized_llama, tmp_path):
    from safetensors.torch import save_file

    medium = tmp_path / "medium"
    shutil.copytree(float_dirs["llama"], medium)  # for its tokenizer files
    D, I, kv, layers = 768, 2048, 256, 4
    shapes = {"model.embed_tokens.weight": (160, D), "lm_head.weight": (160, D), "model.norm.weight": (D,)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (D,), p + "post_attention_layernorm.weight": (D,),
                       p + "self_attn.q_proj.weight": (D, D), p + "self_attn.k_proj.weight": (kv, D),
                       p + "self_attn.v_proj.weight": (kv, D), p + "self_attn.o_proj.weight": (D, D),
                       p + "mlp.gate_proj.weight": (I, D), p + "mlp.up_proj.weight": (I, D),
                       p + "mlp.down_proj.weight": (D, I)})
    g = torch.Generator().manual_seed(0)
    save_file({name: (torch.randn(shape, generator=g) * 0.02).half() for name, shape in shapes.items()},
              medium / "model.safetensors")
    (medium / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": D, "intermediate_size": I,
        "num_hidden_layers": layers, "num_attention_heads": 12, "num_key_value_heads": 4, "vocab_size": 160,
        "max_position_embeddings": 64}))
    out = tmp_path / "medium-q"
    result = convert(ConvertOptions(str(medium), str(out), bits=4.0), progress=False)
    growth = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(quantized_llama), str(out)],
                            capture_output=True, text=True, check=True).stdout.split()[-1]
    assert int(growth) < 1.5 * result.size_bytes, f"loading {result.size_bytes} bytes of files peaked {growth} higher"


# -- the output directory ------------------------------------------------------------------------

def test_refuses_a_directory_that_is_not_ours(float_dirs, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(TrimtabError, match="not empty and was not made by trimtab convert"):
        convert(ConvertOptions(str(float_dirs["llama"]), str(out), bits=6.0), progress=False)
    assert os.listdir(out) == ["notes.txt"]
    # --force writes beside it, and never over a file that is not ours
    convert(ConvertOptions(str(float_dirs["llama"]), str(out), bits=6.0, force=True), progress=False)
    assert (out / "notes.txt").read_text() == "keep me" and (out / "config.json").is_file()
    with pytest.raises(TrimtabError, match="config.json: exists and was not written by trimtab convert"):
        convert(ConvertOptions(str(float_dirs["llama"]), str(float_dirs["qwen2"]), bits=6.0, force=True),
                progress=False)


def test_reconverting_our_directory_replaces_our_files(float_dirs, tmp_path, monkeypatch):
    out = tmp_path / "again"
    monkeypatch.setattr(convert_module, "MB", 20_000)
    first = convert(ConvertOptions(str(float_dirs["llama"]), str(out), bits=6.0, shard_mb=1), progress=False)
    assert any(f.startswith("model-") for f in first.files)
    second = convert(ConvertOptions(str(float_dirs["llama"]), str(out), bits=4.0, shard_mb=1000), progress=False)
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == sorted(second.files)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["bits"] == 4.0


def test_interrupted_convert_leaves_nothing_that_loads(float_dirs, tmp_path, monkeypatch):
    out = tmp_path / "cut"
    calls = []

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return convert_module.rtn.quantize_rtn(*args)

    monkeypatch.setitem(convert_module.METHODS, "rtn", (interrupted, convert_module.rtn.width_priority))
    with pytest.raises(KeyboardInterrupt):
        convert(ConvertOptions(str(float_dirs["llama"]), str(out), bits=6.0), progress=False)
    with pytest.raises(TrimtabError):
        trimtab.load(out)
    monkeypatch.undo()
    convert(ConvertOptions(str(float_dirs["llama"]), str(out), bits=6.0), progress=False)  # ours: resumes
    trimtab.load(out)


# -- command line and bad flags -------------------------------------------------------------------

def test_command_line_convert(float_dirs, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["convert", "-i", str(float_dirs["qwen2"]), "-o", str(out), "-b", "5", "-hb", "8", "-g", "32",
                 "--method", "rtn", "-ss", "100"]) == 0
    assert "bits per weight" in capsys.readouterr().out
    assert trimtab.load(out).logits(IDS).shape == (len(IDS), 160)


@pytest.mark.parametrize("flags, message", [
    (["-b", "1.5"], "-b must be between 2 and 8 bits per weight, got 1.5"),
    (["-b", "9"], "-b must be between 2 and 8"),
    (["-b", "2"], "-b 2 with -g 128: 2 bits per weight is below what these groups allow"),
    (["-b", "5", "-hb", "7"], "-hb must be one of 2, 3, 4, 5, 6, 8, got 7"),
    (["-b", "5", "-g", "16"], "-g must be between 32 and 128 rows, got 16"),
    (["-b", "5", "-ss", "0"], "-ss must be at least 1 MB"),
])
def test_bad_flags_are_one_clear_line(float_dirs, tmp_path, capsys, flags, message):
    assert main(["convert", "-i", str(float_dirs["llama"]), "-o", str(tmp_path / "x"), *flags]) == 1
    err = capsys.readouterr().err
    last = err.replace("\r", "\n").strip().splitlines()[-1]  # after any progress bar
    assert last.startswith("trimtab: error: ") and message in last and "Traceback" not in err
    assert not (tmp_path / "x" / "config.json").exists()


def test_unknown_method_and_bad_input(tmp_path, quantized_llama, capsys):
    with pytest.raises(SystemExit):
        main(["convert", "-i", "default", "-o", str(tmp_path / "x"), "-b", "4", "--method", "gptq"])
    assert "invalid choice: 'gptq'" in capsys.readouterr().err
    assert main(["convert", "-i", str(tmp_path / "nothing"), "-o", str(tmp_path / "x"), "-b", "4"]) == 1
    assert "no such file or directory" in capsys.readouterr().err
    assert main(["convert", "-i", str(quantized_llama), "-o", str(tmp_path / "x"), "-b", "4"]) == 1
    assert "already quantized (trimtab)" in capsys.readouterr().err


# -- malformed quantized directories --------------------------------------------------------------

def edit_weights(directory, change) -> None:
    from safetensors.torch import load_file, save_file

    weights = load_file(directory / "model.safetensors")
    change(weights)
    save_file(weights, directory / "model.safetensors")


def edit_config(directory, change) -> None:
    config = json.loads((directory / "config.json").read_text())
    change(config)
    (directory / "config.json").write_text(json.dumps(config))


UP = "model.layers.1.mlp.up_proj"


@pytest.mark.parametrize("error, message, weights_change, config_change", [
    (ModelFileError, f"quantized layer {UP}: missing tensor {UP}.scales",
     lambda w: w.pop(f"{UP}.scales"), None),
    (UnsupportedModelError, f"no tensor '{UP}.weight' nor a quantized '{UP}.qweight'",
     lambda w: [w.pop(f"{UP}.{p}") for p in ("qweight", "scales", "mins", "group_bits", "group_sizes")], None),
    (ModelFileError, f"quantized layer {UP}: width 7 is not one of 2, 3, 4, 5, 6, 8",
     lambda w: w[f"{UP}.group_bits"].__setitem__(0, 7), None),
    (ModelFileError, rf"quantized layer {UP}: qweight is \[\d+, 96\], but its groups need",
     lambda w: w.__setitem__(f"{UP}.qweight", w[f"{UP}.qweight"][1:].clone()), None),
    (ModelFileError, r"quantized layer model.layers.0.mlp.gate_proj is \[96, 64\] \(out, in\), but the config "
                     r"needs \[100, 64\]",
     None, lambda c: c.update(intermediate_size=100)),
    (UnsupportedModelError, "quantized with 'gptq'; trimtab loads float models",
     None, lambda c: c["quantization_config"].update(quant_method="gptq")),
    (ModelFileError, "format_version 2 was written by a newer trimtab",
     None, lambda c: c["quantization_config"].update(format_version=2)),
    (ModelFileError, "quantization_config: 'head_bits' must be one of 2, 3, 4, 5, 6, 8, found 7",
     None, lambda c: c["quantization_config"].update(head_bits=7)),
    (ModelFileError, "'quantization_config' must be an object",
     None, lambda c: c.update(quantization_config="rtn")),
])
def test_malformed_quantized_dirs_give_clear_errors(quantized_llama, tmp_path, error, message, weights_change,
                                                     config_change):
    broken = tmp_path / "broken"
    shutil.copytree(quantized_llama, broken)
    if weights_change:
        edit_weights(broken, weights_change)
    if config_change:
        edit_config(broken, config_change)
    with pytest.raises(error, match=message) as caught:
        trimtab.load(broken)
    assert str(broken) in str(caught.value)
    assert main(["generate", "w5", "-m", str(broken)]) == 1  # one line on the command line, no traceback
