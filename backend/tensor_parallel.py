"""Tensor parallelism over torch.distributed: each rank holds a share of every decoder layer.

    tp = TensorParallel.from_environment(device)  # under torchrun (RANK, WORLD_SIZE, MASTER_ADDR, ...)
    start, end = tp.share(num_kv_heads)           # this rank's contiguous share of n things
    y = tp.all_reduce(partial)                    # sum of every rank's partial result, in place
    tokens, stop = tp.agree(tokens, stop)         # rank 0's sampled tokens and stop decision

The split (Megatron-style): attention heads and KV heads, and the MLP's (and each expert's)
intermediate rows, are divided among the ranks. q/k/v and gate/up are column-parallel (a rank
computes its heads' or rows' outputs from the whole input); o and down are row-parallel (a rank
multiplies its share of the inputs, and one all-reduce per block sums the shares). The KV cache
holds a rank's own KV heads. Embedding, norms, routers and the output head are replicated, so every
rank ends a step with the same logits; rank 0's sampled tokens are broadcast so that sampling
state never drifts between ranks. NCCL on CUDA, gloo on the CPU (what the CI tests use).
"""
from __future__ import annotations

import atexit
import os
from dataclasses import dataclass

import torch

from trimtab.backend.errors import TrimtabError

ENVIRONMENT = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class TensorParallel:
    rank: int = 0
    world_size: int = 1

    @classmethod
    def from_environment(cls, device: torch.device, expected_world_size: int | None = None) -> "TensorParallel":
        """Join (or reuse) the default process group that torchrun describes in the environment."""
        import torch.distributed as dist

        if not dist.is_initialized():
            missing = [name for name in ENVIRONMENT if name not in os.environ]
            if missing:
                raise TrimtabError(f"tensor parallel needs torchrun's environment ({', '.join(missing)} not set); "
                                   "start with `torchrun --nproc-per-node N ...`")
            backend = "nccl" if device.type == "cuda" else "gloo"
            if device.type == "cuda":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            dist.init_process_group(backend)
            atexit.register(_leave_together, dist)
        tp = cls(dist.get_rank(), dist.get_world_size())
        if expected_world_size is not None and tp.world_size != expected_world_size:
            raise TrimtabError(f"--tensor-parallel {expected_world_size} but torchrun started {tp.world_size} "
                               f"processes; pass --nproc-per-node {expected_world_size}")
        return tp

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def share(self, n: int) -> tuple[int, int]:
        """[start, end) of this rank's share of n items: near-equal contiguous parts, the first n % world
        ranks one larger."""
        base, extra = divmod(n, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return start, start + base + (self.rank < extra)

    def check_divides(self, n: int, what: str) -> None:
        if n % self.world_size:
            raise TrimtabError(f"tensor parallel over {self.world_size} ranks needs {what} ({n}) to be a multiple "
                               f"of {self.world_size}")

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.active:
            import torch.distributed as dist

            dist.all_reduce(x)
        return x

    def agree(self, tokens: torch.Tensor, stop: bool) -> tuple[torch.Tensor, bool]:
        """Rank 0's tokens [B] int64 and stop flag, on every rank."""
        if not self.active:
            return tokens, stop
        import torch.distributed as dist

        message = torch.cat([tokens.to(torch.int64).reshape(-1), torch.tensor([int(stop)])])
        if dist.get_backend() == "nccl":
            message = message.cuda()
        dist.broadcast(message, src=0)
        message = message.cpu()
        return message[:-1].reshape(tokens.shape).to(tokens.device), bool(message[-1])


SINGLE = TensorParallel()


def _leave_together(dist) -> None:
    """At exit, the ranks leave the process group trimtab joined together (a barrier, then destroy it):
    rank 0 hosts the rendezvous store, and going first it could tear the group down under a rank still
    leaving, which then aborts ("terminate called without an active exception")."""
    if dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()
