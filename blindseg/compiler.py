"""Compile a ``torch.nn.Module`` into a calibrated plan (model owner side).

Traces with torch.fx, folds BatchNorm into the preceding conv, drops Identity/Dropout, fuses
conv -> activation into one rescale, and refuses anything else naming the module and op. Each
supported torch layer is one lowering row in :data:`_MODULES` / :data:`_FUNCTIONS`; what the
resulting op kinds do lives in :mod:`blindseg.layers`.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import UnsupportedLayerError, UsageError
from .layers import (
    ArgmaxParams,
    InterpParams,
    LinearParams,
    MaxPoolParams,
    NormParams,
    PoolParams,
    RescaleParams,
    SigmoidParams,
    UpsampleParams,
    layer_of,
)
from .layers.rescale import MAX_SLOPE
from .linalg import conv_out_shape
from .plan import DEFAULT_ARITIES, Compiled, Op, Plan, apply_head, calibrate, downsampling, iter_forward

SUPPORTED = ("Conv2d/3d (padding numeric, 'same' or 'valid'), ConvTranspose2d/3d, BatchNorm2d/3d, InstanceNorm2d/3d, "
             "GroupNorm, ReLU, LeakyReLU, PReLU "
             "(slopes in [-8, 8], one or per channel), Dropout/Identity (removed), MaxPool2d/3d, AvgPool2d/3d, Upsample / F.interpolate (nearest, "
             "integer scale; bilinear by 2/4/8, align_corners=False), torch.cat (channels), add, Sigmoid / Softmax as the final op, argmax")


@dataclass
class _Val:
    """A traced value: plan index; whether it is a linear output awaiting rescale; whether argmaxed."""

    idx: int
    pending: bool = False  # linear output at scale f + fw, not yet rescaled
    argmaxed: bool = False
    head: str | None = None  # the value is the model's output before this monotone head (sigmoid / softmax)


def _tuple(v: Any, n: int = 2) -> tuple[int, ...]:
    return tuple(int(a) for a in v) if isinstance(v, (tuple, list)) else (int(v),) * n


def _pair(v: Any) -> tuple[int, ...]:
    return _tuple(v, 2)


def _square(v: Any, what: str, name: str) -> int:
    a = _tuple(v, 2)
    if len(set(a)) != 1:
        raise UnsupportedLayerError(f"{name}: {what} {v} differs between axes, which is not supported")
    return a[0]


class _Lowering:
    """State of one compilation: the ops so far, float weights, traced values."""

    def __init__(self, gm: Any, input_shape: tuple[int, ...]) -> None:
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.ops: list[Op] = []
        self.weights: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}
        self.vals: dict[str, _Val] = {}
        self.input_shape = input_shape
        self.head: str | None = None
        self.sigmoids: dict[int, int] = {}  # value index -> its secure sigmoid op

    def param(self, node: Any) -> Any:
        """A parameter the graph reads with get_attr (e.g. F.prelu's weight)."""
        if getattr(node, "op", None) != "get_attr":
            raise UnsupportedLayerError(f"expected a model parameter, got {node!r}")
        obj = self.gm
        for part in str(node.target).split("."):
            obj = getattr(obj, part)
        return obj

    def add(self, kind: str, inputs: tuple[int, ...], shape: tuple[int, ...], name: str, params: Any = None) -> int:
        self.ops.append(Op(kind, inputs, tuple(shape), params, name))
        return len(self.ops) - 1

    def shape(self, idx: int) -> tuple[int, ...]:
        return self.ops[idx].shape

    def settle(self, v: _Val, act: str = "none", slope: float = 0.0, slopes: tuple[float, ...] = ()) -> int:
        """Rescale a pending linear output back to scale f (fusing an activation if asked)."""
        if v.pending:
            return self.add("rescale", (v.idx,), self.shape(v.idx), self.ops[v.idx].name + ".rescale",
                            RescaleParams(act=act, rule="linear", slope=slope, slopes=slopes))
        if act != "none":
            return self.add("rescale", (v.idx,), self.shape(v.idx), act,
                            RescaleParams(act=act, slope=slope, slopes=slopes))
        return v.idx

    def arg(self, node: Any, keep_head: bool = False) -> _Val:
        """The traced value of a graph node; a sigmoid that something else reads becomes a secure one."""
        import torch.fx as fx

        if not isinstance(node, fx.Node) or node.name not in self.vals:
            raise UnsupportedLayerError(f"unsupported argument {node!r} (only tensors from the graph are allowed)")
        v = self.vals[node.name]
        return v if keep_head or v.head is None else self.inner_head(v, node)

    def inner_head(self, v: _Val, node: Any) -> _Val:
        """A sigmoid inside the network (an attention gate): the secure piecewise-linear sigmoid."""
        if v.head != "sigmoid":
            raise UnsupportedLayerError(f"{_desc(node)}: a softmax is supported only as the model's final op "
                                        "(inside the network it would need a secure exp)")
        if v.idx not in self.sigmoids:
            src = self.settle(_Val(v.idx, pending=v.pending))
            self.sigmoids[v.idx] = self.add("sigmoid", (src,), self.shape(src), f"{node.name}.sigmoid",
                                            SigmoidParams())
        self.head = None
        return _Val(self.sigmoids[v.idx])


def _name(node: Any) -> str:
    """How the user wrote the op: the module path, or ``F.interpolate`` / ``torch.cat`` / ``Tensor.view``."""
    if node.op == "call_module":
        return str(node.target)
    t = node.target
    if isinstance(t, str):
        return f"Tensor.{t}"
    if type(t).__name__ == "OpOverload":  # an ATen op from torch.export
        return str(t)
    mod = getattr(t, "__module__", None) or ""
    short = {"torch.nn.functional": "F", "torch": "torch", "_operator": "operator", "operator": "operator"}.get(
        mod, mod.split(".")[0] or "?")
    return f"{short}.{getattr(t, '__name__', type(t).__name__)}"


def _desc(node: Any) -> str:
    return f"at '{node.target}'" if node.op == "call_module" else f"{_name(node)} at '{node.name}'"


def _spatial(L: _Lowering, idx: int, what: str, dims: int) -> tuple[int, ...]:
    shp = L.shape(idx)
    if len(shp) != 1 + dims:
        raise UnsupportedLayerError(f"{what}: a {dims}D layer on a value with {len(shp) - 1} spatial dimensions")
    return shp


def _conv(L: _Lowering, node: Any, mod: Any, x: _Val | None) -> _Val:
    import torch.nn as nn

    transposed = isinstance(mod, (nn.ConvTranspose2d, nn.ConvTranspose3d))
    dims = 3 if isinstance(mod, (nn.Conv3d, nn.ConvTranspose3d)) else 2
    what = f"{type(mod).__name__} {_desc(node)}"
    if mod.groups != 1 or mod.padding_mode != "zeros":
        raise UnsupportedLayerError(f"{what}: only groups=1 and zero padding are supported "
                                    f"(got groups={mod.groups}, padding_mode={mod.padding_mode!r})")
    src = L.settle(x)  # type: ignore[arg-type]
    cin, *sp = _spatial(L, src, what, dims)
    k = _tuple(mod.kernel_size, dims)
    padding = mod.padding
    if padding == "same":  # stride 1 (torch insists); symmetric only for odd kernels
        dil = _tuple(mod.dilation, dims)
        if any((dil[a] * (k[a] - 1)) % 2 for a in range(dims)):
            raise UnsupportedLayerError(f"{what}: padding='same' with an even kernel pads asymmetrically; "
                                        "pad explicitly instead")
        padding = tuple(dil[a] * (k[a] - 1) // 2 for a in range(dims))
    elif padding == "valid":
        padding = 0
    geom = {g: _square(padding if g == "padding" else getattr(mod, g), g, what)
            for g in ("stride", "padding", *(("output_padding",) if transposed else ()), "dilation")}
    if cin != mod.in_channels:
        raise UsageError(f"{what} expects {mod.in_channels} input channels, the input has {cin}")
    out_sp = conv_out_shape(tuple(sp), k, geom["stride"], geom["padding"], geom["dilation"], transposed,
                            geom.get("output_padding", 0))
    idx = L.add("convt" if transposed else "conv", (src,), (mod.out_channels, *out_sp), _name(node),
                LinearParams(kernel=k, **geom))
    wt = mod.weight.detach().double().numpy().copy()
    bias = mod.bias.detach().double().numpy().copy() if mod.bias is not None else None
    L.weights[idx] = (wt, bias)
    return _Val(idx, pending=True)


def _batchnorm(L: _Lowering, node: Any, mod: Any, x: _Val | None) -> _Val:
    """Folded into the conv / transposed conv before it when that is its only user; otherwise a
    per-channel affine, lowered as a 1x1 conv with a diagonal weight (the BN parameters stay secret)."""
    if mod.running_mean is None or mod.running_var is None:
        raise UnsupportedLayerError(f"{type(mod).__name__} {_desc(node)}: BatchNorm without running statistics")
    x = _need(x, node)
    gamma = mod.weight.detach().double().numpy() if mod.affine else np.ones(mod.num_features)
    beta = mod.bias.detach().double().numpy() if mod.affine else np.zeros(mod.num_features)
    scale = gamma / np.sqrt(mod.running_var.double().numpy() + mod.eps)
    shift = beta - mod.running_mean.double().numpy() * scale
    prev = node.args[0]
    if x.pending and len(prev.users) == 1 and L.ops[x.idx].kind in ("conv", "convt"):
        wt, bias = L.weights[x.idx]
        b0 = bias if bias is not None else np.zeros(scale.size)
        axis = 1 if L.ops[x.idx].kind == "convt" else 0  # ConvTranspose weights are (C_in, C_out, kh, kw)
        shape = [1] * wt.ndim
        shape[axis] = -1
        L.weights[x.idx] = (wt * scale.reshape(shape), b0 * scale + shift)
        return x
    src = L.settle(x)
    if len(L.shape(src)) - 1 not in (2, 3):
        raise UnsupportedLayerError(f"{_desc(node)}: BatchNorm on {len(L.shape(src)) - 1} spatial dimensions")
    return _channel_affine(L, src, _name(node), scale, shift)


def _channel_affine(L: _Lowering, src: int, name: str, scale: np.ndarray, shift: np.ndarray) -> _Val:
    """x * scale[c] + shift[c] with secret parameters: a 1x1 conv with a diagonal weight."""
    c, *sp = L.shape(src)
    idx = L.add("conv", (src,), L.shape(src), name, LinearParams(kernel=(1,) * len(sp)))
    L.weights[idx] = (np.diag(scale).reshape(c, c, *(1,) * len(sp)).copy(), shift)
    return _Val(idx, pending=True)


def _need(x: _Val | None, node: Any) -> _Val:
    if x is None:
        raise UnsupportedLayerError(f"{_desc(node)}: needs a tensor input")
    return x


def _relu(L: _Lowering, node: Any, mod: Any, x: _Val | None) -> _Val:
    return _Val(L.settle(_need(x, node), "relu"))


def _leaky(L: _Lowering, node: Any, mod: Any, x: _Val | None) -> _Val:
    slope = mod.negative_slope if mod is not None else (
        node.args[1] if len(node.args) > 1 else node.kwargs.get("negative_slope", 0.01))
    if not isinstance(slope, int | float) or not 0.0 < float(slope) < 1.0:
        raise UnsupportedLayerError(f"{_desc(node)}: LeakyReLU slope {slope!r} must be a number in (0, 1)")
    return _Val(L.settle(_need(x, node), "leaky", float(slope)))


def _prelu(L: _Lowering, node: Any, mod: Any, x: _Val | None) -> _Val:
    """PReLU, one slope or one per channel: the slopes are public, as LeakyReLU's."""
    w = (mod.weight if mod is not None else L.param(node.args[1])).detach().double().numpy().ravel()
    if np.any(np.abs(w) > MAX_SLOPE):
        raise UnsupportedLayerError(f"PReLU {_desc(node)}: slope {float(np.max(np.abs(w))):.4g} outside "
                                    f"[-{MAX_SLOPE:g}, {MAX_SLOPE:g}] is not supported")
    x = _need(x, node)
    if w.size > 1 and not np.all(w == w[0]):
        c = L.shape(x.idx)[0]
        if w.size != c:
            raise UsageError(f"PReLU {_desc(node)} has {w.size} slopes for {c} channels")
        return _Val(L.settle(x, "leaky", slopes=tuple(float(v) for v in w)))
    slope = float(w[0])
    if slope == 0.0:
        return _Val(L.settle(x, "relu"))
    return _Val(L.settle(x, "leaky", slope))


def _head(L: _Lowering, node: Any, mod: Any, x: _Val | None) -> _Val:
    """Sigmoid / Softmax as the model's last op: both are monotone, so the mask is the argmax of the
    logits (a one-channel sigmoid: logit > 0, as a second, zero logit); for logits output the data owner
    applies the head to the reconstructed logits in plaintext (``meta["head"]``)."""
    v = _need(x, node)
    kind = "softmax" if "softmax" in _name(node).lower() else "sigmoid"
    if kind == "softmax":
        dim = mod.dim if mod is not None else (node.args[1] if len(node.args) > 1 else node.kwargs.get("dim"))
        if dim not in (1, -len(L.shape(v.idx))):
            raise UnsupportedLayerError(f"Softmax {_desc(node)}: only over channels (dim=1)")
    if L.head is not None or v.argmaxed:
        raise UnsupportedLayerError(f"{_desc(node)}: a {kind} is supported only as the model's final op")
    L.head = kind
    return _Val(v.idx, pending=v.pending, head=kind)


def _norm(L: _Lowering, node: Any, mod: Any, x: _Val | None) -> _Val:
    """InstanceNorm / GroupNorm: a secure ``norm`` op (per sample and group), then the affine, if any,
    as a secret per-channel 1x1 conv. An InstanceNorm with running statistics is a BatchNorm."""
    import torch.nn as nn

    x = _need(x, node)
    what = f"{type(mod).__name__} {_desc(node)}"
    if isinstance(mod, nn.GroupNorm):
        groups, c = int(mod.num_groups), int(mod.num_channels)
    else:
        if mod.track_running_stats and mod.running_mean is not None:
            return _batchnorm(L, node, mod, x)
        groups = c = int(mod.num_features)
    src = L.settle(x)
    shp = L.shape(src)
    if len(shp) < 3:
        raise UnsupportedLayerError(f"{what}: normalisation needs spatial dimensions, the input is {shp}")
    if shp[0] != c:
        raise UsageError(f"{what} expects {c} channels, the input has {shp[0]}")
    idx = L.add("norm", (src,), shp, _name(node), NormParams(groups=groups, eps=float(mod.eps)))
    if not mod.affine:
        return _Val(idx)
    return _channel_affine(L, idx, _name(node) + ".affine", mod.weight.detach().double().numpy(),
                           mod.bias.detach().double().numpy().copy())


def _norm_fn(L: _Lowering, node: Any, mod: Any, x: _Val | None) -> _Val:
    """F.group_norm / F.instance_norm (what tracing a bare norm module gives): as the module would be."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    x = _need(x, node)
    c = L.shape(x.idx)[0]

    def arg(i: int, key: str, default: Any) -> Any:
        return node.args[i] if len(node.args) > i else node.kwargs.get(key, default)

    def tensor(v: Any) -> Any:
        return None if v is None else L.param(v)

    if node.target is F.group_norm:
        w, b = tensor(arg(2, "weight", None)), tensor(arg(3, "bias", None))
        m: Any = nn.GroupNorm(int(arg(1, "num_groups", 1)), c, eps=float(arg(4, "eps", 1e-5)), affine=w is not None)
    else:
        if not arg(5, "use_input_stats", True):
            raise UnsupportedLayerError(f"{_desc(node)}: F.instance_norm with running statistics: use a "
                                        "BatchNorm (it is the same affine)")
        w, b = tensor(arg(3, "weight", None)), tensor(arg(4, "bias", None))
        m = (nn.InstanceNorm3d if len(L.shape(x.idx)) == 4 else nn.InstanceNorm2d)(
            c, eps=float(arg(7, "eps", 1e-5)), affine=w is not None)
    if w is not None:
        with torch.no_grad():
            m.weight.copy_(w)
            m.bias.copy_(b)
    return _norm(L, node, m, x)


def _refuse_norm(L: _Lowering, node: Any, mod: Any, x: _Val | None) -> _Val:
    raise UnsupportedLayerError(
        f"{type(mod).__name__} {_desc(node)}: normalisation over other axes than (channel group, spatial) is not "
        "supported (InstanceNorm2d/3d, GroupNorm and BatchNorm are)")


def _pad(L: _Lowering, node: Any, mod: Any, x: _Val | None) -> _Val:
    """F.pad / aten.pad by zero amounts (MONAI's BasicUNet pads only when sizes differ) is the identity;
    other padding is refused (a conv's own zero padding is supported)."""
    pads = node.args[1] if len(node.args) > 1 else node.kwargs.get("pad")
    if not isinstance(pads, (list, tuple)) or any(not isinstance(p, int) or p for p in pads):
        raise UnsupportedLayerError(f"{_desc(node)}: padding by {pads!r} is not supported (pad inside the conv, "
                                    "padding=..., instead)")
    return _need(x, node)


def _mul(L: _Lowering, node: Any, mod: Any, x: _Val | None) -> _Val:
    """x * g for two activations (AttentionUnet's x * sigmoid(psi)): a secure product; g has x's channels
    or one (broadcast). A product with a constant is refused (fold it into the conv before it)."""
    import torch.fx as fx

    if len(node.args) != 2 or not all(isinstance(a, fx.Node) for a in node.args):
        raise UnsupportedLayerError(f"{_desc(node)}: only the product of two tensors from the graph is supported "
                                    f"(got {[type(a).__name__ for a in node.args]}); fold a constant factor into the "
                                    "conv before it")
    a, b = (L.settle(L.arg(t)) for t in node.args)
    if L.shape(a)[0] == 1 and L.shape(b)[0] > 1:
        a, b = b, a
    sa, sb = L.shape(a), L.shape(b)
    if sa[1:] != sb[1:] or sb[0] not in (1, sa[0]):
        raise UnsupportedLayerError(f"{_desc(node)}: multiplied tensors of shapes {sa} and {sb}: only equal shapes, "
                                    "or one channel broadcast over the other's, are supported")
    return _Val(L.add("mul", (a, b), sa, _name(node)), pending=True)


def _identity(L: _Lowering, node: Any, mod: Any, x: _Val | None) -> _Val:
    return _need(x, node)


def _pool_params(node: Any, mod: Any) -> tuple[int, int]:
    """(kernel, stride) of a pooling module or functional call; padding is refused."""
    desc = _desc(node)
    if mod is not None:
        k, st, pd = mod.kernel_size, mod.stride, mod.padding
    else:
        k = node.args[1] if len(node.args) > 1 else node.kwargs["kernel_size"]
        st = node.args[2] if len(node.args) > 2 else node.kwargs.get("stride")
        pd = node.args[3] if len(node.args) > 3 else node.kwargs.get("padding", 0)
    if _square(pd, "padding", desc):
        raise UnsupportedLayerError(f"{desc}: padded pooling is not supported")
    return _square(k, "kernel", desc), _square(st if st else k, "stride", desc)


def _pooled(L: _Lowering, src: int, k: int, st: int) -> tuple[int, ...]:
    c, *sp = L.shape(src)
    return (c, *((s - k) // st + 1 for s in sp))


def _maxpool(L: _Lowering, node: Any, mod: Any, x: _Val | None) -> _Val:
    if mod is not None and (mod.dilation not in (1, (1, 1), (1, 1, 1)) or mod.ceil_mode or mod.return_indices):
        raise UnsupportedLayerError(f"{_desc(node)}: MaxPool2d dilation/ceil_mode/return_indices unsupported")
    k, st = _pool_params(node, mod)
    src = L.settle(_need(x, node))
    return _Val(L.add("maxpool", (src,), _pooled(L, src, k, st), _name(node), MaxPoolParams(k, st)))


def _avgpool(L: _Lowering, node: Any, mod: Any, x: _Val | None) -> _Val:
    if mod is not None and mod.ceil_mode:
        raise UnsupportedLayerError(f"{_desc(node)}: AvgPool2d ceil_mode unsupported")
    k, st = _pool_params(node, mod)
    src = L.settle(_need(x, node))
    shp = _pooled(L, src, k, st)
    s_idx = L.add("avgsum", (src,), shp, _name(node), PoolParams(k, st))
    n = k ** (len(shp) - 1)
    rp = (RescaleParams(shift=n.bit_length() - 1, divisor=n) if n & (n - 1) == 0
          else RescaleParams(rule="window", divisor=n))  # calibrate sets mul = round(2^f / n), shift f
    return _Val(L.add("rescale", (s_idx,), shp, _name(node) + ".rescale", rp))


def _upsample(L: _Lowering, node: Any, mod: Any, x: _Val | None) -> _Val:
    if mod is not None:
        mode, size, sf = mod.mode, mod.size, mod.scale_factor
        align = getattr(mod, "align_corners", None)
    else:
        mode = node.kwargs.get("mode", node.args[3] if len(node.args) > 3 else "nearest")
        size = node.kwargs.get("size", node.args[1] if len(node.args) > 1 else None)
        sf = node.kwargs.get("scale_factor", node.args[2] if len(node.args) > 2 else None)
        align = node.kwargs.get("align_corners")
    linear = mode in ("linear", "bilinear", "trilinear")
    if not (mode == "nearest" or linear) or size is not None or (align and linear):
        raise UnsupportedLayerError(
            f"{_desc(node)}: supported are nearest upsampling by an integer scale_factor and (bi/tri)linear by 2, 4 "
            f"or 8 with align_corners=False (got mode={mode!r}, size={size!r}, align_corners={align!r}; "
            "align_corners=True weights are not dyadic, so they are not exact in fixed point)")
    factors = set(sf) if isinstance(sf, (tuple, list)) else {sf}
    if len(factors) != 1 or not all(float(f).is_integer() and f >= 1 for f in factors):
        raise UnsupportedLayerError(f"{_desc(node)}: scale_factor {sf!r} must be one integer for every axis")
    s = int(next(iter(factors)))
    src = L.settle(_need(x, node))
    c, *sp = L.shape(src)
    shape = (c, *(d * s for d in sp))
    if not linear:
        return _Val(L.add("upsample", (src,), shape, _name(node), UpsampleParams(s)))
    if s not in (2, 4, 8):
        raise UnsupportedLayerError(f"{_desc(node)}: linear upsampling by {s}: only 2, 4 or 8 are supported")
    p = InterpParams(s)
    idx = L.add("interp", (src,), shape, _name(node), p)
    bits = layer_of("interp").scale_bits(L.ops[idx])  # the rescale removes them (rule linear: calibration)
    return _Val(L.add("rescale", (idx,), shape, _name(node) + ".rescale", RescaleParams(shift=bits, rule="linear")))


def _cat(L: _Lowering, node: Any, mod: Any, x: _Val | None) -> _Val:
    tensors = node.args[0]
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    srcs = tuple(L.settle(L.arg(t)) for t in tensors)
    shapes = [L.shape(s) for s in srcs]
    if dim not in (1, -len(shapes[0])):
        raise UnsupportedLayerError(f"{_desc(node)}: concatenation only along channels (dim=1)")
    if len({s[1:] for s in shapes}) != 1:
        depth = downsampling(L.ops)
        raise UsageError(f"{_desc(node)}: the skip connection joins tensors of spatial sizes "
                         f"{[s[1:] for s in shapes]}: the input size {L.input_shape[1:]} must be a multiple of "
                         f"{depth} for this model (its downsampling)")
    return _Val(L.add("concat", srcs, (sum(s[0] for s in shapes), *shapes[0][1:]), "cat"))


def _add(L: _Lowering, node: Any, mod: Any, x: _Val | None) -> _Val:
    import torch.fx as fx

    if len(node.args) != 2 or not all(isinstance(a, fx.Node) for a in node.args):
        raise UnsupportedLayerError(f"{_desc(node)}: only tensor + tensor is supported")
    a, b = L.settle(L.arg(node.args[0])), L.settle(L.arg(node.args[1]))
    if L.shape(a) != L.shape(b):
        raise UnsupportedLayerError(f"{_desc(node)}: added tensors differ in shape")
    return _Val(L.add("add", (a, b), L.shape(a), "add"))


def _argmax(L: _Lowering, node: Any, mod: Any, x: _Val | None) -> _Val:
    v = _need(x, node)
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if dim not in (1, -len(L.shape(v.idx))):
        raise UnsupportedLayerError(f"{_desc(node)}: argmax only over channels (dim=1)")
    return _Val(v.idx, pending=v.pending, argmaxed=True, head=v.head)


Lower = Callable[[_Lowering, Any, Any, "_Val | None"], _Val]


def _module_rows() -> dict[type, Lower]:
    import torch.nn as nn

    rows: dict[type, Lower] = {
        nn.Conv2d: _conv, nn.ConvTranspose2d: _conv, nn.BatchNorm2d: _batchnorm, nn.ReLU: _relu,
        nn.LeakyReLU: _leaky, nn.PReLU: _prelu, nn.Identity: _identity, nn.Dropout: _identity,
        nn.Dropout1d: _identity, nn.Dropout2d: _identity, nn.Dropout3d: _identity, nn.AlphaDropout: _identity,
        nn.MaxPool2d: _maxpool, nn.AvgPool2d: _avgpool, nn.Upsample: _upsample, nn.Sigmoid: _head,
        nn.Softmax: _head}
    rows.update({nn.Conv3d: _conv, nn.ConvTranspose3d: _conv, nn.BatchNorm3d: _batchnorm, nn.MaxPool3d: _maxpool,
                 nn.AvgPool3d: _avgpool})
    rows.update({nn.InstanceNorm2d: _norm, nn.InstanceNorm3d: _norm, nn.GroupNorm: _norm})
    for n in (nn.InstanceNorm1d, nn.LayerNorm, nn.LocalResponseNorm):
        rows[n] = _refuse_norm
    return rows


def _function_rows() -> dict[Any, Lower]:
    import torch
    import torch.nn.functional as F

    return {torch.relu: _relu, F.relu: _relu, "relu": _relu, F.leaky_relu: _leaky, F.dropout: _identity,
            "contiguous": _identity, F.max_pool2d: _maxpool, F.avg_pool2d: _avgpool, F.interpolate: _upsample,
            torch.cat: _cat, operator.add: _add, torch.add: _add, "add": _add, operator.iadd: _add,
            torch.argmax: _argmax, "argmax": _argmax, torch.sigmoid: _head, F.sigmoid: _head, "sigmoid": _head,
            torch.softmax: _head, F.softmax: _head, "softmax": _head, F.prelu: _prelu, operator.mul: _mul,
            torch.mul: _mul, "mul": _mul, F.pad: _pad,
            F.group_norm: _norm_fn, F.instance_norm: _norm_fn}


def compile_model(
    model: Any,
    input_shape: tuple[int, ...],
    output: str = "mask",
    frac_bits: int | str = "auto",
    samples: np.ndarray | None = None,
    meta: dict[str, Any] | None = None,
    arities: tuple[int, ...] = DEFAULT_ARITIES,
    verify: bool = True,
) -> Compiled:
    """Trace ``model`` (eval mode), lower it to a calibrated plan for inputs (C, *spatial) and verify
    that the plan computes the model's function (:func:`verify_compile`)."""
    import torch.fx as fx

    if output not in ("mask", "logits"):
        raise UsageError(f"output must be 'mask' or 'logits', got {output!r}")
    model = model.eval()
    try:
        try:
            gm = fx.symbolic_trace(model)
        except Exception as exc:  # torch raises many kinds here
            raise TraceMismatch(f"model cannot be traced by torch.fx: {exc}") from None
        return _compile(model, gm, input_shape, output, frac_bits, samples, meta, arities, verify)
    except TraceMismatch as exc:  # Python control flow on the input: torch.export traces it faithfully
        if samples is None or not verify:
            raise
        return _compile_via_export(model, exc, input_shape, output, frac_bits, samples, meta, arities)


class TraceMismatch(UnsupportedLayerError):
    """torch.fx could not trace the model, or traced another function than it computes."""


def _compile_via_export(model: Any, why: TraceMismatch, input_shape: tuple[int, ...], output: str,
                        frac_bits: int | str, samples: np.ndarray, meta: dict[str, Any] | None,
                        arities: tuple[int, ...]) -> Compiled:
    import torch

    from .exported import module_graph

    example = torch.as_tensor(np.asarray(samples, np.float32)[:1])
    try:
        ep = torch.export.export(model, (example,))
    except Exception as exc:  # torch raises many kinds here
        raise UnsupportedLayerError(f"{why}; torch.export could not export it either: "
                                    f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    _, gm = module_graph(ep)
    return _compile(model, gm, input_shape, output, frac_bits, samples, meta, arities, True)  # verified vs the module


def compile_exported(program: Any, input_shape: tuple[int, ...] | None = None, output: str = "mask",
                     frac_bits: int | str = "auto", samples: np.ndarray | None = None,
                     meta: dict[str, Any] | None = None, arities: tuple[int, ...] = DEFAULT_ARITIES) -> Compiled:
    """Compile a ``torch.export`` program (an ExportedProgram or a ``.pt2`` path), verified against the
    program itself. ``input_shape`` defaults to the exported input's (C, *spatial)."""
    from .exported import load_program, module_graph

    ep = load_program(program) if isinstance(program, (str, Path)) else program
    ref, gm = module_graph(ep)
    shapes = [n.meta["val"].shape for n in ep.graph.nodes if n.op == "placeholder" and n.meta.get("val") is not None
              and n.name not in ep.graph_signature.parameters and n.name not in ep.graph_signature.buffers]
    if input_shape is None:
        if not shapes:
            raise UsageError("the exported program does not record its input shape: give input_shape")
        input_shape = tuple(int(d) for d in shapes[-1][1:])
    return _compile(ref, gm, input_shape, output, frac_bits, samples, meta, arities, True)


def _compile(model: Any, gm: Any, input_shape: tuple[int, ...], output: str, frac_bits: int | str,
             samples: np.ndarray | None, meta: dict[str, Any] | None, arities: tuple[int, ...],
             verify: bool) -> Compiled:
    if output not in ("mask", "logits"):
        raise UsageError(f"output must be 'mask' or 'logits', got {output!r}")
    L = _Lowering(gm, tuple(int(s) for s in input_shape))
    try:
        final = _lower(L, gm, output)
    except UsageError as exc:  # a shape or channel mismatch may be fx having traced another path
        if (not isinstance(exc, UnsupportedLayerError) and samples is not None and verify
                and not _traced_matches(model, gm, np.asarray(samples))):
            raise TraceMismatch(f"{_TRACED_ANOTHER} (lowering then failed: {exc})") from None
        raise
    plan = Plan(tuple(L.ops), 1, output, {**dict(meta or {}), "head": final.head}, tuple(arities))
    comp = calibrate(Compiled(plan, L.weights), samples, frac_bits)
    if verify:
        verify_compile(model, gm, L, comp, np.asarray(samples))
    return comp


_TRACED_ANOTHER = ("torch.fx traced a different function than the model computes: forward() has Python control flow "
                   "on its input (isinstance, if on shapes or values) that tracing resolved another way; export the "
                   "model with torch.export and deploy the .pt2 (export traces such code faithfully), or make the "
                   "path explicit")


def _float64(module: Any) -> Any:
    """A float64, eval-mode copy (the user's model is never changed): comparisons see only rounding."""
    import copy

    return copy.deepcopy(module).double().eval()


def _traced_matches(model: Any, gm: Any, samples: np.ndarray) -> bool:

    import torch

    x = torch.as_tensor(np.asarray(samples, np.float64)[:2])
    with torch.no_grad():
        try:
            want = _float64(model)(x).numpy()
        except Exception:  # the model itself cannot run on this input: tracing is not the problem
            return True
        try:
            return _close(_float64(gm)(x).numpy(), want)[0]
        except Exception:  # the traced graph does not even run on the input
            return False


def _lower(L: _Lowering, gm: Any, output: str) -> _Val:
    import torch.fx as fx

    mods, fns = _module_rows(), _function_rows()
    final: _Val | None = None
    for node in gm.graph.nodes:
        if node.op == "get_attr":  # parameters read by functional calls (L.param)
            continue
        if node.op == "placeholder":
            if L.ops:
                raise UnsupportedLayerError("models with more than one input are not supported")
            L.vals[node.name] = _Val(L.add("input", (), L.input_shape, node.name))
            continue
        if node.op == "output":
            out = node.args[0]
            if isinstance(out, (tuple, list)):
                raise UnsupportedLayerError("models with several outputs are not supported")
            final = L.arg(out, keep_head=True)
            break
        mod = L.modules[node.target] if node.op == "call_module" else None
        row = mods.get(type(mod)) if mod is not None else (
            fns.get(node.target) if node.op in ("call_function", "call_method") else None)
        if row is None:
            what = f"{type(mod).__name__} at '{node.target}'" if mod is not None else _desc(node)
            raise UnsupportedLayerError(f"unsupported op {what}; supported: {SUPPORTED}")
        x = (L.arg(node.args[0], keep_head=row is _argmax) if node.args and isinstance(node.args[0], fx.Node)
             else None)
        L.vals[node.name] = row(L, node, mod, x)
    if final is None:
        raise UnsupportedLayerError("model graph has no output")
    if final.argmaxed and output == "logits":
        raise UsageError("model ends in argmax: it cannot produce logits")
    if output == "mask":
        k = L.shape(final.idx)[0]
        zero_first = k == 1 and final.head == "sigmoid"  # mask = sigmoid > 0.5 = [logit > 0]: a zero logit first
        if k < 2 and not zero_first:
            raise UnsupportedLayerError("mask output needs at least 2 output channels (a one-channel model needs a "
                                        "sigmoid head, so that the threshold is known)")
        k += int(zero_first)
        L.add("argmax", (final.idx,), (1, *L.shape(final.idx)[1:]), "argmax",
              ArgmaxParams(k, (k - 1).bit_length(), zero_first))
    else:
        src = L.settle(final)
        L.add("output", (src,), L.shape(src), "logits")
    return final


VERIFY_RTOL = 1e-6  # float64 plan vs float64 torch: only rounding (BatchNorm folding) may differ


def _close(a: np.ndarray, b: np.ndarray) -> tuple[bool, float]:
    err = float(np.max(np.abs(a - b))) if a.size else 0.0
    return a.shape == b.shape and err <= VERIFY_RTOL * (1.0 + float(np.max(np.abs(b)) if b.size else 0.0)), err


def verify_compile(model: Any, gm: Any, L: _Lowering, comp: Compiled, samples: np.ndarray) -> None:
    """The plan must compute the module's function: on (up to 8) calibration samples and a perturbed copy,
    (1) the traced graph must reproduce the module itself (torch.fx follows one path through Python
    control flow: an ``isinstance`` or ``if`` on values can make it trace another function), and
    (2) the plan's float64 forward must reproduce every traced value, or the compile is refused
    naming the first op where they diverge."""

    import torch
    import torch.fx as fx

    m64, g64 = _float64(model), _float64(gm)
    xs = np.asarray(samples, np.float64)[:8]
    rng = np.random.default_rng(0)
    perturbed = xs * 1.1 + 0.05 * (float(xs.std()) or 1.0) * rng.standard_normal(xs.shape)
    checked = {node.name: v for node in gm.graph.nodes if (v := L.vals.get(node.name)) is not None
               and not v.pending and not v.argmaxed and node.op != "placeholder"}
    wanted = {v.idx for v in checked.values()}

    class _Check(fx.Interpreter):
        """Runs the traced graph and compares each traced value with the plan's as soon as both exist;
        the plan's forward advances alongside and both drop values after their last use."""

        def __init__(self, x: np.ndarray) -> None:
            super().__init__(g64)
            self.plan = iter_forward(comp, x)
            self.done = 0  # plan ops computed so far
            self.kept: dict[int, np.ndarray] = {}
            self.diverged: tuple[Any, float] | None = None

        def run_node(self, n: Any) -> Any:
            r = super().run_node(n)
            v = checked.get(n.name)
            if v is None or self.diverged is not None or not isinstance(r, torch.Tensor):
                return r
            while self.done <= v.idx:
                i, _, out = next(self.plan)
                self.done = i + 1
                if i in wanted:
                    self.kept[i] = out
            got = self.kept.pop(v.idx, None)  # None: an identity's value, compared at its own node
            if got is not None:
                ok, err = _close(apply_head(v.head, got) if v.head is not None else got, r.numpy())
                if not ok:
                    self.diverged = (n, err)
            return r

    for what, x in (("the calibration samples", xs), ("perturbed samples", perturbed)):
        t = torch.as_tensor(x)
        check = _Check(x)
        with torch.no_grad():
            want = m64(t)
            traced = check.run(t)
        if not isinstance(want, torch.Tensor) or not _close(traced.numpy(), want.numpy())[0]:
            raise TraceMismatch(f"{_TRACED_ANOTHER} (on {what}: max difference "
                                f"{_close(traced.numpy(), want.numpy())[1]:.3g})")
        if check.diverged is not None:
            node, err = check.diverged
            raise UnsupportedLayerError(
                f"the compiled plan diverges from the model {_desc(node)} on {what} (max difference "
                f"{err:.3g}): refusing to compile a different function")
