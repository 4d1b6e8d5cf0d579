"""SecConv / SecTrConv: every bilinear layer (conv, transposed conv) through one Beaver path.

Material: A (random, input shape), C = f(A, B) (derived; B = the model's fixed mask).
Offline each server precomputes F_i = C_i + f(A_i, E) + bias_i (one ring conv) and keeps only F_i.
Online: open D = X - A (1 round, 4 B per input element), Z_i = F_i + f(D, B_i + i*E).
The output is at scale f + fw; a ``rescale`` op brings it back to f.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import protocols as P
from ..circuit import Circuit
from ..linalg import conv2d, conv3d, conv_out_shape, conv_transpose2d, conv_transpose3d
from ..preprocessing import Material, MatSpec, beaver_spec
from ..ring import signed
from .base import Calibration, DealContext, Layer, OpMaterial, Params, Runtime, check

if TYPE_CHECKING:
    import torch

    from ..plan import Op
    from ..protocols import Proto


@dataclass(frozen=True)
class LinearParams(Params):
    """Kernel geometry (2 or 3 spatial dims; one stride/padding/dilation for every axis) and the weight
    scale ``fw`` chosen by calibration."""

    kernel: tuple[int, ...]
    stride: int = 1
    padding: int = 0
    dilation: int = 1
    output_padding: int = 0  # transposed conv only
    fw: int = 0

    def __post_init__(self) -> None:
        check(len(self.kernel) in (2, 3) and all(1 <= k <= 64 for k in self.kernel),
              f"kernel {self.kernel} must be 2 or 3 sizes in 1..64")
        check(1 <= self.stride <= 64 and 0 <= self.padding <= 64 and 1 <= self.dilation <= 64,
              f"stride {self.stride} / padding {self.padding} / dilation {self.dilation} out of range")
        check(0 <= self.output_padding < self.stride or self.output_padding == 0, "output_padding must be < stride")
        check(0 <= self.fw <= 20, f"weight bits fw={self.fw} outside 0..20")


@dataclass(frozen=True)
class ModelShare:
    """Per weighted op, what a server keeps of the model: E (public), B_i + i*E, its bias share."""

    e: np.ndarray
    w_online: np.ndarray
    bias: np.ndarray | None


class Linear(Layer):
    """``conv`` (exact ring conv2d / conv3d) or ``convt`` (exact ring conv_transpose2d / 3d)."""
    scale_mode = "derived"

    params = LinearParams
    activation = False
    weighted = True
    offline_items = ("C",)

    def __init__(self, kind: str, transposed: bool) -> None:
        self.kind = kind  # type: ignore[misc]
        self.transposed = transposed

    def apply(self, op: Op, x: np.ndarray, w: np.ndarray) -> np.ndarray:
        """The op's exact ring bilinear function f(x, w): the one path dealer and servers share."""
        p: LinearParams = op.params
        if len(p.kernel) == 3:
            if self.transposed:
                return conv_transpose3d(x, w, p.stride, p.padding, p.output_padding, p.dilation)
            return conv3d(x, w, p.stride, p.padding, p.dilation)
        if self.transposed:
            return conv_transpose2d(x, w, p.stride, p.padding, p.output_padding, p.dilation)
        return conv2d(x, w, p.stride, p.padding, p.dilation)

    def weight_shape(self, op: Op, cin: int) -> tuple[int, ...]:
        k = tuple(op.params.kernel)
        return (cin, op.shape[0], *k) if self.transposed else (op.shape[0], cin, *k)

    def out_shape(self, op: Op, in_shapes: list[tuple[int, ...]]) -> tuple[int, ...] | None:
        (src,) = in_shapes
        p: LinearParams = op.params
        if len(src) != 1 + len(p.kernel):
            return None
        sp = conv_out_shape(src[1:], tuple(p.kernel), p.stride, p.padding, p.dilation, self.transposed,
                            p.output_padding)
        return (op.shape[0], *sp)

    def specs(self, op: Op, in_shapes: list[tuple[int, ...]], batch: int, circ: Circuit) -> list[MatSpec]:
        return [beaver_spec((batch, *in_shapes[0]), (batch, *op.shape))]

    def derive(self, op: Op, i: int, ms: MatSpec, rand: dict[str, np.ndarray], ctx: DealContext
               ) -> dict[str, np.ndarray]:
        return {"C": self.apply(op, rand["A"], ctx.masks[i])}

    def precompute(self, rt: Runtime, i: int, op: Op, mats: list[Material]) -> list[np.ndarray]:
        """F_i = C_i + f(A_i, E) (+ bias_i): everything that does not depend on the image."""
        (mat,) = mats
        st: ModelShare = rt.model[i]
        f = self.apply(op, mat["A"], st.e)
        f += mat["C"]
        if st.bias is not None:
            f += st.bias.reshape(1, -1, *([1] * (f.ndim - 2)))
        return [f]

    def online(self, rt: Runtime, i: int, op: Op, ins: list[np.ndarray], mat: OpMaterial) -> Proto:
        from ..errors import ProtocolError

        if len(mat.stored) != 1:
            raise ProtocolError(f"no precomputed F for linear op {i}")
        return P.linear(ins[0], mat.mats[0], mat.stored[0], rt.model[i].w_online, lambda d, w: self.apply(op, d, w))

    def reference(self, op: Op, ins: list[np.ndarray], weights: Any = None) -> np.ndarray:
        import torch

        wt, b = weights
        r = self._torch(op, torch.as_tensor(ins[0].astype(np.float64)), torch.as_tensor(signed(wt).astype(np.float64)),
                        None)
        v = np.rint(r.numpy()).astype(np.int64)
        if b is not None:
            v = v + signed(b).reshape(1, -1, *([1] * (v.ndim - 2)))
        return v

    def forward(self, op: Op, ins: list[torch.Tensor], weights: Any) -> torch.Tensor:
        import torch

        wt, b = weights
        return self._torch(op, ins[0], torch.as_tensor(wt), torch.as_tensor(b) if b is not None else None)

    def _torch(self, op: Op, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        import torch.nn.functional as F

        p: LinearParams = op.params
        three = len(p.kernel) == 3
        if self.transposed:
            return (F.conv_transpose3d if three else F.conv_transpose2d)(x, w, b, p.stride, p.padding,
                                                                          p.output_padding, 1, p.dilation)
        return (F.conv3d if three else F.conv2d)(x, w, b, p.stride, p.padding, p.dilation)

    def calibrate(self, op: Op, i: int, cal: Calibration, ops: tuple[Op, ...]) -> Params:
        from dataclasses import replace

        return replace(op.params, fw=int(cal.fw[i]))
