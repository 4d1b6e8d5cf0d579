"""SecMaxPool: a k^d window max as a tournament of comparisons (2x2: 2 depths, 3 comparisons per
output, each a select with s = 0; depths run in pairs, the second speculatively:
:func:`~blindseg.protocols.tournament_max`). A max-pool of a truncating ReLU's output (shift s) compares
values known to lie in [0, 2^(30-s)) (``bound_bits``, set by calibration, checked against the input op by
:meth:`MaxPool.validate_inputs`): 30 - s bits, one AND level from 18 bits down: 2x2 in 4 rounds.
Average pooling is a local window sum (``avgsum``) followed by a ``rescale`` that divides (see
:mod:`.local`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import protocols as P
from ..circuit import WIDTH, Circuit
from ..errors import UsageError
from ..preprocessing import MatSpec, tournament_specs
from .base import Calibration, Layer, OpMaterial, Params, Runtime, check, pooled_shape, windows
from .rescale import RescaleParams

if TYPE_CHECKING:
    import torch

    from ..plan import Op
    from ..protocols import Proto


@dataclass(frozen=True)
class PoolParams(Params):
    kernel: int
    stride: int

    def __post_init__(self) -> None:
        check(1 <= self.kernel <= 16 and 1 <= self.stride <= 16, f"pool kernel {self.kernel} / stride {self.stride}")


@dataclass(frozen=True)
class MaxPoolParams(PoolParams):
    bound_bits: int = WIDTH  # every input is in [0, 2^bound_bits) by construction (WIDTH: no such bound)

    def __post_init__(self) -> None:
        super().__post_init__()
        check(2 <= self.bound_bits <= WIDTH, f"max-pool bound_bits {self.bound_bits} outside 2..{WIDTH}")


def relu_bound(src: Op, params: Params | None = None) -> int:
    """The bound (bits) on a value computed by ``src`` by construction: 30 - s for a ReLU that truncates
    by s (its output is in [0, 2^(30-s))), else the full ring."""
    p = params if params is not None else src.params
    return WIDTH - p.shift if isinstance(p, RescaleParams) and p.act == "relu" and p.shift > 0 else WIDTH


class MaxPool(Layer):
    kind = "maxpool"
    params = MaxPoolParams

    def out_shape(self, op: Op, in_shapes: list[tuple[int, ...]]) -> tuple[int, ...] | None:
        return pooled_shape(in_shapes[0], op.params.kernel, op.params.stride)

    def specs(self, op: Op, in_shapes: list[tuple[int, ...]], batch: int, circ: Circuit) -> list[MatSpec]:
        n = batch * math.prod(op.shape)
        return tournament_specs(op.params.kernel ** (len(op.shape) - 1), n, circ, op.params.bound_bits)

    def online(self, rt: Runtime, i: int, op: Op, ins: list[np.ndarray], mat: OpMaterial) -> Proto:
        cands = [np.ascontiguousarray(w) for w in windows(ins[0], op.params.kernel, op.params.stride)]
        return P.tournament_max(rt.party, cands, mat.mats, rt.circuit, op.params.bound_bits)

    def calibrate(self, op: Op, i: int, cal: Calibration, ops: tuple[Op, ...]) -> Params:
        """``bound_bits`` from the input op as calibration sets it (a truncating ReLU's shift)."""
        src = ops[op.inputs[0]]
        return replace(op.params, bound_bits=relu_bound(src, src.layer.calibrate(src, op.inputs[0], cal, ops)))

    def validate_inputs(self, op: Op, srcs: list[Op]) -> None:
        if op.params.bound_bits < relu_bound(srcs[0]):
            raise UsageError(f"max-pool {op.name!r}: bound_bits {op.params.bound_bits} is below what its input "
                             f"({srcs[0].kind}) guarantees ({relu_bound(srcs[0])})")

    def reference(self, op: Op, ins: list[np.ndarray], weights: Any = None) -> np.ndarray:
        return np.max(np.stack(windows(ins[0], op.params.kernel, op.params.stride)), axis=0)

    def forward(self, op: Op, ins: list[torch.Tensor], weights: Any = None) -> torch.Tensor:
        import torch

        return torch.stack(windows(ins[0], op.params.kernel, op.params.stride)).amax(0)
