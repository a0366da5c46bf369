"""One rank of a tensor-parallel run for tests/test_tensor_parallel.py (started once per rank with
torchrun's environment variables): loads MODEL with its share of every layer and, on rank 0, saves
the logits of IDS to OUT.

    RANK=r WORLD_SIZE=n MASTER_ADDR=127.0.0.1 MASTER_PORT=p python tp_worker.py MODEL OUT IDS_JSON [--exact]

--exact runs every packed quantized layer with the fp32 kernel (no int8 rounding of activations,
which depends on how the input rows are grouped), so shares and whole differ by float rounding only.
"""
from __future__ import annotations

import json
import os
import sys

import torch

import trimtab


def use_exact_kernels(transformer) -> None:
    from trimtab.backend.quant.kernels import CpuPackedLinear

    for layer in transformer.layers:
        for block in (layer.self_attn, layer.mlp):
            for linear in vars(block).values():
                for candidate in (linear if isinstance(linear, list) else [linear]):
                    for part in (candidate if isinstance(candidate, tuple) else (candidate,)):
                        if isinstance(part, CpuPackedLinear):
                            part.kernel = "fp32"
    if isinstance(transformer.lm_head, CpuPackedLinear):
        transformer.lm_head.kernel = "fp32"


def main() -> None:
    model_dir, out, ids = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    world = int(os.environ.get("WORLD_SIZE", 1))
    model = trimtab.load(model_dir, tensor_parallel=world if world > 1 else None)
    if "--exact" in sys.argv:
        use_exact_kernels(model.transformer)
    logits = model.logits(ids)
    greedy = model.generate(" ".join(f"w{i}" for i in ids[:4]), temperature=0, max_new_tokens=8,
                            ban_eos_token=True).text
    if model.transformer.tp.rank == 0:
        torch.save({"logits": logits, "greedy": greedy}, out)


if __name__ == "__main__":
    main()
