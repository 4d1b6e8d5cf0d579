"""The public plan of a model: compile a ``torch.nn.Module``, calibrate, reference.

A plan is the list of secure ops with public shapes and scales; weights are
separate (secret, owned by the model owner). Ops (each makes one value, named
by its index; activations are N x C x H x W, the plan stores C, H, W):

========== =============================================================
input      the image at scale f
conv       exact ring conv2d, weights at ``fw`` bits -> output at f + fw
convt      exact ring conv_transpose2d, same scales
rescale    ``(x * mul) >> shift`` by dealer-assisted truncation, optional
           fused ReLU (shift 0 = plain ReLU); output at scale f
maxpool    k x k tournament of comparisons
avgsum     window sum (local); always followed by a rescale
concat     channel concat (local)
add        elementwise add (local)
argmax     label per pixel over channels (tournament, index in low bits)
output     logits at scale f, sent to the data owner
========== =============================================================

``compile_model`` traces with torch.fx, folds BatchNorm into the preceding
conv, drops Identity/Dropout, fuses conv -> ReLU into one rescale, and refuses
anything else naming the module and op. ``calibrate`` picks f and per-layer
weight bits ``fw`` from the ranges observed on sample inputs, keeping every
pre-truncation value below 2^29 (a factor 2 of headroom under the ring's 2^30).
``reference`` runs a plan on plain integers: the fixed-point model the secure
run must match (to <= 1 LSB per truncation).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from .errors import ScaleOverflowError, UnsupportedLayerError, UsageError

KINDS = ("input", "conv", "convt", "rescale", "maxpool", "avgsum", "concat", "add", "argmax", "output")
LINEAR = ("conv", "convt")
MARGIN_LOG2 = 29  # bound for any observed pre-truncation value: 2x headroom below the 2^30 ring limit
MAX_FW = 15  # keeps msb corrections in 16-bit shares (DESIGN 4)


@dataclass(frozen=True)
class Op:
    """One public plan op."""

    kind: str
    inputs: tuple[int, ...]
    shape: tuple[int, int, int]
    params: dict[str, Any] = field(default_factory=dict)
    name: str = ""

    def p(self, key: str) -> Any:
        return self.params[key]


@dataclass(frozen=True)
class Plan:
    """Public description of a secure model (architecture, shapes, scales, metadata)."""

    ops: tuple[Op, ...]
    frac_bits: int
    output: str  # "mask" or "logits"
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.ops[0].shape

    @property
    def classes(self) -> int:
        return self.ops[-1].shape[0] if self.output == "logits" else int(self.ops[-1].p("classes"))

    def linear_ops(self) -> list[int]:
        return [i for i, op in enumerate(self.ops) if op.kind in LINEAR]

    def to_dict(self) -> dict[str, Any]:
        return {
            "ops": [
                {"kind": o.kind, "inputs": list(o.inputs), "shape": list(o.shape), "params": o.params, "name": o.name}
                for o in self.ops
            ],
            "frac_bits": self.frac_bits,
            "output": self.output,
            "meta": self.meta,
        }

    @staticmethod
    def from_dict(d: Any) -> Plan:
        """Rebuild and validate a plan from untrusted data (clear errors, never asserts)."""
        try:
            ops = tuple(
                Op(
                    str(o["kind"]),
                    tuple(int(i) for i in o["inputs"]),
                    (int(o["shape"][0]), int(o["shape"][1]), int(o["shape"][2])),
                    dict(o.get("params", {})),
                    str(o.get("name", "")),
                )
                for o in d["ops"]
            )
            plan = Plan(ops, int(d["frac_bits"]), str(d["output"]), dict(d.get("meta", {})))
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise UsageError(f"malformed plan: {exc!r}") from None
        validate(plan)
        return plan


def validate(plan: Plan) -> None:
    """Structural checks: kinds known, inputs refer backwards, single input first."""
    if not plan.ops or plan.ops[0].kind != "input":
        raise UsageError("plan must start with its input op")
    if plan.output not in ("mask", "logits"):
        raise UsageError(f"plan output must be 'mask' or 'logits', got {plan.output!r}")
    if not 1 <= plan.frac_bits <= 20:
        raise UsageError(f"plan frac_bits {plan.frac_bits} outside 1..20")
    for i, op in enumerate(plan.ops):
        if op.kind not in KINDS:
            raise UsageError(f"plan op {i} has unknown kind {op.kind!r}")
        if any(j < 0 or j >= i for j in op.inputs):
            raise UsageError(f"plan op {i} ({op.kind}) refers to a later or missing value")
        if i and op.kind == "input":
            raise UsageError("plan has more than one input op")
        if any(s <= 0 or s > 1 << 16 for s in op.shape):
            raise UsageError(f"plan op {i} has an invalid shape {op.shape}")
    if plan.ops[-1].kind not in ("argmax", "output"):
        raise UsageError("plan must end with an argmax or output op")


# ------------------------------------------------------------------ compiler


@dataclass
class _Val:
    """A traced value during compilation: plan index, and whether it is a conv output awaiting rescale."""

    idx: int
    pending: bool = False  # linear output at scale f + fw, not yet rescaled
    users: int = 0


@dataclass
class Compiled:
    """A plan together with the float weights it was compiled from (model-owner secret)."""

    plan: Plan
    weights: dict[int, tuple[np.ndarray, np.ndarray | None]]


def _pair(v: Any) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (tuple, list)) else (int(v), int(v))


def _square(v: Any, what: str, name: str) -> int:
    a, b = _pair(v)
    if a != b:
        raise UnsupportedLayerError(f"{name}: non-square {what} {v} is not supported")
    return a


def _pool_params(node: Any, mod: Any, desc: str) -> tuple[int, int]:
    """(kernel, stride) of a pooling module or functional call; padding is refused."""
    if mod is not None:
        k, st, pd = mod.kernel_size, mod.stride, mod.padding
    else:
        k = node.args[1] if len(node.args) > 1 else node.kwargs["kernel_size"]
        st = node.args[2] if len(node.args) > 2 else node.kwargs.get("stride")
        pd = node.args[3] if len(node.args) > 3 else node.kwargs.get("padding", 0)
    if _square(pd, "padding", desc):
        raise UnsupportedLayerError(f"{desc}: padded pooling is not supported")
    return _square(k, "kernel", desc), _square(st if st else k, "stride", desc)


def compile_model(
    model: Any,
    input_shape: tuple[int, int, int],
    output: str = "mask",
    frac_bits: int | str = "auto",
    samples: np.ndarray | None = None,
    meta: dict[str, Any] | None = None,
) -> Compiled:
    """Trace ``model`` (eval mode) and lower it to a calibrated plan for inputs C x H x W."""
    import torch
    import torch.fx as fx
    import torch.nn as nn
    import torch.nn.functional as F

    if output not in ("mask", "logits"):
        raise UsageError(f"output must be 'mask' or 'logits', got {output!r}")
    model = model.eval()
    try:
        gm = fx.symbolic_trace(model)
    except Exception as exc:  # torch raises many kinds here
        raise UnsupportedLayerError(f"model cannot be traced by torch.fx: {exc}") from None
    modules = dict(gm.named_modules())
    ops: list[Op] = []
    weights: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}
    vals: dict[str, _Val] = {}
    c, h, w = (int(s) for s in input_shape)

    def add(kind: str, inputs: tuple[int, ...], shape: tuple[int, int, int], name: str, **params: Any) -> int:
        ops.append(Op(kind, inputs, shape, params, name))
        return len(ops) - 1

    def settle(v: _Val, relu: bool = False) -> int:
        """Rescale a pending linear output back to scale f (fusing a ReLU if asked)."""
        if v.pending:
            return add("rescale", (v.idx,), ops[v.idx].shape, ops[v.idx].name + ".rescale", shift=-1, mul=1, relu=relu)
        if relu:
            return add("rescale", (v.idx,), ops[v.idx].shape, "relu", shift=0, mul=1, relu=True)
        return v.idx

    def arg(node: Any) -> _Val:
        if not isinstance(node, fx.Node) or node.name not in vals:
            raise UnsupportedLayerError(f"unsupported argument {node!r} (only tensors from the graph are allowed)")
        return vals[node.name]

    last_bn_conv: dict[str, int] = {}
    for node in gm.graph.nodes:
        desc = f"{node.op} {node.target}"
        if node.op == "placeholder":
            if ops:
                raise UnsupportedLayerError("models with more than one input are not supported")
            vals[node.name] = _Val(add("input", (), (c, h, w), node.name))
            continue
        if node.op == "output":
            out = node.args[0]
            if isinstance(out, (tuple, list)):
                raise UnsupportedLayerError("models with several outputs are not supported")
            final = arg(out)
            break
        kind: Any = None
        mod: Any = None
        k: Any
        if node.op == "call_module":
            mod = modules[node.target]
            kind = type(mod)
        fn = node.target if node.op in ("call_function", "call_method") else None
        x = arg(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else None
        if kind is nn.Conv2d or kind is nn.ConvTranspose2d:
            m = mod
            transposed = kind is nn.ConvTranspose2d
            if m.groups != 1 or m.padding_mode != "zeros" or isinstance(m.padding, str):
                raise UnsupportedLayerError(f"{node.target} ({desc}): only groups=1, numeric zero padding")
            src = settle(x)  # type: ignore[arg-type]
            k = _pair(m.kernel_size)
            geom = {name: _square(getattr(m, name), name, node.target)
                    for name in ("stride", "padding", *(("output_padding",) if transposed else ()), "dilation")}
            cin, hi, wi = ops[src].shape
            if cin != m.in_channels:
                raise UsageError(f"{node.target} expects {m.in_channels} input channels, the input has {cin}")
            from .linalg import conv2d_out_hw, conv_transpose2d_out_hw

            if transposed:
                ho, wo = conv_transpose2d_out_hw(hi, wi, k, geom["stride"], geom["padding"], geom["output_padding"],
                                                 geom["dilation"])
            else:
                ho, wo = conv2d_out_hw(hi, wi, k, geom["stride"], geom["padding"], geom["dilation"])
            idx = add("convt" if transposed else "conv", (src,), (m.out_channels, ho, wo), node.target,
                      kernel=list(k), **geom, fw=0)
            wt = m.weight.detach().double().numpy().copy()
            bias = m.bias.detach().double().numpy().copy() if m.bias is not None else None
            weights[idx] = (wt, bias)
            vals[node.name] = _Val(idx, pending=True)
            if not transposed:
                last_bn_conv[node.name] = idx
        elif kind is nn.BatchNorm2d:
            prev = node.args[0]
            if x is None or not x.pending or len(prev.users) != 1 or ops[x.idx].kind != "conv":
                raise UnsupportedLayerError(f"{node.target} ({desc}): BatchNorm2d must directly follow a Conv2d")
            m = mod
            if m.running_mean is None or m.running_var is None:
                raise UnsupportedLayerError(f"{node.target}: BatchNorm2d without running statistics")
            gamma = m.weight.detach().double().numpy() if m.affine else np.ones(m.num_features)
            beta = m.bias.detach().double().numpy() if m.affine else np.zeros(m.num_features)
            scale = gamma / np.sqrt(m.running_var.double().numpy() + m.eps)
            wt, bias = weights[x.idx]
            b0 = bias if bias is not None else np.zeros(wt.shape[0])
            weights[x.idx] = (wt * scale[:, None, None, None], (b0 - m.running_mean.double().numpy()) * scale + beta)
            vals[node.name] = x
        elif kind in (nn.ReLU,) or fn in (torch.relu, F.relu, "relu"):
            if x is None:
                raise UnsupportedLayerError(f"{desc}: ReLU without a tensor input")
            vals[node.name] = _Val(settle(x, relu=True))
        elif kind in (nn.Identity, nn.Dropout, nn.Dropout2d) or fn in (F.dropout, "contiguous"):
            vals[node.name] = x  # type: ignore[assignment]
        elif kind is nn.MaxPool2d or fn is F.max_pool2d:
            if mod is not None and (mod.dilation not in (1, (1, 1)) or mod.ceil_mode or mod.return_indices):
                raise UnsupportedLayerError(f"{desc}: MaxPool2d dilation/ceil_mode/return_indices unsupported")
            k, st = _pool_params(node, mod, desc)
            src = settle(x)  # type: ignore[arg-type]
            cc, hi, wi = ops[src].shape
            idx = add("maxpool", (src,), (cc, (hi - k) // st + 1, (wi - k) // st + 1), str(node.target), kernel=k, stride=st)
            vals[node.name] = _Val(idx)
        elif kind is nn.AvgPool2d or fn is F.avg_pool2d:
            if mod is not None and mod.ceil_mode:
                raise UnsupportedLayerError(f"{desc}: AvgPool2d ceil_mode unsupported")
            k, st = _pool_params(node, mod, desc)
            src = settle(x)  # type: ignore[arg-type]
            cc, hi, wi = ops[src].shape
            shp = (cc, (hi - k) // st + 1, (wi - k) // st + 1)
            s_idx = add("avgsum", (src,), shp, str(node.target), kernel=k, stride=st)
            n = k * k
            if n & (n - 1) == 0:
                shift, mul = n.bit_length() - 1, 1
            else:
                shift, mul = -2, 0  # filled in by calibrate: mul = round(2^f / k^2), shift f
            vals[node.name] = _Val(add("rescale", (s_idx,), shp, str(node.target) + ".rescale", shift=shift, mul=mul, relu=False, window=n))
        elif fn is torch.cat:
            tensors = node.args[0]
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
            if dim not in (1, -3):
                raise UnsupportedLayerError(f"{desc}: concatenation only along channels (dim=1)")
            srcs = tuple(settle(arg(t)) for t in tensors)
            shapes = [ops[s].shape for s in srcs]
            if len({s[1:] for s in shapes}) != 1:
                raise UnsupportedLayerError(f"{desc}: concatenated tensors differ in spatial size {shapes}")
            vals[node.name] = _Val(add("concat", srcs, (sum(s[0] for s in shapes), *shapes[0][1:]), "cat"))
        elif fn in (operator.add, torch.add, "add", operator.iadd):
            if len(node.args) != 2 or not all(isinstance(a, fx.Node) for a in node.args):
                raise UnsupportedLayerError(f"{desc}: only tensor + tensor is supported")
            a, b = settle(arg(node.args[0])), settle(arg(node.args[1]))
            if ops[a].shape != ops[b].shape:
                raise UnsupportedLayerError(f"{desc}: added tensors differ in shape")
            vals[node.name] = _Val(add("add", (a, b), ops[a].shape, "add"))
        elif fn in (torch.argmax, "argmax"):
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            if dim not in (1, -3):
                raise UnsupportedLayerError(f"{desc}: argmax only over channels (dim=1)")
            vals[node.name] = _Val(x.idx, pending=x.pending)  # type: ignore[union-attr]
            vals[node.name].users = -1  # marks "already argmaxed"
        else:
            what = type(mod).__name__ if mod is not None else str(node.target)
            raise UnsupportedLayerError(f"unsupported op {what} at '{node.name}' ({desc}); supported: Conv2d, "
                                        "ConvTranspose2d, BatchNorm2d, ReLU, MaxPool2d, AvgPool2d, cat, add, argmax")
    else:  # pragma: no cover - fx graphs always end in output
        raise UnsupportedLayerError("model graph has no output")

    if final.users == -1 and output == "logits":
        raise UsageError("model ends in argmax: it cannot produce logits")
    if output == "mask":
        k = ops[final.idx].shape[0]
        if k < 2:
            raise UnsupportedLayerError("mask output needs at least 2 output channels")
        add("argmax", (final.idx,), (1, *ops[final.idx].shape[1:]), "argmax", classes=k, bits=(k - 1).bit_length())
    else:
        src = settle(final)
        add("output", (src,), ops[src].shape, "logits")
    plan = Plan(tuple(ops), 0, output, dict(meta or {}))
    comp = Compiled(plan, weights)
    return calibrate(comp, samples, frac_bits)


# --------------------------------------------------------------- calibration


def float_forward(comp: Compiled, x: np.ndarray) -> list[np.ndarray]:
    """Float64 forward of a plan (the ground truth calibration observes). Pre-rescale values for linear ops."""
    import torch
    import torch.nn.functional as F

    vals: list[Any] = []
    for i, op in enumerate(comp.plan.ops):
        ins = [vals[j] for j in op.inputs]
        if op.kind == "input":
            v = torch.as_tensor(np.asarray(x, dtype=np.float64))
        elif op.kind in LINEAR:
            wt, b = comp.weights[i]
            wt_t = torch.as_tensor(wt)
            b_t = torch.as_tensor(b) if b is not None else None
            if op.kind == "conv":
                v = F.conv2d(ins[0], wt_t, b_t, op.p("stride"), op.p("padding"), op.p("dilation"))
            else:
                v = F.conv_transpose2d(ins[0], wt_t, b_t, op.p("stride"), op.p("padding"), op.p("output_padding"), 1, op.p("dilation"))
        elif op.kind == "rescale":
            v = ins[0] / op.params.get("window", 1) if comp.plan.ops[op.inputs[0]].kind == "avgsum" else ins[0]
            v = torch.relu(v) if op.p("relu") else v
        elif op.kind == "maxpool":
            v = F.max_pool2d(ins[0], op.p("kernel"), op.p("stride"))
        elif op.kind == "avgsum":
            k = op.p("kernel")
            v = F.avg_pool2d(ins[0], k, op.p("stride")) * (k * k)
        elif op.kind == "concat":
            v = torch.cat(ins, 1)
        elif op.kind == "add":
            v = ins[0] + ins[1]
        elif op.kind == "argmax":
            v = torch.argmax(ins[0], 1)
        else:
            v = ins[0]
        vals.append(v)
    return [np.asarray(v.numpy()) for v in vals]


def calibrate(comp: Compiled, samples: np.ndarray | None, frac_bits: int | str) -> Compiled:
    """Choose f and per-layer ``fw`` so every observed pre-truncation value stays below 2^29."""
    plan = comp.plan
    if samples is None:
        raise UsageError("calibration needs sample inputs (N x C x H x W)")
    samples = np.asarray(samples, dtype=np.float64)
    if samples.ndim != 4 or tuple(samples.shape[1:]) != plan.input_shape:
        raise UsageError(f"calibration samples must be N x {plan.input_shape}, got {samples.shape}")
    if not np.all(np.isfinite(samples)):
        raise UsageError("calibration samples contain NaN or infinite values")
    vals = float_forward(comp, samples)
    maxabs = [float(np.max(np.abs(v))) if v.size and plan.ops[i].kind != "argmax" else 0.0 for i, v in enumerate(vals)]
    act_max = max([maxabs[i] for i, o in enumerate(plan.ops) if o.kind not in LINEAR + ("avgsum", "argmax")] + [1e-9])
    lin = plan.linear_ops()
    argmax_in = {o.inputs[0]: int(o.p("bits")) for o in plan.ops if o.kind == "argmax"}

    def fws(f: int) -> dict[int, int]:
        out = {}
        for i in lin:
            extra = argmax_in.get(i, 0) + 1  # +1: differences of two values in comparisons
            m = max(maxabs[i], 1e-9)
            out[i] = min(MAX_FW, MARGIN_LOG2 - extra - f - math.ceil(math.log2(m)))
        return out

    def act_ok(f: int) -> bool:
        return act_max * 2.0 ** (f + 1) < 2.0**MARGIN_LOG2

    if frac_bits == "auto":
        best = None
        for f in range(4, 17):
            if not act_ok(f):
                continue
            fw = fws(f)
            score = min([f, *fw.values()])
            if best is None or score >= best[0]:
                best = (score, f, fw)
        if best is None or best[0] < 4:
            raise ScaleOverflowError(
                f"no fixed-point scale fits the 32-bit ring for this model (largest observed |value| {max(maxabs):.3g})"
            )
        _, f, fw = best
    else:
        if not isinstance(frac_bits, int) or not 1 <= frac_bits <= 20:
            raise UsageError(f"frac_bits must be 'auto' or an int in 1..20, got {frac_bits!r}")
        f = frac_bits
        fw = {i: f for i in lin}
        limits = fws(f)
        bad = [plan.ops[i].name for i in lin if limits[i] < f] + ([] if act_ok(f) else ["activations"])
        if bad:
            raise ScaleOverflowError(
                f"frac_bits={f} overflows the 32-bit ring at {', '.join(bad[:3])} "
                "(observed ranges exceed 2^29 before truncation); use a smaller f or 'auto'"
            )
    new_ops = list(plan.ops)
    for i in lin:
        new_ops[i] = replace(new_ops[i], params={**new_ops[i].params, "fw": int(fw[i])})
    for i, op in enumerate(new_ops):
        if op.kind == "rescale" and op.p("shift") == -1:
            new_ops[i] = replace(op, params={**op.params, "shift": int(fw[op.inputs[0]])})
        elif op.kind == "rescale" and op.p("shift") == -2:
            new_ops[i] = replace(op, params={**op.params, "shift": f, "mul": round(2**f / op.p("window"))})
    new_plan = Plan(tuple(new_ops), f, plan.output, {**plan.meta, "calibration_max_abs": max(maxabs)})
    validate(new_plan)
    return Compiled(new_plan, comp.weights)


# ----------------------------------------------------------------- encoding


def encode_weights(comp: Compiled) -> dict[int, tuple[np.ndarray, np.ndarray | None]]:
    """Fixed-point weights (scale fw) and biases (scale f + fw) as ring elements."""
    from .ring import encode

    out = {}
    for i, (wt, b) in comp.weights.items():
        op = comp.plan.ops[i]
        fw = int(op.p("fw"))
        out[i] = (
            encode(wt, fw, f"weights of {op.name}"),
            encode(b, comp.plan.frac_bits + fw, f"bias of {op.name}") if b is not None else None,
        )
    return out


# ---------------------------------------------------------------- reference


def windows(x: np.ndarray, k: int, stride: int) -> list[np.ndarray]:
    """The k*k strided views of every pooling window position (row-major order)."""
    n, c, h, w = x.shape
    ho, wo = (h - k) // stride + 1, (w - k) // stride + 1
    return [x[:, :, dy : dy + stride * (ho - 1) + 1 : stride, dx : dx + stride * (wo - 1) + 1 : stride] for dy in range(k) for dx in range(k)]


def reference(plan: Plan, wq: dict[int, tuple[np.ndarray, np.ndarray | None]], xq: np.ndarray) -> list[np.ndarray]:
    """Plaintext fixed-point run on int64 (exact convs, round-to-nearest truncation)."""
    import torch
    import torch.nn.functional as F

    from .ring import signed

    vals: list[np.ndarray] = []
    for i, op in enumerate(plan.ops):
        ins = [vals[j] for j in op.inputs]
        if op.kind == "input":
            v = signed(xq)
        elif op.kind in LINEAR:
            wt, b = wq[i]
            wt_t = torch.as_tensor(signed(wt).astype(np.float64))
            x_t = torch.as_tensor(ins[0].astype(np.float64))
            if op.kind == "conv":
                r = F.conv2d(x_t, wt_t, None, op.p("stride"), op.p("padding"), op.p("dilation"))
            else:
                r = F.conv_transpose2d(x_t, wt_t, None, op.p("stride"), op.p("padding"), op.p("output_padding"), 1, op.p("dilation"))
            v = np.rint(r.numpy()).astype(np.int64)
            if b is not None:
                v = v + signed(b)[None, :, None, None]
        elif op.kind == "rescale":
            s, mul = int(op.p("shift")), int(op.p("mul"))
            z = ins[0] * mul
            v = (z + ((1 << s) >> 1)) >> s
            if op.p("relu"):
                v = np.maximum(v, 0)
        elif op.kind == "maxpool":
            v = np.max(np.stack(windows(ins[0], op.p("kernel"), op.p("stride"))), axis=0)
        elif op.kind == "avgsum":
            v = np.sum(np.stack(windows(ins[0], op.p("kernel"), op.p("stride"))), axis=0)
        elif op.kind == "concat":
            v = np.concatenate(ins, axis=1)
        elif op.kind == "add":
            v = ins[0] + ins[1]
        elif op.kind == "argmax":
            v = np.argmax(ins[0], axis=1)
        else:
            v = ins[0]
        vals.append(v)
    return vals
