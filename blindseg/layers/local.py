"""Local layers: computed on shares without communication or material.

``input`` (the image share), ``output`` (logits to the data owner), ``concat`` (channels),
``add``, ``avgsum`` (window sum; the following ``rescale`` divides), ``upsample`` (nearest,
integer factor: every spatial axis repeated).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .base import LocalLayer, NoParams, Params, check, pooled_shape, windows
from .pool import PoolParams

if TYPE_CHECKING:
    import torch

    from ..plan import Op


class Input(LocalLayer):
    """The job's input share (the runtime passes it as the op's only input)."""
    scale_mode = "source"

    kind = "input"
    arity = (0, 0)

    def local(self, party: int, op: Op, ins: list[np.ndarray]) -> np.ndarray:
        return ins[0]

    def reference(self, op: Op, ins: list[np.ndarray], weights: Any = None) -> np.ndarray:
        from ..ring import signed

        return signed(ins[0])

    def forward(self, op: Op, ins: list[torch.Tensor], weights: Any = None) -> torch.Tensor:
        return ins[0]


class Output(LocalLayer):
    """Logits at scale f, sent to the data owner (only if the plan's output is ``logits``)."""

    kind = "output"
    terminal = True

    def local(self, party: int, op: Op, ins: list[np.ndarray]) -> np.ndarray:
        return ins[0]

    def forward(self, op: Op, ins: list[torch.Tensor], weights: Any = None) -> torch.Tensor:
        return ins[0]


class Concat(LocalLayer):
    kind = "concat"
    arity = (1, 1024)

    def out_shape(self, op: Op, in_shapes: list[tuple[int, ...]]) -> tuple[int, ...] | None:
        if len({s[1:] for s in in_shapes}) != 1:
            return None
        return (sum(s[0] for s in in_shapes), *in_shapes[0][1:])

    def local(self, party: int, op: Op, ins: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(ins, axis=1)

    def forward(self, op: Op, ins: list[torch.Tensor], weights: Any = None) -> torch.Tensor:
        import torch

        return torch.cat(ins, 1)


class Add(LocalLayer):
    kind = "add"
    arity = (2, 2)

    def out_shape(self, op: Op, in_shapes: list[tuple[int, ...]]) -> tuple[int, ...] | None:
        return in_shapes[0] if len(in_shapes) == 2 and in_shapes[0] == in_shapes[1] else None

    def local(self, party: int, op: Op, ins: list[np.ndarray]) -> np.ndarray:
        return ins[0] + ins[1]

    def forward(self, op: Op, ins: list[torch.Tensor], weights: Any = None) -> torch.Tensor:
        return ins[0] + ins[1]


class AvgSum(LocalLayer):
    """k^d window sums; a following ``rescale`` (rule ``window`` or a power-of-two shift) divides."""
    scale_mode = "derived"

    kind = "avgsum"
    params = PoolParams
    activation = False

    def out_shape(self, op: Op, in_shapes: list[tuple[int, ...]]) -> tuple[int, ...] | None:
        return pooled_shape(in_shapes[0], op.params.kernel, op.params.stride)

    def local(self, party: int, op: Op, ins: list[np.ndarray]) -> np.ndarray:
        ws = windows(ins[0], op.params.kernel, op.params.stride)
        out = ws[0].copy()
        for w in ws[1:]:
            out += w
        return out

    def forward(self, op: Op, ins: list[torch.Tensor], weights: Any = None) -> torch.Tensor:
        import torch

        return torch.stack(windows(ins[0], op.params.kernel, op.params.stride)).sum(0)


@dataclass(frozen=True)
class UpsampleParams(Params):
    scale: int

    def __post_init__(self) -> None:
        check(1 <= self.scale <= 16, f"upsample scale {self.scale} must be an integer in 1..16")


class Upsample(LocalLayer):
    """Nearest-neighbour upsampling by an integer factor (``nn.Upsample(scale_factor=s)``)."""

    kind = "upsample"
    params = UpsampleParams

    def out_shape(self, op: Op, in_shapes: list[tuple[int, ...]]) -> tuple[int, ...] | None:
        return (in_shapes[0][0], *(s * op.params.scale for s in in_shapes[0][1:]))

    def local(self, party: int, op: Op, ins: list[np.ndarray]) -> np.ndarray:
        x = ins[0]
        for ax in range(2, x.ndim):
            x = np.repeat(x, op.params.scale, axis=ax)
        return x

    def forward(self, op: Op, ins: list[torch.Tensor], weights: Any = None) -> torch.Tensor:
        x = ins[0]
        for ax in range(2, x.ndim):
            x = x.repeat_interleave(op.params.scale, dim=ax)
        return x


@dataclass(frozen=True)
class InterpParams(Params):
    scale: int

    def __post_init__(self) -> None:
        check(self.scale in (2, 4, 8), f"linear upsampling scale {self.scale} must be 2, 4 or 8")


class Interp(LocalLayer):
    """(Bi/tri)linear upsampling by 2, 4 or 8 with ``align_corners=False``: every output is a public,
    dyadic combination of neighbours (multiples of 1 / (2 * scale) per axis), so it is exact on shares
    as integer weights -- the output carries ``g = d * log2(2 * scale)`` extra fraction bits, removed
    by the following ``rescale`` (one truncation, 1 round). Weights are PyTorch's own (its
    interpolation applied to unit vectors), so the float forward is ``F.interpolate`` exactly."""
    scale_mode = "derived"

    kind = "interp"
    params = InterpParams
    activation = False

    def out_shape(self, op: Op, in_shapes: list[tuple[int, ...]]) -> tuple[int, ...] | None:
        return (in_shapes[0][0], *(s * op.params.scale for s in in_shapes[0][1:]))

    def scale_bits(self, op: Op) -> int:
        return (len(op.shape) - 1) * int(np.log2(2 * op.params.scale))

    def local(self, party: int, op: Op, ins: list[np.ndarray]) -> np.ndarray:
        x = ins[0].astype(np.uint64)  # wraps mod 2^64, hence exactly mod 2^32 once cast back
        for ax in range(2, x.ndim):
            x = np.moveaxis(np.tensordot(x, _interp_matrix(x.shape[ax], op.params.scale).astype(np.uint64),
                                         axes=([ax], [1])), -1, ax)
        return x.astype(np.uint32)

    def reference(self, op: Op, ins: list[np.ndarray], weights: Any = None) -> np.ndarray:
        x = ins[0].astype(np.int64)
        for ax in range(2, x.ndim):
            x = np.moveaxis(np.tensordot(x, _interp_matrix(x.shape[ax], op.params.scale), axes=([ax], [1])), -1, ax)
        return x

    def forward(self, op: Op, ins: list[torch.Tensor], weights: Any = None) -> torch.Tensor:
        import torch.nn.functional as F

        mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[ins[0].ndim - 2]
        return F.interpolate(ins[0], scale_factor=op.params.scale, mode=mode, align_corners=False)


def _interp_matrix(n: int, scale: int) -> np.ndarray:
    """Integer weights (out x in) of 1-D linear upsampling, at log2(2 * scale) fraction bits."""
    import torch
    import torch.nn.functional as F

    basis = torch.eye(n, dtype=torch.float64)[:, None, :]  # n unit signals of length n
    w = F.interpolate(basis, scale_factor=scale, mode="linear", align_corners=False)[:, 0, :].T.numpy()
    q = w * (2 * scale)
    iq = np.rint(q).astype(np.int64)
    if not np.array_equal(q, iq):
        raise AssertionError("linear upsampling weights are not dyadic")  # cannot happen for these scales
    return iq


__all__ = ["Add", "AvgSum", "Concat", "Input", "Interp", "InterpParams", "NoParams", "Output", "Upsample",
           "UpsampleParams"]
