"""GPTQ on one layer (backend/quant/gptq.py), Hessian accumulation (hessian.py) and the measurement's
candidate errors (measure.py) against plain references."""
from __future__ import annotations

import pytest
import torch

from trimtab.backend.quant import format as fmt
from trimtab.backend.quant.gptq import DAMP, Grouping, HessianSolver, output_error
from trimtab.backend.quant.hessian import HessianAccumulator, Tap
from trimtab.backend.quant.measure import layer_hessians
from trimtab.backend.quant.rtn import quantize_rtn


def layer_and_inputs(out=40, inputs=96, tokens=512, seed=0):
    """Weights with outliers, and inputs with correlated features of very different scales (as in LLMs)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inputs, generator=g) * 0.05
    w[torch.rand(out, inputs, generator=g) < 0.01] *= 8
    mix = torch.eye(inputs) + torch.randn(inputs, inputs, generator=g) / inputs ** 0.5
    x = (torch.randn(tokens, inputs, generator=g) @ mix) * torch.rand(inputs, generator=g).mul(2).exp()
    return w, x


@pytest.mark.parametrize("bits", [2, 3, 4, 6])
def test_gptq_lowers_output_error_below_rtn(bits):
    w, x = layer_and_inputs(seed=bits)
    h = x.T @ x
    sizes = fmt.split_groups(96, 32)
    layer = HessianSolver.prepare(h).quantize(w, sizes, [bits] * len(sizes))
    rtn = quantize_rtn(w, sizes, [bits] * len(sizes))
    assert layer.perm is not None and sorted(layer.perm.tolist()) == list(range(96))
    # the error as the formula has it, on the inputs themselves
    actual = (x @ (w - fmt.dequantize(layer)).T).square().sum().item()
    assert output_error(w, layer, h) == pytest.approx(actual, rel=1e-3)
    assert output_error(w, layer, h) < 0.7 * output_error(w, rtn, h)


def test_act_order_quantizes_the_strongest_inputs_first():
    w, x = layer_and_inputs()
    h = x.T @ x
    layer = HessianSolver.prepare(h).quantize(w, [96], [4])
    energy = h.diagonal()
    assert torch.equal(layer.perm.long(), torch.argsort(energy, descending=True, stable=True))
    no_order = HessianSolver.prepare(h, act_order=False).quantize(w, [96], [4])
    assert no_order.perm is None                                   # rows in their own order: no perm stored


def test_isotropic_hessian_is_round_to_nearest():
    # what a starved expert gets (measure.py): GPTQ has nothing to propagate, so it is rtn exactly
    w, _ = layer_and_inputs()
    sizes = [32, 32, 32]
    layer = HessianSolver.prepare(torch.eye(96) * 3.0).quantize(w, sizes, [3, 4, 5])
    assert torch.equal(fmt.dequantize(layer), fmt.dequantize(quantize_rtn(w, sizes, [3, 4, 5])))


def test_gptq_is_deterministic_and_handles_dead_inputs():
    w, x = layer_and_inputs()
    x[:, 5] = 0                                                    # an input that never fires
    h = x.T @ x
    first = HessianSolver.prepare(h).quantize(w, [64, 32], [3, 5])
    second = HessianSolver.prepare(h.clone()).quantize(w.clone(), [64, 32], [3, 5])
    for name, tensor in first.tensors("p").items():
        assert torch.equal(tensor, second.tensors("p")[name]), name
    assert first.perm[-1] == 5                                     # dead inputs go last
    assert torch.isfinite(fmt.dequantize(first)).all()


@pytest.mark.parametrize("act_order", [True, False])
def test_candidate_errors_match_quantizing_each_layout(act_order):
    # GPTQ's own steps give the error exactly (‖e‖² = tr(ΔW H ΔWᵀ)) for the damped Hessian it solved with
    w, x = layer_and_inputs(out=40)
    h = x.T @ x
    damped = h + DAMP * h.diagonal().mean() * torch.eye(96)
    solver = HessianSolver.prepare(h, act_order=act_order)
    layouts = [Grouping(fmt.split_groups(96, g), [b] * len(fmt.split_groups(96, g))) for g in (32, 64) for b in (2, 4, 8)]
    together = solver.candidate_errors(w, layouts, sample=1000)                 # every column
    alone = [output_error(w, solver.quantize(w, c.sizes, c.bits), damped) for c in layouts]
    assert together == pytest.approx(alone, rel=1e-3)
    sampled = solver.candidate_errors(w, layouts, sample=20)                    # half the columns, scaled
    assert sampled == pytest.approx(alone, rel=0.5)
    assert sampled[0] > sampled[1] > sampled[2]


def test_hessian_accumulator_counts_a_shared_input_once():
    acc = HessianAccumulator(8)
    q, k = Tap(lambda x: x * 2, acc), Tap(lambda x: x * 3, acc)
    x = torch.randn(2, 5, 8)
    q(x), k(x)                                                     # q/k/v read one input
    y = torch.randn(3, 8)
    q(y)
    both = torch.cat([x.reshape(-1, 8), y])
    assert acc.tokens == 13
    assert torch.allclose(acc.hessian(), (both.T @ both).double() / 13, atol=1e-6)


def test_starved_experts_get_an_isotropic_hessian():
    names = [f"m.experts.{e}.{n}" for e in range(3) for n in ("w1", "w3", "w2")]
    accs = {}
    for e, tokens in enumerate((50, 40, 3)):                       # expert 2 saw 3 tokens of 16-wide inputs
        for n, width in (("w1", 16), ("w2", 24)):
            acc = accs[f"m.experts.{e}.{n}"] = HessianAccumulator(width)
            acc.add(torch.randn(tokens, width) * (e + 1))
    widths = {name: 24 if name.endswith("w2") else 16 for name in names}
    hessians, tokens, starved = layer_hessians(accs, names, widths)
    assert starved == ["m.experts.2.w1", "m.experts.2.w3", "m.experts.2.w2"]
    h = hessians["m.experts.2.w1"]
    siblings = (hessians["m.experts.0.w1"].diagonal().mean() + hessians["m.experts.1.w1"].diagonal().mean()) / 2
    assert torch.allclose(h, torch.eye(16, dtype=torch.float64) * siblings)
    assert tokens["m.experts.0.w3"] == 50
