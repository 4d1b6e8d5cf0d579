"""The public plan of a model: typed ops, validation, calibration, and the two interpreters.

A plan is the list of secure ops with public shapes, scales and the comparison circuit's shape;
weights are separate (secret, owned by the model owner). Each op makes one value, named by its
index; values are (batch, channels, *spatial) and an op stores (channels, *spatial). What each op
kind means and does lives in its layer (:mod:`blindseg.layers`); this module only loops over them.

``calibrate`` picks the activation scale f and per-op weight bits ``fw`` from the ranges observed
on sample inputs, keeping every pre-truncation value below 2^29 (a factor 2 of headroom under the
ring's 2^30). ``reference`` runs a plan on plain integers: the fixed-point model the secure run must
match (to <= 1 LSB per truncation). ``float_forward`` is the float64 model calibration observes.
The compiler (torch model -> plan) is :mod:`blindseg.compiler`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from .circuit import Circuit, build_circuit
from .errors import ScaleOverflowError, UsageError
from .layers import Calibration, Layer, Params, layer_of

# inputs may exceed the calibrated range by this fraction of its largest magnitude: calibration leaves at least
# 2x headroom under 2^30 on every value, and conv/ReLU/max-pool values grow about linearly with the input,
# so 1.5x keeps a third of the headroom for biases
INPUT_MARGIN = 0.5
MARGIN_LOG2 = 29  # bound for any observed pre-truncation value: 2x headroom below the 2^30 ring limit
MAX_FW = 15  # keeps msb corrections in 16-bit shares (DESIGN 4)
CIRCUIT_WIDTH = 30  # comparison width: values live in [-2^30, 2^30)
DEFAULT_ARITIES = (3, 3, 2)


@dataclass(frozen=True)
class Op:
    """One public plan op: kind, input value indices, output shape (channels, *spatial), typed params."""

    kind: str
    inputs: tuple[int, ...]
    shape: tuple[int, ...]
    params: Any = None
    name: str = ""

    def __post_init__(self) -> None:
        lay = layer_of(self.kind)
        if self.params is None:
            object.__setattr__(self, "params", lay.params())
        elif isinstance(self.params, dict):
            object.__setattr__(self, "params", lay.params.from_dict(self.params))
        elif not isinstance(self.params, lay.params):
            raise UsageError(f"op {self.name or self.kind}: parameters must be {lay.params.__name__}")

    @property
    def layer(self) -> Layer:
        return layer_of(self.kind)

    def to_dict(self) -> dict[str, Any]:
        p: Params = self.params
        return {"kind": self.kind, "inputs": list(self.inputs), "shape": list(self.shape), "params": p.to_dict(),
                "name": self.name}


@dataclass(frozen=True)
class Plan:
    """Public description of a secure model (architecture, shapes, scales, circuit, metadata)."""

    ops: tuple[Op, ...]
    frac_bits: int
    output: str  # "mask" or "logits"
    meta: dict[str, Any] = field(default_factory=dict)
    arities: tuple[int, ...] = DEFAULT_ARITIES  # the comparison circuit's tree (dealer and servers must agree)
    width: int = CIRCUIT_WIDTH

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.ops[0].shape

    @property
    def classes(self) -> int:
        last = self.ops[-1]
        return last.shape[0] if self.output == "logits" else int(last.params.classes)

    def weighted_ops(self) -> list[int]:
        """Indices of the ops that carry the model owner's secret weights."""
        return [i for i, op in enumerate(self.ops) if op.layer.weighted]

    def in_shapes(self, i: int) -> list[tuple[int, ...]]:
        return [self.ops[j].shape for j in self.ops[i].inputs]

    def circuit(self) -> Circuit:
        return build_circuit(self.width, self.arities)

    def to_dict(self) -> dict[str, Any]:
        return {"ops": [o.to_dict() for o in self.ops], "frac_bits": self.frac_bits, "output": self.output,
                "meta": self.meta, "circuit": {"width": self.width, "arities": list(self.arities)}}

    @staticmethod
    def from_dict(d: Any) -> Plan:
        """Rebuild and validate a plan from untrusted data (clear errors, never asserts)."""
        try:
            ops = tuple(Op(str(o["kind"]), tuple(int(i) for i in o["inputs"]), tuple(int(s) for s in o["shape"]),
                           dict(o.get("params", {})), str(o.get("name", ""))) for o in d["ops"])
            circ = d.get("circuit", {})
            plan = Plan(ops, int(d["frac_bits"]), str(d["output"]), dict(d.get("meta", {})),
                        tuple(int(a) for a in circ.get("arities", DEFAULT_ARITIES)),
                        int(circ.get("width", CIRCUIT_WIDTH)))
        except UsageError as exc:  # a layer refused its parameters
            raise UsageError(f"malformed plan: {exc}") from None
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
            raise UsageError(f"malformed plan: {exc!r}") from None
        validate(plan)
        return plan


MAX_OPS = 20000
MAX_ELEMS = 1 << 28  # per op and image (1 GiB of ring elements)


def check_budget(plan: Plan, limit: int, batch: int = 1) -> int:
    """:meth:`blindseg.layout.Layout.check_budget` of the plan's layout for ``batch``."""
    from .layout import Layout

    return Layout.of(plan, batch).check_budget(limit)


def downsampling(ops: tuple[Op, ...] | list[Op]) -> int:
    """The model's total spatial downsampling: the largest ratio of the input's size to a value's (a
    power of two in a U-Net). Window offsets and input sizes are multiples of it."""
    src = ops[0].shape[1] if len(ops[0].shape) > 1 else 1
    ratio = max([src // max(1, op.shape[1]) for op in ops if len(op.shape) > 1] + [1])
    return 1 << (ratio.bit_length() - 1)


def validate(plan: Plan) -> None:
    """Structural checks: one input first, inputs refer backwards, shapes agree with what each layer
    implies, a terminal op last, a circuit the ring allows."""
    if len(plan.ops) > MAX_OPS:
        raise UsageError(f"plan has {len(plan.ops)} ops, more than {MAX_OPS}")
    if not plan.ops or plan.ops[0].inputs or plan.ops[0].layer is not layer_of("input"):
        raise UsageError("plan must start with its input op")
    if plan.output not in ("mask", "logits"):
        raise UsageError(f"plan output must be 'mask' or 'logits', got {plan.output!r}")
    if not 1 <= plan.frac_bits <= 20:
        raise UsageError(f"plan frac_bits {plan.frac_bits} outside 1..20")
    if plan.width != CIRCUIT_WIDTH or not plan.arities or any(not 2 <= a <= 8 for a in plan.arities):
        raise UsageError(f"plan circuit (width {plan.width}, arities {plan.arities}) is not supported")
    ndim = len(plan.ops[0].shape)
    for i, op in enumerate(plan.ops):
        if i and not op.inputs:
            raise UsageError(f"plan op {i} ({op.kind}) has no inputs (only the first op is the input)")
        lo, hi = op.layer.arity
        if i and not lo <= len(op.inputs) <= hi:
            raise UsageError(f"plan op {i} ({op.kind}) has {len(op.inputs)} inputs; this kind takes {lo}..{hi}")
        if any(j < 0 or j >= i for j in op.inputs):
            raise UsageError(f"plan op {i} ({op.kind}) refers to a later or missing value")
        if len(op.shape) != ndim or any(s <= 0 or s > 1 << 16 for s in op.shape) or math.prod(op.shape) > MAX_ELEMS:
            raise UsageError(f"plan op {i} has an invalid shape {op.shape} (at most {MAX_ELEMS} elements per op)")
        if i:
            want = op.layer.out_shape(op, plan.in_shapes(i))
            if want is not None and want != op.shape:
                raise UsageError(f"plan op {i} ({op.kind}) has shape {op.shape}, its inputs give {want}")
    if not plan.ops[-1].layer.terminal or (plan.output == "mask") != (plan.ops[-1].layer is layer_of("argmax")):
        raise UsageError("plan must end with an argmax (mask output) or output (logits) op")


@dataclass
class Compiled:
    """A plan together with the float weights it was compiled from (model-owner secret)."""

    plan: Plan
    weights: dict[int, tuple[np.ndarray, np.ndarray | None]]


def apply_head(head: str | None, logits: np.ndarray) -> np.ndarray:
    """The model's monotone output head (sigmoid, or softmax over channels = axis 1), applied in plaintext
    to reconstructed logits: the servers compute the logits, the data owner what the model returns."""
    if head is None:
        return logits
    if head == "sigmoid":
        return np.asarray(1.0 / (1.0 + np.exp(-logits)))
    if head == "softmax":
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        return np.asarray(e / e.sum(axis=1, keepdims=True))
    raise UsageError(f"the plan names an unknown output head {head!r}")


# --------------------------------------------------------------- calibration


def float_forward(comp: Compiled, x: np.ndarray) -> list[np.ndarray]:
    """Float64 forward of a plan (the ground truth calibration observes). Pre-rescale values for linear ops."""
    import torch

    vals: list[Any] = []
    for i, op in enumerate(comp.plan.ops):
        ins = [vals[j] for j in op.inputs] or [torch.as_tensor(np.asarray(x, dtype=np.float64))]
        vals.append(op.layer.forward(op, ins, comp.weights.get(i)))
    return [np.asarray(v.numpy()) for v in vals]


def calibrate(comp: Compiled, samples: np.ndarray | None, frac_bits: int | str) -> Compiled:
    """Choose f and per-op ``fw`` so every observed pre-truncation value stays below 2^29."""
    plan = comp.plan
    if samples is None:
        raise UsageError("calibration needs sample inputs (N x C x spatial...)")
    samples = np.asarray(samples, dtype=np.float64)
    if samples.ndim != 1 + len(plan.input_shape) or tuple(samples.shape[1:]) != plan.input_shape:
        raise UsageError(f"calibration samples must be N x {plan.input_shape}, got {samples.shape}")
    if not np.all(np.isfinite(samples)):
        raise UsageError("calibration samples contain NaN or infinite values")
    vals = float_forward(comp, samples)
    maxabs = [float(np.max(np.abs(v))) if v.size and op.layer is not layer_of("argmax") else 0.0
              for op, v in zip(plan.ops, vals, strict=True)]
    act_max = max([maxabs[i] for i, o in enumerate(plan.ops) if o.layer.activation] + [1e-9])
    lin = plan.weighted_ops()
    headroom = {i: 0 for i in range(len(plan.ops))}
    for op in plan.ops:
        for j in op.inputs:
            headroom[j] = max(headroom[j], op.layer.input_headroom(op))

    def fws(f: int) -> dict[int, int]:
        out = {}
        for i in lin:
            extra = headroom[i] + 1  # +1: differences of two values in comparisons
            m = max(maxabs[i], 1e-9)
            out[i] = min(MAX_FW, MARGIN_LOG2 - extra - f - math.ceil(math.log2(m)))
        return out

    scaled = [(maxabs[i], op.layer.scale_bits(op)) for i, op in enumerate(plan.ops) if op.layer.scale_bits(op)]

    def act_ok(f: int) -> bool:
        return act_max * 2.0 ** (f + 1) < 2.0**MARGIN_LOG2 and all(m * 2.0 ** (f + 1 + g) < 2.0**MARGIN_LOG2
                                                                  for m, g in scaled)

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
    stats = {i: st for i, op in enumerate(plan.ops)
             if (st := op.layer.observe(op, [vals[j] for j in op.inputs], vals[i])) is not None}
    cal = Calibration(f, fw, maxabs, stats)
    new_ops = tuple(replace(op, params=op.layer.calibrate(op, i, cal, plan.ops)) for i, op in enumerate(plan.ops))
    axes = (0, *range(2, samples.ndim))
    lo, hi = samples.min(axis=axes), samples.max(axis=axes)
    input_range = {"lo": [float(v) for v in lo], "hi": [float(v) for v in hi],
                   "margin": float(plan.meta.get("input_margin", INPUT_MARGIN)),
                   "clip": bool(plan.meta.get("clip_input", False))}
    new_plan = replace(plan, ops=new_ops, frac_bits=f, meta={**plan.meta, "calibration_max_abs": max(maxabs),
                                                             "input_range": input_range})
    validate(new_plan)
    return Compiled(new_plan, comp.weights)


# ----------------------------------------------------------------- encoding


def encode_weights(comp: Compiled) -> dict[int, tuple[np.ndarray, np.ndarray | None]]:
    """Fixed-point weights (scale fw) and biases (scale f + fw) as ring elements."""
    from .ring import encode

    out = {}
    for i, (wt, b) in comp.weights.items():
        op = comp.plan.ops[i]
        fw = int(op.params.fw)
        out[i] = (
            encode(wt, fw, f"weights of {op.name}"),
            encode(b, comp.plan.frac_bits + fw, f"bias of {op.name}") if b is not None else None,
        )
    return out


# ---------------------------------------------------------------- reference


def reference(plan: Plan, wq: dict[int, tuple[np.ndarray, np.ndarray | None]], xq: np.ndarray) -> list[np.ndarray]:
    """Plaintext fixed-point run on int64 (exact convs, floor truncation: each secure truncation is
    this or one LSB more)."""
    vals: list[np.ndarray] = []
    for i, op in enumerate(plan.ops):
        ins = [vals[j] for j in op.inputs] or [xq]
        vals.append(op.layer.reference(op, ins, wq.get(i)))  # type: ignore[call-arg]
    return vals
