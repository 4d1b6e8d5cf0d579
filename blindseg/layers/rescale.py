"""Rescale: ``(x * mul) >> shift`` by dealer-assisted truncation, with an optional fused activation.

``act``: ``none`` (truncation only: 1 round, 4 B), ``relu`` (select: 2 + L rounds, one opening shared
with the truncation), ``leaky`` (LeakyReLU(t) = ReLU(t) + slope * (t - ReLU(t)), the slope as
q / 2^g with a second truncation: 3 + L rounds). ``rule`` says how calibration sets the shift:
``fixed`` (a power-of-two ``divisor``, plus any change of scale), ``linear`` (from the input's scale, e.g.
a conv's s + fw, to this value's), ``window`` (divide by ``divisor``: mul = round(2^k / divisor)). The float forward divides
by ``divisor`` (an average pool's window size).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import protocols as P
from ..circuit import Circuit
from ..errors import ScaleOverflowError
from ..preprocessing import MatSpec, select_spec, trunc_spec
from .base import Calibration, Layer, OpMaterial, Params, Runtime, check

if TYPE_CHECKING:
    import torch

    from ..plan import Op
    from ..protocols import Proto

ACTS = ("none", "relu", "leaky")
RULES = ("fixed", "linear", "window")
MAX_SLOPE_BITS = 12
MAX_SLOPE = 8.0
MARGIN_LOG2 = 29


@dataclass(frozen=True)
class RescaleParams(Params):
    shift: int = 0
    mul: int = 1
    act: str = "none"
    rule: str = "fixed"
    divisor: int = 1
    slope: float = 0.0  # leaky only: the negative slope
    slopes: tuple[float, ...] = ()  # leaky only: one negative slope per channel (PReLU), instead of ``slope``
    slope_bits: int = 0  # leaky only: g, the slope's fixed-point bits (set by calibration)

    def __post_init__(self) -> None:
        check(self.act in ACTS, f"rescale act {self.act!r} must be one of {ACTS}")
        check(self.rule in RULES, f"rescale rule {self.rule!r} must be one of {RULES}")
        check(0 <= self.shift <= 24 and 1 <= self.mul < 1 << 24 and self.divisor >= 1,
              f"rescale shift {self.shift} / mul {self.mul} / divisor {self.divisor} out of range")
        check(self.act != "leaky" or (all(-MAX_SLOPE <= v <= MAX_SLOPE for v in self.slopes) if self.slopes else
                                      -MAX_SLOPE <= self.slope <= MAX_SLOPE and self.slope != 0.0),
              f"LeakyReLU / PReLU slope {self.slopes or self.slope} must be in [-{MAX_SLOPE:g}, {MAX_SLOPE:g}] "
              "and not 0")
        check(not self.slopes or self.act == "leaky", "per-channel slopes need act='leaky'")
        check(0 <= self.slope_bits <= MAX_SLOPE_BITS, f"slope_bits {self.slope_bits} outside 0..{MAX_SLOPE_BITS}")

    @property
    def q(self) -> int | np.ndarray:
        """The slope as an integer at ``slope_bits`` fraction bits (per-channel slopes: shaped (1, C, 1, ...)
        by :meth:`Rescale` to broadcast over a value)."""
        if self.slopes:
            return np.array([round(v * (1 << self.slope_bits)) for v in self.slopes], dtype=np.int64)
        return round(self.slope * (1 << self.slope_bits))

    @property
    def max_slope(self) -> float:
        return max((abs(v) for v in self.slopes), default=abs(self.slope))


class Rescale(Layer):
    scale_mode = "source"
    kind = "rescale"
    params = RescaleParams

    def out_shape(self, op: Op, in_shapes: list[tuple[int, ...]]) -> tuple[int, ...] | None:
        slopes = op.params.slopes
        return in_shapes[0] if not slopes or len(slopes) == in_shapes[0][0] else None

    @staticmethod
    def _q(p: RescaleParams, ndim: int) -> int | np.ndarray:
        q = p.q
        return q.reshape(1, -1, *([1] * (ndim - 2))) if isinstance(q, np.ndarray) else q

    def specs(self, op: Op, in_shapes: list[tuple[int, ...]], batch: int, circ: Circuit) -> list[MatSpec]:
        p: RescaleParams = op.params
        n = batch * math.prod(op.shape)
        if p.act == "none":
            return [trunc_spec(n, p.shift)]
        if p.act == "relu":
            return [select_spec(n, p.shift, circ)]
        return [select_spec(n, p.shift, circ), trunc_spec(n, p.slope_bits)]

    def online(self, rt: Runtime, i: int, op: Op, ins: list[np.ndarray], mat: OpMaterial) -> Proto:
        p: RescaleParams = op.params
        z = ins[0] * np.uint32(p.mul) if p.mul != 1 else ins[0]
        if p.act == "none":
            return P.trunc(rt.party, z, mat.mats[0], p.shift)
        if p.act == "relu":
            return P.select(rt.party, z, mat.mats[0], p.shift, rt.circuit)
        return P.leaky(rt.party, z, mat.mats, p.shift, self._q(p, z.ndim), p.slope_bits, rt.circuit)

    def reference(self, op: Op, ins: list[np.ndarray], weights: Any = None) -> np.ndarray:
        p: RescaleParams = op.params
        t = _round_shift(ins[0] * p.mul, p.shift)
        if p.act == "none":
            return t
        pos = np.maximum(t, 0)
        if p.act == "relu":
            return pos
        return pos + _round_shift((t - pos) * self._q(p, t.ndim), p.slope_bits)

    def forward(self, op: Op, ins: list[torch.Tensor], weights: Any = None) -> torch.Tensor:
        import torch.nn.functional as F

        p: RescaleParams = op.params
        v = ins[0] / p.divisor if p.divisor != 1 else ins[0]
        if p.act == "relu":
            return F.relu(v)
        if p.act == "leaky":
            if p.slopes:
                import torch

                return F.prelu(v, torch.tensor(p.slopes, dtype=v.dtype))
            return F.leaky_relu(v, p.slope)
        return v

    def calibrate(self, op: Op, i: int, cal: Calibration, ops: tuple[Op, ...]) -> Params:
        """From the input value's scale to this op's: ``linear`` shift by the difference (a conv's fw, an
        interp's bits, and any change of scale), ``fixed`` also divides by a power-of-two ``divisor``,
        ``window`` multiplies by round(2^k / divisor) first. A negative shift is an exact multiply."""
        p: RescaleParams = op.params
        s_in, s_out = cal.scale(op.inputs[0]), cal.scale(i)
        if p.rule == "window":
            m_in = max(cal.maxabs[op.inputs[0]], 1e-9)
            k = s_in  # the multiplier's precision, lowered until the product fits
            while k > 0 and m_in * 2.0 ** (k + s_out) / p.divisor >= 2.0**MARGIN_LOG2:  # x * mul, x at s_in
                k -= 1
            p = replace(p, shift=k, mul=max(1, round(2.0 ** (k + s_out - s_in) / p.divisor)))
        else:
            base = p.divisor.bit_length() - 1 if p.rule == "fixed" else 0
            shift = base + s_in - s_out
            p = replace(p, shift=max(shift, 0), mul=1 << max(-shift, 0))
        if p.act == "leaky":  # |q * (t - ReLU(t))| < 2^29 with t at the output's scale (q < 0 for a negative slope)
            m = max(cal.maxabs[op.inputs[0]] / p.divisor * p.max_slope, 1e-9)
            g = min(MAX_SLOPE_BITS, MARGIN_LOG2 - 1 - s_out - math.ceil(math.log2(m)))
            if g < 4:
                raise ScaleOverflowError(f"{op.name}: LeakyReLU slope has only {g} bits left in the 32-bit ring")
            p = replace(p, slope_bits=g)
        return p


def _round_shift(z: np.ndarray, s: int) -> np.ndarray:
    """The reference truncation: floor (the secure one is this or one more, unbiased on average)."""
    return z >> s
