"""Models from ``torch.export`` (``.pt2``, PyTorch's deployment format): the exported ATen graph
rewritten as a module-level torch.fx graph, so the one lowering (:mod:`blindseg.compiler`) and its
verification serve it unchanged.

torch.export traces with real shapes and guards, so Python control flow in ``forward`` is either
specialised faithfully or refused by export itself -- unlike torch.fx's symbolic tracing, which can
silently take another branch (the verification catches that). Each ATen call becomes the nn module
or torch function it came from (``aten.conv2d`` -> ``nn.Conv2d`` holding the exported weights, ...);
an ATen op with no row stays as it is and the lowering refuses it by name (``aten.tanh.default``).
"""

from __future__ import annotations

import operator
from pathlib import Path
from typing import Any

from .errors import UnsupportedLayerError, UsageError


def load_program(path: str | Path) -> Any:
    """A ``.pt2`` file written by ``torch.export.save``."""
    import torch

    p = Path(path)
    if not p.is_file():
        raise UsageError(f"exported program {p} does not exist")
    try:
        return torch.export.load(str(p))
    except Exception as exc:  # torch raises many kinds for a bad archive
        raise UsageError(f"{p} is not a torch.export program (.pt2): {exc.__class__.__name__}: {exc}") from None


def module_graph(ep: Any) -> tuple[Any, Any]:
    """``(reference, graph)``: the exported program as a callable module (the ground truth the compile is
    verified against, batch by batch when it was exported for a fixed batch) and the rebuilt fx graph."""
    import torch
    import torch.fx as fx
    import torch.nn as nn

    ref = ep.run_decompositions({}).module()
    root = nn.Module()
    graph = fx.Graph()
    env: dict[Any, Any] = {}
    aten = torch.ops.aten

    def attr(n: Any) -> Any:
        if getattr(n, "op", None) != "get_attr":
            raise UnsupportedLayerError(f"exported graph: expected a parameter, got {n}")
        obj = ref
        for part in str(n.target).split("."):
            obj = getattr(obj, part)
        return obj.detach()

    def prefix(n: Any) -> str:
        return str(n.target).rsplit(".", 1)[0] if getattr(n, "op", None) == "get_attr" else "p"

    def module(mod: Any, name: str, x: Any) -> Any:
        key = name.replace(".", "_")
        while hasattr(root, key):
            key += "_"
        root.add_module(key, mod)
        return graph.call_module(key, (env[x],))

    def arg(a: Any, i: int, default: Any) -> Any:
        return a[i] if len(a) > i else default

    fns, ident = _functions()
    for n in ref.graph.nodes:
        a = n.args
        t = n.target
        if n.op == "placeholder":
            env[n] = graph.placeholder(n.name)
        elif n.op in ("get_attr", "call_module"):  # parameters (read below) and export's guard function
            continue
        elif n.op == "output":
            out = a[0]
            graph.output(env[out[0]] if isinstance(out, (tuple, list)) and len(out) == 1 else
                         env[out] if not isinstance(out, (tuple, list)) else [env[o] for o in out])
        elif t in (aten.conv2d.default, aten.conv2d.padding):
            w, b = attr(a[1]), (attr(a[2]) if arg(a, 2, None) is not None else None)
            conv = nn.Conv2d(w.shape[1] * arg(a, 6, 1), w.shape[0], tuple(w.shape[2:]), stride=arg(a, 3, 1),
                             padding=arg(a, 4, 0), dilation=arg(a, 5, 1), groups=arg(a, 6, 1), bias=b is not None)
            _load(conv, w, b)
            env[n] = module(conv, prefix(a[1]), a[0])
        elif t == aten.conv_transpose2d.input:
            w, b = attr(a[1]), (attr(a[2]) if arg(a, 2, None) is not None else None)
            groups = arg(a, 6, 1)
            convt = nn.ConvTranspose2d(w.shape[0], w.shape[1] * groups, tuple(w.shape[2:]), stride=arg(a, 3, 1),
                                       padding=arg(a, 4, 0), output_padding=arg(a, 5, 0), groups=groups,
                                       dilation=arg(a, 7, 1), bias=b is not None)
            _load(convt, w, b)
            env[n] = module(convt, prefix(a[1]), a[0])
        elif t in (aten._native_batch_norm_legit_no_training.default, aten.batch_norm.default):
            eps = a[6] if t == aten._native_batch_norm_legit_no_training.default else a[7]
            rm, rv = attr(a[3]), attr(a[4])
            bn = nn.BatchNorm2d(rm.numel(), eps=float(eps), affine=a[1] is not None)
            with torch.no_grad():
                bn.running_mean.copy_(rm)  # type: ignore[union-attr]
                bn.running_var.copy_(rv)  # type: ignore[union-attr]
                if a[1] is not None:
                    bn.weight.copy_(attr(a[1]))
                    bn.bias.copy_(attr(a[2]))
            env[n] = module(bn.eval(), prefix(a[3]), a[0])
        elif t == aten.instance_norm.default and a[5]:  # use_input_stats (else running statistics: a BatchNorm)
            w = attr(a[1]) if a[1] is not None else None
            c = int(a[0].meta["val"].shape[1])
            cls = nn.InstanceNorm3d if a[0].meta["val"].dim() == 5 else nn.InstanceNorm2d
            inorm = cls(c, eps=float(a[7]), affine=w is not None)
            if w is not None:
                _load(inorm, w, attr(a[2]))
            env[n] = module(inorm, prefix(a[1]) if w is not None else n.name, a[0])
        elif t == aten.group_norm.default:
            w = attr(a[2]) if arg(a, 2, None) is not None else None
            gnorm = nn.GroupNorm(int(a[1]), int(a[0].meta["val"].shape[1]), eps=float(arg(a, 4, 1e-5)),
                                 affine=w is not None)
            if w is not None:
                _load(gnorm, w, attr(a[3]))
            env[n] = module(gnorm, prefix(a[2]) if w is not None else n.name, a[0])
        elif t == operator.getitem and a[0] in env and a[1] == 0:  # (out, saved mean, saved var)[0], pool indices
            env[n] = env[a[0]]
        elif t == aten.prelu.default:
            w = attr(a[1])
            pr = nn.PReLU(w.numel())
            with torch.no_grad():
                pr.weight.copy_(w.reshape(-1))
            env[n] = module(pr, prefix(a[1]), a[0])
        elif t in (aten.max_pool2d.default, aten.max_pool2d_with_indices.default):
            k = a[1]
            env[n] = module(nn.MaxPool2d(k, stride=arg(a, 2, None) or k, padding=arg(a, 3, 0), dilation=arg(a, 4, 1),
                                         ceil_mode=arg(a, 5, False)), n.name, a[0])
        elif t == aten.avg_pool2d.default:
            k = a[1]
            if arg(a, 6, None) is not None:
                raise UnsupportedLayerError(f"exported graph: {t} with divisor_override is not supported")
            env[n] = module(nn.AvgPool2d(k, stride=arg(a, 2, None) or k, padding=arg(a, 3, 0),
                                         ceil_mode=arg(a, 4, False), count_include_pad=arg(a, 5, True)), n.name, a[0])
        elif t in (aten.upsample_nearest2d.vec, aten.upsample_nearest2d.default):
            scale = _upsample_scale(n)
            env[n] = module(nn.Upsample(scale_factor=scale, mode="nearest"), n.name, a[0])
        elif t in (aten.upsample_bilinear2d.vec, aten.upsample_bilinear2d.default):
            align = bool(a[2]) if len(a) > 2 and isinstance(a[2], bool) else False
            env[n] = module(nn.Upsample(scale_factor=_upsample_scale(n), mode="bilinear", align_corners=align),
                            n.name, a[0])
        elif t in fns:
            fn, keep = fns[t]
            mapped = tuple(env[x] if x in env else [env[y] for y in x] if isinstance(x, (list, tuple)) else x
                           for x in a[:keep])
            env[n] = graph.call_function(fn(), mapped)
        elif t in (aten.pad.default, aten.constant_pad_nd.default):
            env[n] = graph.call_function(_fn("torch.nn.functional.pad")(), (env[a[0]], list(a[1])))
        elif t in ident:
            env[n] = env[a[0]]
        else:  # no row: the lowering names it
            env[n] = graph.call_function(t, tuple(env.get(x, x) for x in a), dict(n.kwargs))
    graph.lint()
    gm = fx.GraphModule(root, graph)
    return _PerSample(ref, _export_batch(ref)), gm


def _load(mod: Any, w: Any, b: Any) -> None:
    import torch

    with torch.no_grad():
        mod.weight.copy_(w)
        if b is not None:
            mod.bias.copy_(b)


def _upsample_scale(n: Any) -> float:
    src, dst = n.args[0].meta["val"].shape, n.meta["val"].shape
    factors = {dst[i] / src[i] for i in range(2, len(dst))}
    if len(factors) != 1:
        raise UnsupportedLayerError(f"exported graph: {n.target} scales the axes differently ({sorted(factors)})")
    return float(factors.pop())


def _export_batch(ref: Any) -> int | None:
    for n in ref.graph.nodes:
        if n.op == "placeholder" and "val" in n.meta:
            b = n.meta["val"].shape[0]
            return int(b) if isinstance(b, int) else None
    return None


def _fn(path: str) -> Any:
    def get() -> Any:
        import torch

        obj: Any = torch
        for part in path.split(".")[1:]:
            obj = getattr(obj, part)
        return obj

    return get


def _functions() -> tuple[dict[Any, tuple[Any, int]], set[Any]]:
    import torch

    aten = torch.ops.aten
    fns = {
        aten.relu.default: (_fn("torch.relu"), 1), aten.relu_.default: (_fn("torch.relu"), 1),
        aten.leaky_relu.default: (_fn("torch.nn.functional.leaky_relu"), 2),
        aten.cat.default: (_fn("torch.cat"), 2), aten.add.Tensor: (lambda: operator.add, 2),
        aten.mul.Tensor: (lambda: operator.mul, 2),
        aten.sigmoid.default: (_fn("torch.sigmoid"), 1), aten.softmax.int: (_fn("torch.softmax"), 2),
        aten._softmax.default: (_fn("torch.softmax"), 2), aten.argmax.default: (_fn("torch.argmax"), 2),
    }
    ident = {aten.clone.default, aten.dropout.default, aten.alias.default, aten.contiguous.default,
             aten.detach.default, aten.feature_dropout.default}
    return fns, ident


class _PerSample:
    """The exported module as the ground truth: a program exported for batch 1 is run sample by sample."""

    def __init__(self, ref: Any, batch: int | None) -> None:
        self.ref, self.batch = ref, batch

    def eval(self) -> _PerSample:
        return self

    def double(self) -> _PerSample:
        return _PerSample(self.ref.double() if hasattr(self.ref, "double") else self.ref, self.batch)

    def __call__(self, x: Any) -> Any:
        import torch

        if self.batch is None or x.shape[0] == self.batch:
            return self.ref(x)
        b = self.batch
        return torch.cat([self.ref(x[i:i + b]) for i in range(0, x.shape[0], b)])
