"""SecMaxPool: a k^d window max as a tournament of comparisons (2x2: 2 depths, 3 comparisons per
output, each a select with s = 0). Average pooling is a local window sum (``avgsum``) followed by a
``rescale`` that divides (see :mod:`.local`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import protocols as P
from ..circuit import Circuit
from ..preprocessing import MatSpec, select_spec, tournament
from .base import Layer, OpMaterial, Params, Runtime, check, pooled_shape, windows

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


class MaxPool(Layer):
    kind = "maxpool"
    params = PoolParams

    def out_shape(self, op: Op, in_shapes: list[tuple[int, ...]]) -> tuple[int, ...] | None:
        return pooled_shape(in_shapes[0], op.params.kernel, op.params.stride)

    def specs(self, op: Op, in_shapes: list[tuple[int, ...]], batch: int, circ: Circuit) -> list[MatSpec]:
        n = batch * math.prod(op.shape)
        return [select_spec(p * n, 0, circ) for p in tournament(op.params.kernel ** (len(op.shape) - 1))]

    def online(self, rt: Runtime, i: int, op: Op, ins: list[np.ndarray], mat: OpMaterial) -> Proto:
        cands = [np.ascontiguousarray(w) for w in windows(ins[0], op.params.kernel, op.params.stride)]
        return P.tournament_max(rt.party, cands, mat.mats, rt.circuit)

    def reference(self, op: Op, ins: list[np.ndarray], weights: Any = None) -> np.ndarray:
        return np.max(np.stack(windows(ins[0], op.params.kernel, op.params.stride)), axis=0)

    def forward(self, op: Op, ins: list[torch.Tensor], weights: Any = None) -> torch.Tensor:
        import torch

        return torch.stack(windows(ins[0], op.params.kernel, op.params.stride)).amax(0)
