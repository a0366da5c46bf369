"""Each linear layer's input Hessian H = XᵀX / N, accumulated while calibration rows run through it.

    acc = HessianAccumulator(in_features)
    layer = Tap(layer, acc)           # same call as the layer; every input it sees is added to acc
    ...                               # run the model
    h = acc.hessian()                 # float64 [in, in], the mean over the tokens seen (acc.tokens)

Layers that read the same input (q/k/v; gate/up; an expert's w1/w3) share one accumulator; it adds
an input tensor once however many taps see it. Sums are float64, added in the order the rows run, so
a Hessian comes out the same, bit for bit, every run.
"""
from __future__ import annotations

import torch


class HessianAccumulator:
    def __init__(self, in_features: int):
        self.sum = torch.zeros(in_features, in_features, dtype=torch.float64)
        self.tokens = 0
        self._last: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        """x: [..., in] — one call's inputs."""
        if x is self._last:             # the same input through a second layer of the group
            return
        self._last = x
        x = x.reshape(-1, x.shape[-1])
        if len(x):
            self.sum += (x.T @ x).double()
            self.tokens += len(x)

    def hessian(self) -> torch.Tensor:
        """The mean XᵀX per token (zeros if no token came through)."""
        self._last = None
        return self.sum / max(self.tokens, 1)


class Tap:
    """A linear layer (any callable x → y) that also feeds its inputs to an accumulator."""

    def __init__(self, layer, accumulator: HessianAccumulator):
        self.layer = layer
        self.accumulator = accumulator

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.accumulator.add(x)
        return self.layer(x)
