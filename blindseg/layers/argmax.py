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
        return (1, *src[1:]) if src[0] == op.params.classes else None

    def specs(self, op: Op, in_shapes: list[tuple[int, ...]], batch: int, circ: Circuit) -> list[MatSpec]:
        n = batch * math.prod(op.shape)
        return [select_spec(p * n, 0, circ) for p in tournament(op.params.classes)]

    def online(self, rt: Runtime, i: int, op: Op, ins: list[np.ndarray], mat: OpMaterial) -> Proto:
        return P.argmax(rt.party, op.params.classes, op.params.bits, ins[0], mat.mats, rt.circuit)

    def reference(self, op: Op, ins: list[np.ndarray], weights: Any = None) -> np.ndarray:
        return np.argmax(ins[0], axis=1)

    def forward(self, op: Op, ins: list[torch.Tensor], weights: Any = None) -> torch.Tensor:
        import torch

        return torch.argmax(ins[0], 1)

    def input_headroom(self, op: Op) -> int:
        return int(op.params.bits)
