"""Tensor parallel on the CPU (gloo): 2 processes, each with its share of every layer, give the logits
and greedy tokens of one process, for tiny random Llama (GQA), Qwen2 (q/k/v bias, tied head), Mixtral
(experts sharded) and a quantized Llama whose layers have act-order permutations (shares cut from
the packed format: groups split across ranks). Also: shares of a quantized layer dequantize to slices
of the whole, torchrun with `trimtab generate --tensor-parallel 2`, and the clear errors."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tiny_models import write_tiny_model_dir
from trimtab.backend.errors import TrimtabError
from trimtab.backend.quant import format as qformat
from trimtab.backend.quant import shard
from trimtab.backend.tensor_parallel import TensorParallel

pytest.importorskip("transformers")

WORKER = Path(__file__).with_name("tp_worker.py")
IDS = [5, 17, 42, 99, 7, 150, 3, 64, 12, 80]
TIMEOUT = 180


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_worker(model_dir: Path, out: Path, world: int, *flags: str) -> dict:
    """WORKER on `world` ranks (as torchrun would start them); → rank 0's results."""
    port = free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, str(WORKER), str(model_dir), str(out), json.dumps(IDS), *flags],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    failures = []
    for rank, proc in enumerate(procs):
        try:
            _, err = proc.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail(f"rank {rank} did not finish in {TIMEOUT} s")
        if proc.returncode:
            failures.append(f"rank {rank} exited {proc.returncode}:\n{err[-3000:]}")
    assert not failures, "\n".join(failures)
    return torch.load(out)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    dirs = {}
    for arch in ("llama", "qwen2", "mixtral", "mistral"):
        dirs[arch] = tmp_path_factory.mktemp(arch)
        write_tiny_model_dir(arch, dirs[arch])
    return dirs


@pytest.fixture(scope="module")
def act_order_llama(model_dirs, tmp_path_factory):
    """The tiny Llama converted at 5 bpw in groups of 32, then every decoder linear given a random
    act-order permutation (a different but valid model: what matters is that shares and whole agree)."""
    from safetensors.torch import load_file, save_file

    from trimtab.backend.quant.convert import ConvertOptions, convert

    out = tmp_path_factory.mktemp("q") / "llama-act-order"
    convert(ConvertOptions(str(model_dirs["llama"]), str(out), bits=5.0, head_bits=6, group_size=32, method="rtn"),
            progress=False)
    tensors = load_file(out / "model.safetensors")
    gen = torch.Generator().manual_seed(0)
    for name in [n for n in tensors if n.endswith(".group_sizes") and n.startswith("model.layers.")]:
        prefix = name.removesuffix(".group_sizes")
        tensors[prefix + ".perm"] = torch.randperm(int(tensors[name].sum()), generator=gen).to(torch.int32)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


def single_process(model_dir: Path, tmp_path: Path, *flags: str) -> dict:
    return run_worker(model_dir, tmp_path / "single.pt", 1, *flags)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mixtral"])
def test_two_ranks_match_one_process(model_dirs, tmp_path, arch):
    whole = single_process(model_dirs[arch], tmp_path)
    split = run_worker(model_dirs[arch], tmp_path / "tp.pt", 2)
    torch.testing.assert_close(split["logits"], whole["logits"], rtol=1e-4, atol=1e-5)
    assert split["greedy"] == whole["greedy"]


def test_quantized_act_order_model_matches_across_ranks(act_order_llama, tmp_path):
    whole = single_process(act_order_llama, tmp_path, "--exact")
    split = run_worker(act_order_llama, tmp_path / "tp.pt", 2, "--exact")
    torch.testing.assert_close(split["logits"], whole["logits"], rtol=1e-4, atol=1e-5)
    # the default int8 kernels round activations in blocks that the shares cut differently: the split
    # model is no further from the exact logits than the whole one is
    whole_int8 = single_process(act_order_llama, tmp_path)
    split_int8 = run_worker(act_order_llama, tmp_path / "tp-int8.pt", 2)
    error = {name: (run["logits"] - whole["logits"]).abs().mean().item()
             for name, run in (("whole", whole_int8), ("split", split_int8))}
    assert 0 < error["split"] < 2 * error["whole"], error


@pytest.mark.parametrize("act_order", [False, True])
def test_shares_of_a_quantized_layer_are_slices_of_it(act_order):
    gen = torch.Generator().manual_seed(1)
    in_features, out_features, sizes, widths = 100, 24, [32, 32, 32, 4], [4, 3, 8, 5]
    q = torch.cat([torch.randint(0, 2 ** b, (n, out_features), generator=gen) for n, b in zip(sizes, widths)])
    perm = torch.randperm(in_features, generator=gen) if act_order else None
    layer = qformat.pack(q, torch.rand(4, out_features, generator=gen) / 10, torch.randn(4, out_features, generator=gen),
                         widths, sizes, perm=perm)
    whole = qformat.dequantize(layer)                                                  # [out, in]
    for start, end in ((0, 37), (37, 100), (10, 11)):
        part = shard.input_rows(layer, start, end)
        assert torch.equal(qformat.dequantize(part), whole[:, start:end])
        assert part.group_sizes.sum() == end - start and (part.perm is None) == (perm is None)
    assert torch.equal(qformat.dequantize(shard.output_columns(layer, 5, 17)), whole[5:17])


def test_shares_cover_every_item_once():
    for n, world in ((96, 2), (7, 3), (2, 4)):
        shares = [TensorParallel(rank, world).share(n) for rank in range(world)]
        assert shares[0][0] == 0 and shares[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(shares, shares[1:]))
        assert max(e - s for s, e in shares) - min(e - s for s, e in shares) <= 1


def test_indivisible_kv_heads_are_a_clear_error(model_dirs, tmp_path):
    with pytest.raises(AssertionError, match="num_key_value_heads \\(1\\) to be a multiple of 2"):
        run_worker(model_dirs["mistral"], tmp_path / "tp.pt", 2)


def test_without_torchrun_environment_is_a_clear_error(model_dirs, monkeypatch):
    import trimtab

    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(TrimtabError, match="torchrun"):
        trimtab.load(model_dirs["llama"], tensor_parallel=2)


def test_torchrun_generate_prints_what_one_process_prints(model_dirs):
    command = ["generate", "w5 w6 w7", "-m", str(model_dirs["qwen2"]), "--temperature", "0", "--max-new-tokens", "8"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    single = subprocess.run([sys.executable, "-m", "trimtab.plugin.cli", *command], capture_output=True, text=True,
                            env=env, timeout=TIMEOUT)
    assert single.returncode == 0, single.stderr
    parallel = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                               "-m", "trimtab.plugin.cli", *command, "--tensor-parallel", "2"],
                              capture_output=True, text=True, env=env, timeout=TIMEOUT)
    assert parallel.returncode == 0, parallel.stderr[-3000:]
    assert parallel.stdout == single.stdout and single.stdout.strip()
