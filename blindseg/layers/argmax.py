"""Secure argmax readout: the label per voxel over channels.

Values are lifted to x * 2^bits + (K - 1 - k) (so ties go to the lowest class, as torch.argmax),
then a tournament of max over the K channels (ceil(log2 K) comparison depths, in pairs: see
:func:`~blindseg.protocols.tournament_max`); only the low ``bits`` of the maximum leave a server (one
byte per voxel, two above 256 classes), and the data owner maps them back.

Resolution (``compare``, set by calibration): the comparisons read the lifted differences from bit
``compare`` up, i.e. the logits at the resolution of the activations the head conv reads (2^-s for
activations at scale s; the conv's fw bits below that are rounding noise of those activations already).
Ties are exact (a tie compares the class indices, which always read as >= 0) and a class that leads
every other by one such LSB always wins; otherwise the label's logit is within one LSB below the
maximum per tournament depth (one for two classes). The comparison is then 30 - compare bits
wide, one AND level from compare >= 12: 3 rounds for two classes instead of 4.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import protocols as P
from ..circuit import Circuit
from ..errors import UsageError
from ..preprocessing import MatSpec, tournament_specs
from .base import Calibration, Layer, OpMaterial, Params, Runtime, check

if TYPE_CHECKING:
    import torch

    from ..plan import Op
    from ..protocols import Proto


MAX_CLASSES = 1 << 16  # labels leave a server as uint8 (up to 256 classes) or uint16
MAX_COMPARE = 24


@dataclass(frozen=True)
class ArgmaxParams(Params):
    classes: int
    bits: int
    zero_first: bool = False  # a one-channel sigmoid head: class 0 is a constant zero logit (mask = logit > 0)
    compare: int = 0  # the comparisons' low bit of the lifted values (0: exact; module docstring)

    def __post_init__(self) -> None:
        check(2 <= self.classes <= MAX_CLASSES, f"argmax over {self.classes} classes (2..{MAX_CLASSES} supported)")
        check(self.bits == (self.classes - 1).bit_length(),
              f"argmax over {self.classes} classes needs {(self.classes - 1).bit_length()} label bits, got {self.bits}")
        check(0 <= self.compare <= MAX_COMPARE, f"argmax compare bit {self.compare} outside 0..{MAX_COMPARE}")


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
        return tournament_specs(op.params.classes, n, circ, compare=op.params.compare)

    def online(self, rt: Runtime, i: int, op: Op, ins: list[np.ndarray], mat: OpMaterial) -> Proto:
        p: ArgmaxParams = op.params
        return P.argmax(rt.party, p.classes, p.bits, _with_zero(op, ins[0]), mat.mats, rt.circuit, p.compare)

    def calibrate(self, op: Op, i: int, cal: Calibration, ops: tuple[Op, ...]) -> Params:
        """``compare`` = the coarsest its input allows (:func:`_coarsest`), with the fw calibration chose."""
        j = op.inputs[0]
        return replace(op.params, compare=_coarsest(op.params, ops[j], cal.fw.get(j, 0)))

    def validate_inputs(self, op: Op, srcs: list[Op]) -> None:
        src = srcs[0]
        most = _coarsest(op.params, src, int(src.params.fw) if src.layer.weighted else 0)
        if op.params.compare > most:
            raise UsageError(f"argmax {op.name!r}: compare bit {op.params.compare} is coarser than its input "
                             f"({src.kind}) allows ({most}): labels could differ from the argmax by more than an LSB")

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


def _coarsest(p: ArgmaxParams, src: Op, fw: int) -> int:
    """The highest compare bit the input allows: the label bits, plus the weight bits ``fw`` a weighted
    input op (the head conv) carries below the resolution of the activations it reads."""
    return p.bits + (fw if src.layer.weighted else 0)


def _with_zero(op: Op, x: np.ndarray) -> np.ndarray:
    """Prepend the constant zero logit (both servers' shares of 0 are 0: no material, no rounds)."""
    if not op.params.zero_first:
        return x
    return np.concatenate([np.zeros_like(x[:, :1]), x], axis=1)
