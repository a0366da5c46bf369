"""`trimtab convert` (gptq and rtn) on tiny models of every architecture, loading what it wrote, the
output directory's rules, an interrupted convert resumed to the same bytes, measurements reused, bad
flags, and malformed quantized directories."""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

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
def calibration_text(tmp_path_factory) -> Path:
    """Words of the tiny models' vocabulary: 8000 tokens."""
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("text") / "calibration.txt"
    path.write_text(" ".join(f"w{rng.randint(5, 159)}" for _ in range(8000)), encoding="utf-8")
    return path


def gptq_options(source, out, calibration_text, **changes) -> ConvertOptions:
    """CI-sized calibration: 8 rows of 32 tokens, measured on 4 rows of 32."""
    values = dict(group_size=32, calibration=str(calibration_text), rows=8, length=32, measure_rows=4,
                  measure_length=32)
    values.update(changes)
    return ConvertOptions(str(source), str(out), **values)


@pytest.fixture(scope="module")
def quantized_llama(float_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "llama-6"
    convert(ConvertOptions(str(float_dirs["llama"]), str(out), bits=6.0, group_size=32, method="rtn"), progress=False)
    return out


@pytest.mark.parametrize("method", ["rtn", "gptq"])
@pytest.mark.parametrize("arch", sorted(TINY_CONFIGS))
def test_convert_then_load_every_architecture(float_dirs, calibration_text, tmp_path, arch, method):
    reference = trimtab.load(float_dirs[arch]).logits(IDS)
    divergence = {}
    for bits, head_bits in ((4.0, 4), (6.0, 6), (8.0, 8)):
        out = tmp_path / f"{arch}-{bits}"
        result = convert(gptq_options(float_dirs[arch], out, calibration_text, bits=bits, head_bits=head_bits,
                                      method=method), progress=False)
        # rtn mixes two widths group by group; gptq picks one layout per layer (14 layers here)
        assert bits - (0.05 if method == "rtn" else 0.3) < result.bits_per_weight <= bits
        block = json.loads((out / "config.json").read_text())["quantization_config"]
        expected = {"quant_method": "trimtab", "format_version": 1, "method": method, "bits": bits,
                    "bits_per_weight": round(result.bits_per_weight, 6), "head_bits": head_bits, "group_size": 32}
        if method == "gptq":
            expected.update(allocation="dp", calibration={"dataset": "calibration.txt", "rows": 8, "length": 32,
                                                          "measurement_rows": 4, "measurement_length": 32})
        assert block == expected
        model = trimtab.load(out)
        assert model.transformer.unused_weights == []
        divergence[bits] = kl(reference, model.logits(IDS))
    # at -b 8 with groups of 32 gptq's layouts are 6-bit groups of 32 or 8-bit groups of 64-128 (9 bits do not fit)
    assert divergence[8.0] < (5e-3 if method == "rtn" else 1e-2) and divergence[6.0] < 0.05 and divergence[4.0] < 0.5
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
    convert(ConvertOptions(str(float_dirs["qwen2"]), str(out), bits=6.0, group_size=32, method="rtn"), progress=False)
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
    result = convert(ConvertOptions(str(path), str(out), bits=8.0, head_bits=8, group_size=32, method="rtn"),
                     progress=False)
    assert set(result.files) == {"model.safetensors", "tokenizer.json", "tokenizer_config.json",
                                 "generation_config.json", "config.json"}
    ids = [3, 4, 5, 6, 7]
    assert kl(trimtab.load(path).logits(ids), trimtab.load(out).logits(ids)) < 1e-3


def test_shards_and_index(float_dirs, quantized_llama, tmp_path, monkeypatch):
    monkeypatch.setattr(convert_module, "MB", 20_000)  # -ss 1 → shards of about 20 kB
    out = tmp_path / "sharded"
    result = convert(ConvertOptions(str(float_dirs["llama"]), str(out), bits=6.0, group_size=32, shard_mb=1,
                                    method="rtn"), progress=False)
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
    result = convert(ConvertOptions(str(medium), str(out), bits=4.0, method="rtn"), progress=False)
    growth = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(quantized_llama), str(out)],
                            capture_output=True, text=True, check=True).stdout.split()[-1]
    assert int(growth) < 1.5 * result.size_bytes, f"loading {result.size_bytes} bytes of files peaked {growth} higher"


# -- the output directory ------------------------------------------------------------------------

def test_refuses_a_directory_that_is_not_ours(float_dirs, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(TrimtabError, match="not empty and was not made by trimtab convert"):
        convert(ConvertOptions(str(float_dirs["llama"]), str(out), bits=6.0, method="rtn"), progress=False)
    assert os.listdir(out) == ["notes.txt"]
    # --force writes beside it, and never over a file that is not ours
    convert(ConvertOptions(str(float_dirs["llama"]), str(out), bits=6.0, force=True, method="rtn"), progress=False)
    assert (out / "notes.txt").read_text() == "keep me" and (out / "config.json").is_file()
    with pytest.raises(TrimtabError, match="config.json: exists and was not written by trimtab convert"):
        convert(ConvertOptions(str(float_dirs["llama"]), str(float_dirs["qwen2"]), bits=6.0, force=True,
                               method="rtn"), progress=False)


def test_reconverting_our_directory_replaces_our_files(float_dirs, tmp_path, monkeypatch):
    out = tmp_path / "again"
    monkeypatch.setattr(convert_module, "MB", 20_000)
    first = convert(ConvertOptions(str(float_dirs["llama"]), str(out), bits=6.0, shard_mb=1, method="rtn"),
                    progress=False)
    assert any(f.startswith("model-") for f in first.files)
    second = convert(ConvertOptions(str(float_dirs["llama"]), str(out), bits=4.0, shard_mb=1000, method="rtn"),
                     progress=False)
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
        convert(ConvertOptions(str(float_dirs["llama"]), str(out), bits=6.0, method="rtn"), progress=False)
    with pytest.raises(TrimtabError):
        trimtab.load(out)
    monkeypatch.undo()
    convert(ConvertOptions(str(float_dirs["llama"]), str(out), bits=6.0, method="rtn"), progress=False)  # ours
    trimtab.load(out)


# -- gptq: resuming, measurements, mixture of experts ---------------------------------------------

CHILD = """
import json, sys, time
from pathlib import Path
from trimtab.backend.quant import calibrated, output
from trimtab.backend.quant.convert import ConvertOptions, convert

options = ConvertOptions(**json.loads(sys.argv[1]))
stop_after = sys.argv[2]                  # 'measure:N', 'quantize:N' or 'never'

if stop_after != "never":
    stage, count = stop_after.split(":")
    def block_forever():
        while True:
            time.sleep(60)                # until the test kills this process
    if stage == "quantize":
        save_part = output.OutputDir.save_part
        def save_then_block(self, name, tensors, **job):
            save_part(self, name, tensors, **job)
            if job.get("layers_done") == int(count):
                block_forever()
        output.OutputDir.save_part = save_then_block
    else:
        write_json = calibrated.write_json
        def write_then_block(path, data):
            write_json(path, data)
            if Path(path).parent.name == ".trimtab-convert" and data.get("layers_done") == int(count):
                block_forever()
        calibrated.write_json = write_then_block
result = convert(options, progress=False)
print(json.dumps({"resumed": result.resumed}))
"""


def run_convert(options: ConvertOptions, stop_after: str = "never") -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="2")   # the same threads in every run: the same sums
    return subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(options.__dict__), stop_after],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def wait_for(condition, process: subprocess.Popen, what: str) -> None:
    """Poll the job's own record until `condition()` holds (no fixed sleep decides anything)."""
    deadline = time.monotonic() + 120
    while not condition():
        assert process.poll() is None, f"the convert ended before {what}: {process.communicate()[1][-2000:]}"
        assert time.monotonic() < deadline, f"no {what} within two minutes"
        time.sleep(0.05)


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def model_bytes(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def four_layer_llama(tmp_path_factory):
    from tiny_models import save_hf_model, tiny_tokenizer_json
    import transformers

    directory = tmp_path_factory.mktemp("llama4")
    config_cls, model_cls, values = TINY_CONFIGS["llama"]
    config = getattr(transformers, config_cls)(**dict(values, num_hidden_layers=4))
    torch.manual_seed(1)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if name.endswith("norm.weight") else 0.15 * torch.randn_like(p))
    save_hf_model(model, directory)
    (directory / "tokenizer.json").write_text(tiny_tokenizer_json())
    return directory


@pytest.mark.parametrize("stage", ["measure", "quantize"])
def test_killed_convert_resumes_to_the_same_bytes(four_layer_llama, calibration_text, tmp_path, stage):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    uninterrupted = run_convert(gptq_options(four_layer_llama, whole, calibration_text, bits=5.0))
    killed = run_convert(gptq_options(four_layer_llama, cut, calibration_text, bits=5.0), f"{stage}:2")
    work = cut / ".trimtab-convert"
    record = work / ("measurement.json" if stage == "measure" else "job.json")
    wait_for(lambda: read_json(record).get("layers_done") == 2, killed, f"two {stage}d layers")
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert read_json(work / "job.json")["stage"] != "done" and not (cut / "config.json").exists()
    resumed = run_convert(gptq_options(four_layer_llama, cut, calibration_text, bits=5.0))
    for process in (uninterrupted, resumed):
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr[-2000:]
    assert json.loads(stdout.splitlines()[-1]) == {"resumed": True}
    expected, got = model_bytes(whole), model_bytes(cut)
    assert sorted(got) == sorted(expected) and "model.safetensors" in got
    for name in expected:
        assert got[name] == expected[name], f"{name} differs after resuming"


def test_measure_only_then_reuse_the_measurement(float_dirs, calibration_text, tmp_path, capsys):
    full = convert(gptq_options(float_dirs["llama"], tmp_path / "full", calibration_text, bits=5.0), progress=False)
    assert main(["convert", "-i", str(float_dirs["llama"]), "-o", str(tmp_path / "m"), "-om", "-g", "32",
                 "-c", str(calibration_text), "-mr", "4", "-ml", "32"]) == 0
    assert "measurement.json" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [".trimtab-convert", "measurement.json"]
    convert(gptq_options(float_dirs["llama"], tmp_path / "reused", calibration_text, bits=5.0,
                         measurement=str(tmp_path / "m" / "measurement.json")), progress=False)
    assert model_bytes(tmp_path / "reused")["model.safetensors"] == model_bytes(full.output)["model.safetensors"]
    # a measurement of another model is refused
    with pytest.raises(TrimtabError, match="measures another model"):
        convert(gptq_options(float_dirs["qwen2"], tmp_path / "other", calibration_text, bits=5.0,
                             measurement=str(tmp_path / "m" / "measurement.json")), progress=False)


def test_a_job_of_another_model_is_refused(float_dirs, calibration_text, tmp_path):
    out = tmp_path / "job"
    convert(gptq_options(float_dirs["llama"], out, calibration_text, bits=6.0, measure_only=True), progress=False)
    with pytest.raises(TrimtabError, match=r"holds a convert of .*llama.*, not of .*qwen2.*; choose another directory"):
        convert(gptq_options(float_dirs["qwen2"], out, calibration_text, bits=6.0), progress=False)


def test_experts_that_saw_too_few_tokens_are_reported(float_dirs, calibration_text, tmp_path, capsys):
    # 2 rows of 16 tokens, 2 of 4 experts per token: each expert sees about 16 tokens of 64-wide inputs
    out = tmp_path / "moe"
    assert main(["convert", "-i", str(float_dirs["mixtral"]), "-o", str(out), "-b", "6", "-g", "32", "-c",
                 str(calibration_text), "-r", "2", "-l", "16", "-mr", "2", "-ml", "16"]) == 0
    printed = capsys.readouterr().out
    assert "experts saw fewer calibration tokens than their input width" in printed
    assert "model.layers.0.block_sparse_moe.experts.0.w1" in printed
    reference = trimtab.load(float_dirs["mixtral"]).logits(IDS)
    assert kl(reference, trimtab.load(out).logits(IDS)) < 0.1


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
    (["-b", "2", "--method", "rtn"], "-b 2 with -g 128: 2 bits per weight is below what these groups allow"),
    (["-b", "2.3"], "-b 2.3 with -g 128: 2.3 bits per weight is below what these groups allow: every layer at "
                    "its smallest layout already takes 2.452 (scales included); ask for more bits"),
    (["-r", "0"], "-r must be at least 1, got 0"),
    (["-c", "/nonexistent.txt"], "/nonexistent.txt: calibration text (-c) not found"),
    (["-m", "/nonexistent.json"], "/nonexistent.json: measurement (-m) not found"),
    (["-r", "100", "-l", "2048", "-c", "{text}"], "the calibration text has 8,000 tokens, but -r 100 × -l 2048 "
                                                  "needs 204,800; give a longer text (-c) or fewer or shorter rows"),
    (["-b", "5", "-hb", "7"], "-hb must be one of 2, 3, 4, 5, 6, 8, got 7"),
    (["-b", "5", "-g", "16"], "-g must be between 32 and 128 rows, got 16"),
    (["-b", "5", "-ss", "0"], "-ss must be at least 1 MB"),
])
def test_bad_flags_are_one_clear_line(float_dirs, calibration_text, tmp_path, capsys, flags, message):
    flags = [str(calibration_text) if f == "{text}" else f for f in flags]
    assert main(["convert", "-i", str(float_dirs["llama"]), "-o", str(tmp_path / "x"), *flags]) == 1
    err = capsys.readouterr().err
    last = err.replace("\r", "\n").strip().splitlines()[-1]  # after any progress bar
    assert last.startswith("trimtab: error: ") and message in last and "Traceback" not in err
    assert not (tmp_path / "x" / "config.json").exists()


def test_unknown_method_and_bad_input(tmp_path, quantized_llama, capsys):
    with pytest.raises(SystemExit):
        main(["convert", "-i", "default", "-o", str(tmp_path / "x"), "-b", "4", "--method", "awq"])
    assert "invalid choice: 'awq'" in capsys.readouterr().err
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
