"""Attention gates: a secure sigmoid inside the network and the product of two activations.

SecSigmoid (``sigmoid``): the linear interpolant of sigma between knots t_k = -8 + k/4 (k = 0..64),
sigma(-8) below and sigma(8) above, written with ReLUs:
sigma^(x) = v_0 + sum_k D_k (ReLU(x - t_k) - ReLU(x - t_k+1)), D_k = (v_k+1 - v_k) / (1/4) public.
All 65 ReLUs of an element are one batch of comparisons without truncation (2 + L rounds,
65 x 8.25 B per element), then one truncation to the output's scale (1 round, 4 B). Error
<= 7.5e-4 (interpolation, h^2/8 max|sigma''|) + 3.4e-4 (tails) + 2^-g (coefficients).

SecMul (``mul``): x * g for two activations, g with x's channels or one channel (broadcast), Beaver
with a fresh triple: 1 round, 4 B per element of each input. The product carries both inputs'
fraction bits; the next ``rescale`` removes them. MONAI's AttentionUnet gates (x * sigmoid(psi)) are
these two ops.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import cache
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import protocols as P
from ..circuit import Circuit
from ..preprocessing import MatSpec, mul_spec, select_spec, trunc_spec
from .base import Calibration, Layer, OpMaterial, Params, Runtime, check

if TYPE_CHECKING:
    import torch

    from ..plan import Op
    from ..protocols import Proto

SPAN, STEP = 8.0, 0.25
KNOTS = int(2 * SPAN / STEP) + 1
MAX_IN_BITS = 12  # the coefficients keep >= 16 bits: 2^(28 - 12)


@dataclass(frozen=True)
class SigmoidParams(Params):
    """Set by calibration: the input's and output's fraction bits and the coefficients' bits ``g``."""

    s_in: int = 8
    s_out: int = 12
    g: int = 16

    def __post_init__(self) -> None:
        check(2 <= self.s_in <= MAX_IN_BITS and 0 <= self.s_out <= 24 and 8 <= self.g <= 26
              and 0 <= self.s_in + self.g - self.s_out <= 30,
              f"sigmoid scales s_in={self.s_in} / s_out={self.s_out} / g={self.g} out of range")


@cache
def _knots(s_in: int, s_out: int, g: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Knots at the input's scale, coefficients D_k at scale g, and v_0 at the output's scale."""
    t = [-SPAN + k * STEP for k in range(KNOTS)]
    v = [1.0 / (1.0 + math.exp(-x)) for x in t]
    knots = np.array([round(x * 2**s_in) for x in t], dtype=np.int64)
    coef = np.array([round((v[k + 1] - v[k]) / STEP * 2**g) for k in range(KNOTS - 1)], dtype=np.int64)
    return knots, coef, round(v[0] * 2**s_out)


class Sigmoid(Layer):
    kind = "sigmoid"
    params = SigmoidParams
    scale_mode = "source"

    def out_shape(self, op: Op, in_shapes: list[tuple[int, ...]]) -> tuple[int, ...] | None:
        return in_shapes[0]

    def specs(self, op: Op, in_shapes: list[tuple[int, ...]], batch: int, circ: Circuit) -> list[MatSpec]:
        p: SigmoidParams = op.params
        n = batch * math.prod(op.shape)
        return [select_spec(n * KNOTS, 0, circ), trunc_spec(n, p.s_in + p.g - p.s_out)]

    def online(self, rt: Runtime, i: int, op: Op, ins: list[np.ndarray], mat: OpMaterial) -> Proto:
        p: SigmoidParams = op.params
        knots, coef, v0 = _knots(p.s_in, p.s_out, p.g)
        x = ins[0].reshape(-1, 1)
        d = np.repeat(x, KNOTS, axis=1)
        if rt.party == 0:
            d -= (knots & 0xFFFFFFFF).astype(np.uint32)
        r = (yield from P.select(rt.party, d, mat.mats[0], 0, rt.circuit)).reshape(-1, KNOTS)
        acc = ((r[:, :-1] - r[:, 1:]) * (coef & 0xFFFFFFFF).astype(np.uint32)).sum(axis=1, dtype=np.uint32)
        out = yield from P.trunc(rt.party, acc, mat.mats[1], p.s_in + p.g - p.s_out)
        if rt.party == 0:
            out += np.uint32(v0)
        return out.reshape(ins[0].shape)

    def reference(self, op: Op, ins: list[np.ndarray], weights: Any = None) -> np.ndarray:
        p: SigmoidParams = op.params
        knots, coef, v0 = _knots(p.s_in, p.s_out, p.g)
        r = np.maximum(ins[0].reshape(-1, 1) - knots, 0)
        acc = ((r[:, :-1] - r[:, 1:]) * coef).sum(axis=1)
        return ((acc >> (p.s_in + p.g - p.s_out)) + v0).reshape(ins[0].shape)

    def forward(self, op: Op, ins: list[torch.Tensor], weights: Any = None) -> torch.Tensor:
        import torch

        return torch.sigmoid(ins[0])

    def scale_caps(self, op: Op, i: int, maxabs: list[float], stats: dict[int, dict[str, float]]) -> dict[int, int]:
        return {op.inputs[0]: MAX_IN_BITS, i: 14}

    def calibrate(self, op: Op, i: int, cal: Calibration, ops: tuple[Op, ...]) -> Params:
        s_in, s_out = cal.scale(op.inputs[0]), cal.scale(i)
        return replace(op.params, s_in=s_in, s_out=s_out, g=min(26, 28 - s_in))


class Mul(Layer):
    kind = "mul"
    scale_mode = "derived"
    activation = False
    arity = (2, 2)

    def out_shape(self, op: Op, in_shapes: list[tuple[int, ...]]) -> tuple[int, ...] | None:
        a, b = in_shapes
        if a[1:] != b[1:] or b[0] not in (1, a[0]):
            return None
        return a

    def value_scale(self, op: Op, in_scales: list[int], fw: int) -> int:
        return in_scales[0] + in_scales[1]

    def specs(self, op: Op, in_shapes: list[tuple[int, ...]], batch: int, circ: Circuit) -> list[MatSpec]:
        return [mul_spec((batch, *in_shapes[0]), (batch, *in_shapes[1]))]

    def online(self, rt: Runtime, i: int, op: Op, ins: list[np.ndarray], mat: OpMaterial) -> Proto:
        return (yield from P.mul(rt.party, ins[0], ins[1], mat.mats[0]))

    def reference(self, op: Op, ins: list[np.ndarray], weights: Any = None) -> np.ndarray:
        return ins[0] * ins[1]

    def forward(self, op: Op, ins: list[torch.Tensor], weights: Any = None) -> torch.Tensor:
        return ins[0] * ins[1]

    def scale_caps(self, op: Op, i: int, maxabs: list[float], stats: dict[int, dict[str, float]]) -> dict[int, int]:
        """The product (both scales) below 2^28: the second input (a gate) up to 12 bits, the first the rest."""
        room = 28 - math.ceil(math.log2(max(maxabs[i], 1e-9)))
        second = min(12, room // 2)
        return {op.inputs[1]: second, op.inputs[0]: room - second}
