"""The measurement pass of `trimtab convert`: for every decoder linear layer, the output error GPTQ
leaves at each candidate layout (width × group size × act-order or not), on -mr rows of -ml tokens.

    measurement = measure(runner, rows, embedding, layers=N, group_size=128, state=..., save=...)
    measurement["layers"][name]["errors"]["g128-b4-act"]   # tr(ΔW H ΔWᵀ) per token: 4 bits, groups of 128, act-order

The float model runs layer by layer (layerwise.py); each layer's inputs come from the float layers
before it. Per linear, H = XᵀX / N over the tokens that reached it (damped as GPTQ damps it), and for
each candidate the error is tr(ΔW H ΔWᵀ) (gptq.py gets it from GPTQ's own steps, on a sample of
output columns). The allocator compares layers by that error times the layer's `weight` (1, except a
mixture-of-experts expert: its share of the routed tokens, so that an expert used twice as often as
the average counts twice). `energy`, tr(W H Wᵀ), is recorded beside it (the base of a relative error).

Mixture of experts: each expert's Hessian comes only from the tokens routed to it. An expert that
saw fewer tokens than its input width has a Hessian of too low a rank to trust — GPTQ would fit those
few tokens at the expense of every other input — so it gets an isotropic Hessian instead (the identity
scaled to the mean diagonal of its better-fed siblings'), with which GPTQ is exactly round-to-nearest
with the range search; its weight in the allocation is 1 (calibration cannot tell how often it is
used). Such experts are listed in the measurement (`starved`) and reported by convert.

The state is saved after every decoder layer (measurement.json in the work dir), so an interrupted
measurement resumes: the float layers already measured are only run again to rebuild the activations.
"""
from __future__ import annotations

import re
from typing import Callable, Sequence

import torch

from trimtab.backend.quant.format import WIDTHS, split_groups
from trimtab.backend.quant.gptq import Grouping, HessianSolver, output_energy, single_thread
from trimtab.backend.quant.hessian import HessianAccumulator, Tap
from trimtab.backend.quant.layerwise import LayerRunner, input_key

MEASUREMENT_FORMAT = 1
ACT_ORDERS = (True, False)    # each layer is measured with act-order and without (gptq.py says why)
SAMPLE_COLUMNS = 128          # output columns GPTQ solves per candidate when measuring (an estimate: gptq.py)
_EXPERT = re.compile(r"^(.*\.experts)\.(\d+)\.(w[123])$")


def candidate_key(group_size: int, bits: int, act_order: bool) -> str:
    return f"g{group_size}-b{bits}-{'act' if act_order else 'seq'}"


def candidate_groups(group_size: int) -> list[int]:
    """Group sizes measured for -g: -g itself and its halves down to 32."""
    sizes, g = [], group_size
    while g >= 32 and len(sizes) < 3:
        sizes.append(g)
        g //= 2
    return sorted(sizes)


def layer_hessians(accumulators: dict[str, HessianAccumulator], names: Sequence[str],
                   in_features: dict[str, int]) -> tuple[dict[str, torch.Tensor], dict[str, int], list[str]]:
    """Per linear: its Hessian, the tokens behind it, and the names of starved experts (module docstring).
    Used by the measurement and the quantize pass alike."""
    hessians, tokens, starved = {}, {}, []
    for name in names:
        acc = accumulators[input_key(name)]
        hessians[name], tokens[name] = acc.hessian(), acc.tokens
    for name in names:
        match = _EXPERT.match(name)
        if match is None or tokens[name] >= in_features[name]:
            continue
        siblings = [hessians[n] for n in names if (m := _EXPERT.match(n)) and m.group(1) == match.group(1)
                    and m.group(3) == match.group(3) and tokens[n] >= in_features[n]]
        pool = siblings or [hessians[n] for n in names if (m := _EXPERT.match(n)) and m.group(1) == match.group(1)
                            and m.group(3) == match.group(3)]
        scale = float(torch.stack(pool).diagonal(dim1=1, dim2=2).mean()) if pool else 0.0
        hessians[name] = torch.eye(in_features[name], dtype=torch.float64) * (scale if scale > 0 else 1.0)
        starved.append(name)
    return hessians, tokens, starved


def tap_part(runner: LayerRunner, layer, part: str) -> tuple[dict[str, HessianAccumulator], dict[str, int]]:
    """Wrap `part`'s linears in Taps (shared accumulators per input); → (accumulators, in_features)."""
    accumulators: dict[str, HessianAccumulator] = {}
    in_features: dict[str, int] = {}

    def tap(name, linear):
        in_features[name] = linear.weight.shape[1]
        acc = accumulators.setdefault(input_key(name), HessianAccumulator(in_features[name]))
        return Tap(linear, acc)

    runner.map_linears(layer, part, tap)
    return accumulators, in_features


def untap_part(runner: LayerRunner, layer, part: str) -> None:
    runner.map_linears(layer, part, lambda name, linear: linear.layer if isinstance(linear, Tap) else linear)


def expert_weights(tokens: dict[str, int], starved: list[str]) -> dict[str, float]:
    """Each linear's weight in the allocation (module docstring): 1, or an expert's share of the routed tokens."""
    weights = dict.fromkeys(tokens, 1.0)
    groups: dict[tuple[str, str], list[str]] = {}
    for name in tokens:
        if (m := _EXPERT.match(name)):
            groups.setdefault((m.group(1), m.group(3)), []).append(name)
    for members in groups.values():
        mean = sum(tokens[n] for n in members) / len(members)
        for n in members:
            weights[n] = 1.0 if n in starved or mean == 0 else tokens[n] / mean
    return weights


def measure(runner: LayerRunner, rows: torch.Tensor, embedding: torch.Tensor, *, layers: int, group_size: int,
            state: dict, save: Callable[[dict], None], progress: bool = True) -> dict:
    """Fill `state` (a fresh or resumed measurement) layer by layer, saving after each; → state."""
    from tqdm.auto import tqdm

    state.setdefault("layers", {})
    state.setdefault("starved", [])
    done = state.setdefault("layers_done", 0)
    groups = candidate_groups(group_size)
    state["group_sizes"], state["widths"] = groups, list(WIDTHS)
    if done >= layers:
        return state
    x = runner.embed(rows, embedding)
    for index in tqdm(range(layers), desc="Measuring", unit="layer", disable=not progress):
        layer = runner.build(index)
        for part in ("attention", "mlp"):
            if index < done:
                x = runner.run(layer, x, part)              # rebuilding the activations of a resumed job
                continue
            accumulators, in_features = tap_part(runner, layer, part)
            x = runner.run(layer, x, part)
            untap_part(runner, layer, part)
            names = list(in_features)
            hessians, tokens, starved = layer_hessians(accumulators, names, in_features)
            weights = expert_weights(tokens, starved)
            with single_thread():
                for name in names:
                    weight = runner.weights[name + ".weight"].float()                # [out, in]
                    state["layers"][name] = measure_linear(weight, hessians[name], groups, tokens[name], weights[name])
            state["starved"] += starved
        if index >= done:
            state["layers_done"] = index + 1
            save(state)
    return state


def measure_linear(weight: torch.Tensor, hessian: torch.Tensor, groups: Sequence[int], tokens: int,
                   weight_in_allocation: float) -> dict:
    out_features, in_features = weight.shape
    errors = {}
    for act_order in ACT_ORDERS:
        solver = HessianSolver.prepare(hessian, act_order=act_order)
        layouts = [(g, b) for g in groups for b in WIDTHS]
        candidates = [Grouping(split_groups(in_features, g), [b] * len(split_groups(in_features, g)))
                      for g, b in layouts]
        found = solver.candidate_errors(weight, candidates, SAMPLE_COLUMNS)
        errors.update({candidate_key(g, b, act_order): e for (g, b), e in zip(layouts, found)})
    return {"out": out_features, "in": in_features, "tokens": tokens, "weight": weight_in_allocation,
            "energy": output_energy(weight, hessian), "errors": errors}
