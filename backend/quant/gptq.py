"""GPTQ: quantize one linear layer so that its *outputs* on calibration inputs change least — the
`gptq` method of docs/CONVERT.md.

    solver = HessianSolver.prepare(hessian)                    # once per layer: damping, act-order, Cholesky
    layer = solver.quantize(weight, group_sizes, group_bits)   # → QuantizedLinear (with perm)
    error = output_error(weight, layer, hessian)               # tr(ΔW H ΔWᵀ)

For inputs X [N, in], the output error of a quantized weight Q is ‖X Wᵀ - X Qᵀ‖² = tr(ΔW H ΔWᵀ) with
H = XᵀX and ΔW = W - Q. GPTQ quantizes the input rows (W's columns) one at a time and, after each,
moves the rows not yet quantized to cancel the error it left, through the inverse Hessian (the
optimal-brain-surgeon update): with U the upper Cholesky factor of H⁻¹,

    e = (w_j - q_j) / U[j, j];   W[:, j+1:] -= e ⊗ U[j, j+1:]

Choices made here (each the usual one, see the GPTQ paper, Frantar et al. 2022):
- damping: H + DAMP · mean(diag H) · I keeps the Cholesky factorisation stable; inputs that never
  fired (diag 0) get a diagonal of that mean, so their rows are simply rounded;
- act-order: rows are quantized in order of decreasing diag(H) (the inputs with the most energy first,
  while the most rows are left to absorb their error); the order is the format's `perm`, and groups
  are cut along it, so each group holds rows of similar importance. It costs 32 bits per input row
  (the stored perm) and breaks groups that line up with structure in the weights (a float model that
  was itself quantized in blocks, like the default model's Q4_1), so the measurement tries each layer
  both ways and the allocator chooses;
- groups: each group of rows is one lazy block — when a group starts, every earlier group's update has
  reached it, so its scale and minimum (rtn.py's range search, per output column) are chosen from the
  weights GPTQ has already corrected; the rows after the group receive its accumulated update at once.
All arithmetic is float32 on the CPU, in a fixed order, so a layer quantizes to the same bits every run.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Sequence

import torch

from trimtab.backend.errors import TrimtabError
from trimtab.backend.quant import rtn
from trimtab.backend.quant.format import QuantizedLinear, dequantize, pack

DAMP = 0.01


@dataclass(frozen=True)
class HessianSolver:
    perm: torch.Tensor              # int64 [in]: quantized row i is input row perm[i] (identity without act-order)
    inverse_factor: torch.Tensor    # float32 [in, in]: upper Cholesky factor of H⁻¹, rows/columns in perm order
    act_order: bool                 # without it the layer is stored with no perm (32 bits per input row saved)

    @classmethod
    def prepare(cls, hessian: torch.Tensor, *, damp: float = DAMP, act_order: bool = True) -> "HessianSolver":
        """hessian: [in, in] (any positive scale: XᵀX or its mean over tokens)."""
        h = hessian.to(torch.float64).clone()
        energy = h.diagonal().clone()           # act-order key: inputs that never fired go last
        diag = h.diagonal()
        mean = float(diag.mean()) if float(diag.mean()) > 0 else 1.0
        dead = diag <= 0
        diag[dead] = mean                       # an input that never fired: its rows are just rounded
        diag += damp * mean
        n = h.shape[0]
        perm = torch.argsort(energy, descending=True, stable=True) if act_order else torch.arange(n)
        h = h[perm][:, perm]
        factor, info = torch.linalg.cholesky_ex(h)
        if int(info) != 0:
            raise TrimtabError("the calibration Hessian is not positive definite even after damping")
        inverse = torch.cholesky_inverse(factor)
        upper = torch.linalg.cholesky(inverse, upper=True)
        return cls(perm, upper.to(torch.float32), act_order)

    def quantize(self, weight: torch.Tensor, group_sizes: Sequence[int], group_bits: Sequence[int]) -> QuantizedLinear:
        """weight: [out, in] float → the canonical layer; groups are cut along the act-order."""
        _check_groups(weight.shape[1], group_sizes, group_bits)
        w = weight.float().t()[self.perm].contiguous()                                 # [in, out], perm order
        (q, scales, mins, _), = _solve(w, self.inverse_factor, [Grouping(list(group_sizes), list(group_bits))])
        return pack(q, scales, mins, group_bits, group_sizes, perm=self.perm if self.act_order else None)

    def candidate_errors(self, weight: torch.Tensor, candidates: Sequence["Grouping"], sample: int) -> list[float]:
        """The output error GPTQ leaves at each candidate grouping, solved together in one pass. GPTQ
        treats each output column on its own, so the error is estimated from `sample` evenly spaced
        output columns (all of them if fewer) and scaled to the whole layer. The error of a column is
        Σ_j e_j² over the steps above: with H⁻¹ = UᵀU and ΔW = e U, tr(ΔW H ΔWᵀ) = ‖e‖² exactly, for
        the damped Hessian this solver was prepared with."""
        out_features, in_features = weight.shape
        for c in candidates:
            _check_groups(in_features, c.sizes, c.bits)
        columns = torch.linspace(0, out_features - 1, min(sample, out_features)).round().long().unique()
        w = weight.float()[columns].t()[self.perm].contiguous()                        # [in, c], perm order
        solved = _solve(w.repeat(1, len(candidates)), self.inverse_factor, list(candidates))
        return [float(loss) * out_features / len(columns) for *_, loss in solved]


@dataclass(frozen=True)
class Grouping:
    """One layout of a layer's rows: group sizes along the act-order and each group's width."""
    sizes: list[int]
    bits: list[int]


def _check_groups(in_features: int, sizes: Sequence[int], bits: Sequence[int]) -> None:
    if sum(sizes) != in_features or len(sizes) != len(bits):
        raise ValueError(f"groups {list(sizes)} do not tile {in_features} input rows")


def _solve(w: torch.Tensor, u: torch.Tensor, groupings: list[Grouping]):
    """GPTQ on w [in, k·c] (rows in act-order; columns: k groupings side by side, c columns each), in
    place. Lazy blocks end wherever any grouping starts a group, so when a group starts every earlier
    row's correction has reached it. → per grouping: q uint8 [in, c], scales and mins float16 [groups, c],
    and Σ e² over its columns (candidate_errors)."""
    in_features, width = w.shape
    c = width // len(groupings)
    starts = [[sum(g.sizes[:i]) for i in range(len(g.sizes))] for g in groupings]
    bounds = sorted({s for ss in starts for s in ss} | {in_features})
    q = torch.empty(in_features, width, dtype=torch.uint8)
    scales = [torch.empty(len(g.sizes), c, dtype=torch.float16) for g in groupings]
    mins = [torch.empty_like(s) for s in scales]
    s, m, top = torch.zeros(width), torch.zeros(width), torch.zeros(width)   # the grid of each column's group
    loss = torch.zeros(width, dtype=torch.float64)
    for start, end in zip(bounds[:-1], bounds[1:]):
        starting: dict[int, list[tuple[int, int]]] = {}     # group size → (grouping, its group index)
        for k, g in enumerate(groupings):
            if start in starts[k]:
                i = starts[k].index(start)
                starting.setdefault(g.sizes[i], []).append((k, i))
        for size, members in starting.items():               # one range search per group size
            blocks = torch.stack([w[start:start + size, k * c:(k + 1) * c].t() for k, _ in members])  # [k', c, n]
            widths = torch.tensor([[groupings[k].bits[i]] for k, i in members]).expand(-1, c)
            _, found_s, found_m = rtn.quantize_groups(blocks, widths if len(members) > 1 else int(widths[0, 0]))
            for (k, i), s16, m16 in zip(members, found_s, found_m):
                cols = slice(k * c, (k + 1) * c)
                scales[k][i], mins[k][i] = s16, m16
                s[cols], m[cols], top[cols] = s16.float(), m16.float(), 2 ** groupings[k].bits[i] - 1
        inv = torch.where(s > 0, 1 / s, 0.0)
        block = w[start:end]                                                             # [n, width], a view
        errors = torch.empty(end - start, width)
        for j in range(end - start):
            row = block[j]
            qj = torch.minimum(((row - m) * inv).round_().clamp_(min=0), top)
            q[start + j] = qj.to(torch.uint8)
            torch.div(row - (qj * s + m), u[start + j, start + j], out=errors[j])
            if start + j + 1 < end:
                block[j + 1:].addr_(u[start + j, start + j + 1:end], errors[j], alpha=-1)
        loss += errors.double().square().sum(0)
        if end < in_features:
            w[end:].addmm_(u[start:end, end:].t(), errors, alpha=-1)                      # the block's lazy update
    return [(q[:, k * c:(k + 1) * c], scales[k], mins[k], loss[k * c:(k + 1) * c].sum()) for k in range(len(groupings))]


def output_error(weight: torch.Tensor, layer: QuantizedLinear, hessian: torch.Tensor) -> float:
    """tr(ΔW H ΔWᵀ): the squared output error on the inputs H was made from (ΔW = W - dequantized)."""
    delta = weight.double() - dequantize(layer).double()                               # [out, in]
    return float(((delta @ hessian.double()) * delta).sum())


def output_energy(weight: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr(W H Wᵀ): the squared norm of the layer's outputs on those inputs (recorded by the measurement)."""
    w = weight.double()
    return float(((w @ hessian.double()) * w).sum())


@contextmanager
def single_thread():
    """GPTQ's many small steps run faster on one thread than two fighting over them, and one thread
    fixes the order of every sum."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
