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
from typing import Any

import numpy as np

from .errors import UnsupportedLayerError, UsageError
from .layers import ArgmaxParams, LinearParams, PoolParams, RescaleParams, UpsampleParams
from .linalg import conv2d_out_hw, conv_transpose2d_out_hw
from .plan import DEFAULT_ARITIES, Compiled, Op, Plan, calibrate

SUPPORTED = ("Conv2d, ConvTranspose2d, BatchNorm2d, ReLU, LeakyReLU, MaxPool2d, AvgPool2d, "
             "Upsample(nearest, integer scale), cat, add, argmax")


@dataclass
class _Val:
    """A traced value: plan index; whether it is a linear output awaiting rescale; whether argmaxed."""

    idx: int
    pending: bool = False  # linear output at scale f + fw, not yet rescaled
    argmaxed: bool = False


def _pair(v: Any) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (tuple, list)) else (int(v), int(v))


def _square(v: Any, what: str, name: str) -> int:
    a, b = _pair(v)
    if a != b:
        raise UnsupportedLayerError(f"{name}: non-square {what} {v} is not supported")
    return a


class _Lowering:
    """State of one compilation: the ops so far, float weights, traced values."""

    def __init__(self, gm: Any, input_shape: tuple[int, ...]) -> None:
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.ops: list[Op] = []
        self.weights: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}
        self.vals: dict[str, _Val] = {}
        self.input_shape = input_shape

    def add(self, kind: str, inputs: tuple[int, ...], shape: tuple[int, ...], name: str, params: Any = None) -> int:
        self.ops.append(Op(kind, inputs, tuple(shape), params, name))
        return len(self.ops) - 1

    def shape(self, idx: int) -> tuple[int, ...]:
        return self.ops[idx].shape

    def settle(self, v: _Val, act: str = "none", slope: float = 0.0) -> int:
        """Rescale a pending linear output back to scale f (fusing an activation if asked)."""
        if v.pending:
            return self.add("rescale", (v.idx,), self.shape(v.idx), self.ops[v.idx].name + ".rescale",
                            RescaleParams(act=act, rule="linear", slope=slope))
        if act != "none":
            return self.add("rescale", (v.idx,), self.shape(v.idx), act, RescaleParams(act=act, slope=slope))
        return v.idx

    def arg(self, node: Any) -> _Val:
        import torch.fx as fx

        if not isinstance(node, fx.Node) or node.name not in self.vals:
            raise UnsupportedLayerError(f"unsupported argument {node!r} (only tensors from the graph are allowed)")
        return self.vals[node.name]


def _desc(node: Any) -> str:
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", type(node.target).__name__)
    return f"{node.op} {target}"


def _spatial_2d(L: _Lowering, idx: int, what: str) -> tuple[int, int, int]:
    shp = L.shape(idx)
    if len(shp) != 3:
        raise UnsupportedLayerError(f"{what}: only 2D (N x C x H x W) inputs are supported here, got "
                                    f"{len(shp) - 1} spatial dimensions")
    return shp  # type: ignore[return-value]


def _conv(L: _Lowering, node: Any, mod: Any, x: _Val | None) -> _Val:
    import torch.nn as nn

    transposed = isinstance(mod, nn.ConvTranspose2d)
    if mod.groups != 1 or mod.padding_mode != "zeros" or isinstance(mod.padding, str):
        raise UnsupportedLayerError(f"{node.target} ({_desc(node)}): only groups=1, numeric zero padding")
    src = L.settle(x)  # type: ignore[arg-type]
    cin, hi, wi = _spatial_2d(L, src, str(node.target))
    k = _pair(mod.kernel_size)
    geom = {g: _square(getattr(mod, g), g, node.target)
            for g in ("stride", "padding", *(("output_padding",) if transposed else ()), "dilation")}
    if cin != mod.in_channels:
        raise UsageError(f"{node.target} expects {mod.in_channels} input channels, the input has {cin}")
    if transposed:
        ho, wo = conv_transpose2d_out_hw(hi, wi, k, geom["stride"], geom["padding"], geom["output_padding"],
                                         geom["dilation"])
    else:
        ho, wo = conv2d_out_hw(hi, wi, k, geom["stride"], geom["padding"], geom["dilation"])
    idx = L.add("convt" if transposed else "conv", (src,), (mod.out_channels, ho, wo), node.target,
                LinearParams(kernel=k, **geom))
    wt = mod.weight.detach().double().numpy().copy()
    bias = mod.bias.detach().double().numpy().copy() if mod.bias is not None else None
    L.weights[idx] = (wt, bias)
    return _Val(idx, pending=True)


def _batchnorm(L: _Lowering, node: Any, mod: Any, x: _Val | None) -> _Val:
    prev = node.args[0]
    if x is None or not x.pending or len(prev.users) != 1 or L.ops[x.idx].kind != "conv":
        raise UnsupportedLayerError(f"{node.target} ({_desc(node)}): BatchNorm2d must directly follow a Conv2d")
    if mod.running_mean is None or mod.running_var is None:
        raise UnsupportedLayerError(f"{node.target}: BatchNorm2d without running statistics")
    gamma = mod.weight.detach().double().numpy() if mod.affine else np.ones(mod.num_features)
    beta = mod.bias.detach().double().numpy() if mod.affine else np.zeros(mod.num_features)
    scale = gamma / np.sqrt(mod.running_var.double().numpy() + mod.eps)
    wt, bias = L.weights[x.idx]
    b0 = bias if bias is not None else np.zeros(wt.shape[0])
    L.weights[x.idx] = (wt * scale[:, None, None, None], (b0 - mod.running_mean.double().numpy()) * scale + beta)
    return x


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
    if mod is not None and (mod.dilation not in (1, (1, 1)) or mod.ceil_mode or mod.return_indices):
        raise UnsupportedLayerError(f"{_desc(node)}: MaxPool2d dilation/ceil_mode/return_indices unsupported")
    k, st = _pool_params(node, mod)
    src = L.settle(_need(x, node))
    return _Val(L.add("maxpool", (src,), _pooled(L, src, k, st), str(node.target), PoolParams(k, st)))


def _avgpool(L: _Lowering, node: Any, mod: Any, x: _Val | None) -> _Val:
    if mod is not None and mod.ceil_mode:
        raise UnsupportedLayerError(f"{_desc(node)}: AvgPool2d ceil_mode unsupported")
    k, st = _pool_params(node, mod)
    src = L.settle(_need(x, node))
    shp = _pooled(L, src, k, st)
    s_idx = L.add("avgsum", (src,), shp, str(node.target), PoolParams(k, st))
    n = k ** (len(shp) - 1)
    rp = (RescaleParams(shift=n.bit_length() - 1, divisor=n) if n & (n - 1) == 0
          else RescaleParams(rule="window", divisor=n))  # calibrate sets mul = round(2^f / n), shift f
    return _Val(L.add("rescale", (s_idx,), shp, str(node.target) + ".rescale", rp))


def _upsample(L: _Lowering, node: Any, mod: Any, x: _Val | None) -> _Val:
    if mod is not None:
        mode, size, sf = mod.mode, mod.size, mod.scale_factor
        align = getattr(mod, "align_corners", None)
    else:
        mode = node.kwargs.get("mode", node.args[3] if len(node.args) > 3 else "nearest")
        size = node.kwargs.get("size", node.args[1] if len(node.args) > 1 else None)
        sf = node.kwargs.get("scale_factor", node.args[2] if len(node.args) > 2 else None)
        align = node.kwargs.get("align_corners")
    if mode != "nearest" or size is not None or align:
        raise UnsupportedLayerError(f"{_desc(node)}: only nearest upsampling by an integer scale_factor is supported "
                                    f"(got mode={mode!r}, size={size!r})")
    factors = set(sf) if isinstance(sf, (tuple, list)) else {sf}
    if len(factors) != 1 or not all(float(f).is_integer() and f >= 1 for f in factors):
        raise UnsupportedLayerError(f"{_desc(node)}: scale_factor {sf!r} must be one integer for every axis")
    s = int(next(iter(factors)))
    src = L.settle(_need(x, node))
    c, *sp = L.shape(src)
    return _Val(L.add("upsample", (src,), (c, *(d * s for d in sp)), str(node.target), UpsampleParams(s)))


def _cat(L: _Lowering, node: Any, mod: Any, x: _Val | None) -> _Val:
    tensors = node.args[0]
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    srcs = tuple(L.settle(L.arg(t)) for t in tensors)
    shapes = [L.shape(s) for s in srcs]
    if dim not in (1, -len(shapes[0])):
        raise UnsupportedLayerError(f"{_desc(node)}: concatenation only along channels (dim=1)")
    if len({s[1:] for s in shapes}) != 1:
        raise UnsupportedLayerError(f"{_desc(node)}: concatenated tensors differ in spatial size {shapes}")
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
    return _Val(v.idx, pending=v.pending, argmaxed=True)


Lower = Callable[[_Lowering, Any, Any, "_Val | None"], _Val]


def _module_rows() -> dict[type, Lower]:
    import torch.nn as nn

    return {nn.Conv2d: _conv, nn.ConvTranspose2d: _conv, nn.BatchNorm2d: _batchnorm, nn.ReLU: _relu,
            nn.LeakyReLU: _leaky, nn.Identity: _identity, nn.Dropout: _identity, nn.Dropout2d: _identity,
            nn.MaxPool2d: _maxpool, nn.AvgPool2d: _avgpool, nn.Upsample: _upsample}


def _function_rows() -> dict[Any, Lower]:
    import torch
    import torch.nn.functional as F

    return {torch.relu: _relu, F.relu: _relu, "relu": _relu, F.leaky_relu: _leaky, F.dropout: _identity,
            "contiguous": _identity, F.max_pool2d: _maxpool, F.avg_pool2d: _avgpool, F.interpolate: _upsample,
            torch.cat: _cat, operator.add: _add, torch.add: _add, "add": _add, operator.iadd: _add,
            torch.argmax: _argmax, "argmax": _argmax}


def compile_model(
    model: Any,
    input_shape: tuple[int, ...],
    output: str = "mask",
    frac_bits: int | str = "auto",
    samples: np.ndarray | None = None,
    meta: dict[str, Any] | None = None,
    arities: tuple[int, ...] = DEFAULT_ARITIES,
) -> Compiled:
    """Trace ``model`` (eval mode) and lower it to a calibrated plan for inputs (C, *spatial)."""
    import torch.fx as fx

    if output not in ("mask", "logits"):
        raise UsageError(f"output must be 'mask' or 'logits', got {output!r}")
    model = model.eval()
    try:
        gm = fx.symbolic_trace(model)
    except Exception as exc:  # torch raises many kinds here
        raise UnsupportedLayerError(f"model cannot be traced by torch.fx: {exc}") from None
    L = _Lowering(gm, tuple(int(s) for s in input_shape))
    mods, fns = _module_rows(), _function_rows()
    final: _Val | None = None
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            if L.ops:
                raise UnsupportedLayerError("models with more than one input are not supported")
            L.vals[node.name] = _Val(L.add("input", (), L.input_shape, node.name))
            continue
        if node.op == "output":
            out = node.args[0]
            if isinstance(out, (tuple, list)):
                raise UnsupportedLayerError("models with several outputs are not supported")
            final = L.arg(out)
            break
        mod = L.modules[node.target] if node.op == "call_module" else None
        row = mods.get(type(mod)) if mod is not None else (
            fns.get(node.target) if node.op in ("call_function", "call_method") else None)
        if row is None:
            what = type(mod).__name__ if mod is not None else _desc(node)
            raise UnsupportedLayerError(f"unsupported op {what} at '{node.name}' ({_desc(node)}); supported: {SUPPORTED}")
        x = L.arg(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else None
        L.vals[node.name] = row(L, node, mod, x)
    if final is None:
        raise UnsupportedLayerError("model graph has no output")
    if final.argmaxed and output == "logits":
        raise UsageError("model ends in argmax: it cannot produce logits")
    if output == "mask":
        k = L.shape(final.idx)[0]
        if k < 2:
            raise UnsupportedLayerError("mask output needs at least 2 output channels")
        L.add("argmax", (final.idx,), (1, *L.shape(final.idx)[1:]), "argmax", ArgmaxParams(k, (k - 1).bit_length()))
    else:
        src = L.settle(final)
        L.add("output", (src,), L.shape(src), "logits")
    plan = Plan(tuple(L.ops), 1, output, dict(meta or {}), tuple(arities))
    return calibrate(Compiled(plan, L.weights), samples, frac_bits)
