"""Secure argmax readout: the label per voxel over channels.

Values are lifted to x * 2^bits + (K - 1 - k) (so ties go to the lowest class, as torch.argmax),
then a tournament of max over the K channels (ceil(log2 K) comparison depths); only the low
``bits`` of the maximum leave a server (one byte per voxel, two above 256 classes), and the data owner maps them back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import protocols as P
from ..circuit import Circuit
from ..preprocessing import MatSpec, select_spec, tournament
from .base import Layer, OpMaterial, Params, Runtime, check

if TYPE_CHECKING:
    import torch

    from ..plan import Op
    from ..protocols import Proto


MAX_CLASSES = 1 << 16  # labels leave a server as uint8 (up to 256 classes) or uint16


@dataclass(frozen=True)
class ArgmaxParams(Params):
    classes: int
    bits: int
    zero_first: bool = False  # a one-channel sigmoid head: class 0 is a constant zero logit (mask = logit > 0)

    def __post_init__(self) -> None:
        check(2 <= self.classes <= MAX_CLASSES, f"argmax over {self.classes} classes (2..{MAX_CLASSES} supported)")
        check(self.bits == (self.classes - 1).bit_length(),
              f"argmax over {self.classes} classes needs {(self.classes - 1).bit_length()} label bits, got {self.bits}")


class Argmax(Layer):
    kind = "argmax"
    params = ArgmaxParams
    activation = False
    terminal = True

    def out_shape(self, op: Op, in_shapes: list[tuple[int, ...]]) -> tuple[int, ...] | None:
        src = in_shapes[0]
        return (1, *src[1:]) if src[0] == op.params.classes - int(op.params.zero_first) else None

    def specs(self, op: Op, in_shapes: list[tuple[int, ...]], batch: int, circ: Circuit) -> list[MatSpec]:
        n = batch * math.prod(op.shape)
        return [select_spec(p * n, 0, circ) for p in tournament(op.params.classes)]

    def online(self, rt: Runtime, i: int, op: Op, ins: list[np.ndarray], mat: OpMaterial) -> Proto:
        return P.argmax(rt.party, op.params.classes, op.params.bits, _with_zero(op, ins[0]), mat.mats, rt.circuit)

    def reference(self, op: Op, ins: list[np.ndarray], weights: Any = None) -> np.ndarray:
        return np.argmax(_with_zero(op, ins[0]), axis=1)

    def forward(self, op: Op, ins: list[torch.Tensor], weights: Any = None) -> torch.Tensor:
        import torch

        x = ins[0]
        if op.params.zero_first:
            x = torch.cat([torch.zeros_like(x[:, :1]), x], 1)
        return torch.argmax(x, 1)

    def input_headroom(self, op: Op) -> int:
        return int(op.params.bits)


def _with_zero(op: Op, x: np.ndarray) -> np.ndarray:
    """Prepend the constant zero logit (both servers' shares of 0 are 0: no material, no rounds)."""
    if not op.params.zero_first:
        return x
    return np.concatenate([np.zeros_like(x[:, :1]), x], axis=1)
