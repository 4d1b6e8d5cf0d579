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
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from operator import index
from typing import Any

import numpy as np

from .circuit import WIDTH, Circuit, build_circuit
from .errors import ScaleOverflowError, UsageError
from .layers import Calibration, Layer, Params, layer_of

# inputs may exceed the calibrated range by this fraction of its largest magnitude: calibration leaves at least
# 2x headroom under 2^30 on every value, and conv/ReLU/max-pool values grow about linearly with the input,
# so 1.5x keeps a third of the headroom for biases
INPUT_MARGIN = 0.5
MARGIN_LOG2 = 29  # bound for any observed pre-truncation value: 2x headroom below the 2^30 ring limit
MAX_FW = 15  # keeps msb corrections in 16-bit shares (DESIGN 4)
CIRCUIT_WIDTH = WIDTH  # comparison width: values live in [-2^30, 2^30)
DEFAULT_ARITIES = (3, 5)  # 2 AND rounds per comparison (issue #13: (3, 3, 2) took 3; +11% offline, -0.9% online)


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
    #: fraction bits of every op's value, chosen by calibration (empty: one scale ``frac_bits`` for every
    #: activation, the plans before per-value scales)
    scales: tuple[int, ...] = ()

    def scale(self, i: int) -> int:
        """Fraction bits of op ``i``'s value (a linear op's: its input's plus its weight bits)."""
        if self.scales:
            return self.scales[i]
        op = self.ops[i]
        if op.layer.weighted:
            return self.frac_bits + int(op.params.fw)
        return self.frac_bits + op.layer.scale_bits(op)

    @property
    def output_scale(self) -> int:
        """Fraction bits of what the data owner receives (logits output)."""
        return self.scale(len(self.ops) - 1)

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
                "meta": self.meta, "circuit": {"width": self.width, "arities": list(self.arities)},
                "scales": list(self.scales)}

    @staticmethod
    def from_dict(d: Any) -> Plan:
        """Rebuild and validate a plan from untrusted data (clear errors, never asserts)."""
        try:
            # integers must be integers: index() refuses 1.7 (int() would truncate it) and inf alike
            ops = tuple(Op(str(o["kind"]), tuple(index(i) for i in o["inputs"]), tuple(index(s) for s in o["shape"]),
                           dict(o.get("params", {})), str(o.get("name", ""))) for o in d["ops"])
            circ = d.get("circuit", {})
            plan = Plan(ops, index(d["frac_bits"]), str(d["output"]), dict(d.get("meta", {})),
                        tuple(index(a) for a in circ.get("arities", DEFAULT_ARITIES)),
                        index(circ.get("width", CIRCUIT_WIDTH)), tuple(index(v) for v in d.get("scales", ())))
        except UsageError as exc:  # a layer refused its parameters
            raise UsageError(f"malformed plan: {exc}") from None
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, OverflowError) as exc:
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
    if plan.scales and (len(plan.scales) != len(plan.ops) or any(not -16 <= v <= 48 for v in plan.scales)):
        raise UsageError(f"plan scales must be one fraction-bit count in -16..48 per op ({len(plan.ops)})")
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
            op.layer.validate_inputs(op, [plan.ops[j] for j in op.inputs])
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
    return [out for _, _, out in iter_forward(comp, x)]


def iter_forward(comp: Compiled, x: np.ndarray) -> Iterator[tuple[int, list[np.ndarray], np.ndarray]]:
    """The float64 forward op by op, as (index, inputs, output), each value dropped after its last reader:
    memory is the live set (a U-Net's skip connections), not every value of the model (a 512^2 model's
    values at float64 are gigabytes)."""
    import torch

    ops = comp.plan.ops
    last = {j: i for i, op in enumerate(ops) for j in op.inputs}
    vals: dict[int, Any] = {}
    for i, op in enumerate(ops):
        ins = [vals[j] for j in op.inputs] or [torch.as_tensor(np.asarray(x, dtype=np.float64))]
        out = op.layer.forward(op, ins, comp.weights.get(i))
        vals[i] = out
        yield i, [np.asarray(v.numpy()) for v in ins], np.asarray(out.numpy())
        for j in set(op.inputs):
            if last[j] == i:
                del vals[j]
        if last.get(i) is None:
            del vals[i]


SCALE_RANGE = (-8, 16)  # fraction bits an activation may get
MIN_BITS = 4.0  # significant bits the scarcest activation or weight must keep
# an activation's bits are counted this many below its maximum's: its typical value sits further below its
# maximum than a weight's, and its rounding noise adds up layer after layer (ref-unet 128^2, two runs each:
# 0 -> 99.88-99.92% agreement, 2 -> 99.945-99.951% (as one global f), 4 -> 99.88-99.90%)
ACT_MARGIN = 2.0


def scale_groups(plan: Plan) -> list[int]:
    """Values that must share one scale (a ``join`` layer's inputs and output), as a group id per op;
    -1 for ``derived`` values (a conv's output: its input's scale plus its weight bits) and for a join
    that reads one directly (an argmax or output straight after the head conv)."""
    parent = list(range(len(plan.ops)))

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    derived = [False] * len(plan.ops)
    for i, op in enumerate(plan.ops):
        derived[i] = op.layer.scale_mode == "derived"
        if op.layer.scale_mode == "join":
            late = [j for j in op.inputs if derived[j]]
            if late and len(op.inputs) > 1:
                raise UsageError(f"plan op {i} ({op.kind}) reads op {late[0]}'s value before it is rescaled")
            if late:  # the conv's scale; its fw leaves the headroom this op needs
                derived[i] = True
                continue
            for j in op.inputs:
                parent[find(j)] = find(i)
    return [-1 if derived[i] else find(i) for i in range(len(plan.ops))]


def _headroom(plan: Plan) -> list[int]:
    """Bits above a value's range its consumers need (argmax lifts by the class bits; +1 for the
    differences every comparison takes)."""
    out = [1] * len(plan.ops)
    for op in plan.ops:
        for j in op.inputs:
            out[j] = max(out[j], 1 + op.layer.input_headroom(op))
    return out


def _lg(m: float) -> int:
    return math.ceil(math.log2(max(m, 1e-9)))


def choose_scales(plan: Plan, weights: dict[int, tuple[np.ndarray, np.ndarray | None]], maxabs: list[float],
                  stats: dict[int, dict[str, float]]) -> tuple[list[int], dict[int, int]]:
    """Per-value fraction bits and per-conv weight bits from the calibrated ranges.

    Each group of values that must share a scale (:func:`scale_groups`) gets the scale s that
    maximises the scarcest significant bits among its values (s + log2 max|value| - ACT_MARGIN) and the weights
    of the convs reading it (fw + log2 max|w|), under: every value and its consumers' headroom below
    2^29, every conv output (s + fw) below 2^29, fw <= MAX_FW, and what a layer's protocol caps
    (:meth:`Layer.scale_caps`: a group norm's products). A value with a range of 1000 thus keeps
    fewer fraction bits than one of range 1, and no single layer sets the precision of all.
    """
    ops = plan.ops
    group = scale_groups(plan)
    head = _headroom(plan)
    cap: dict[int, int] = {g: SCALE_RANGE[1] for g in set(group) if g >= 0}
    bits: dict[int, float] = {g: math.inf for g in cap}  # log2 of the group's smallest largest-value
    convs: dict[int, list[tuple[int, int, float]]] = {g: [] for g in cap}  # (op, limit on s + fw, log2 max|w|)
    for i, op in enumerate(ops):
        for j, lim in op.layer.scale_caps(op, i, maxabs, stats).items():
            if group[j] >= 0:
                cap[group[j]] = min(cap[group[j]], lim)
        if group[i] >= 0:
            if maxabs[i] > 0:
                cap[group[i]] = min(cap[group[i]], MARGIN_LOG2 - head[i] - _lg(maxabs[i]))
                bits[group[i]] = min(bits[group[i]], math.log2(maxabs[i]))
            continue
        g = group[op.inputs[0]]
        if g < 0:  # a join reading a conv's value directly: the conv's limit includes its headroom
            continue
        if op.layer.weighted:
            wmax = float(np.max(np.abs(weights[i][0]))) if weights[i][0].size else 1.0
            convs[g].append((i, MARGIN_LOG2 - head[i] - _lg(maxabs[i]), math.log2(max(wmax, 1e-9))))
        else:  # interp / window sums: their own fraction bits on top of the input's
            cap[g] = min(cap[g], MARGIN_LOG2 - head[i] - op.layer.scale_bits(op) - _lg(maxabs[i]))
    scale_of: dict[int, int] = {}
    fw: dict[int, int] = {}
    for g in cap:
        top = min(cap[g], SCALE_RANGE[1])
        best: tuple[float, int] | None = None
        for sc in range(SCALE_RANGE[0], top + 1):
            score = min([sc - ACT_MARGIN + (bits[g] if bits[g] != math.inf else 0.0)]
                        + [min(MAX_FW, lim - sc) + wb for _, lim, wb in convs[g]])
            if best is None or score >= best[0]:
                best = (score, sc)
        if best is None or best[0] < MIN_BITS:
            where = ops[g].name or ops[g].kind
            raise ScaleOverflowError(
                f"no fixed-point scale fits the 32-bit ring at {where} (largest observed |value| "
                f"{max(maxabs):.3g}; fewer than {MIN_BITS:g} significant bits would remain)")
        scale_of[g] = best[1]
        for i, lim, _ in convs[g]:
            fw[i] = min(MAX_FW, lim - best[1])
    return _derive_scales(plan, group, scale_of, fw), fw


def _derive_scales(plan: Plan, group: list[int], scale_of: dict[int, int], fw: dict[int, int]) -> list[int]:
    out: list[int] = []
    for i, op in enumerate(plan.ops):
        if group[i] >= 0:
            out.append(scale_of[group[i]])
        else:
            out.append(op.layer.value_scale(op, [out[j] for j in op.inputs], fw.get(i, 0)))
    return out


def _uniform_scales(plan: Plan, f: int, maxabs: list[float]) -> tuple[list[int], dict[int, int]]:
    """One scale f for every activation and fw = f for every conv (``frac_bits=<int>``), checked."""
    group = scale_groups(plan)
    head = _headroom(plan)
    fw = {i: f for i in plan.weighted_ops()}
    scales = _derive_scales(plan, group, {g: f for g in set(group) if g >= 0}, fw)
    bad = [op.name or op.kind for i, op in enumerate(plan.ops)
           if maxabs[i] > 0 and scales[i] + head[i] + _lg(maxabs[i]) > MARGIN_LOG2]
    if bad:
        raise ScaleOverflowError(
            f"frac_bits={f} overflows the 32-bit ring at {', '.join(bad[:3])} "
            "(observed ranges exceed 2^29 before truncation); use a smaller f or 'auto'")
    return scales, fw


def calibrate(comp: Compiled, samples: np.ndarray | None, frac_bits: int | str) -> Compiled:
    """Choose every value's scale and every conv's ``fw`` so each observed pre-truncation value stays
    below 2^29 (:func:`choose_scales`; ``frac_bits=<int>``: one scale for all, as before)."""
    plan = comp.plan
    if samples is None:
        raise UsageError("calibration needs sample inputs (N x C x spatial...)")
    samples = np.asarray(samples, dtype=np.float64)
    if samples.ndim != 1 + len(plan.input_shape) or tuple(samples.shape[1:]) != plan.input_shape:
        raise UsageError(f"calibration samples must be N x {plan.input_shape}, got {samples.shape}")
    if not np.all(np.isfinite(samples)):
        raise UsageError("calibration samples contain NaN or infinite values")
    maxabs: list[float] = []
    stats: dict[int, dict[str, float]] = {}
    for i, ins, out in iter_forward(comp, samples):
        op = plan.ops[i]
        maxabs.append(float(np.max(np.abs(out))) if out.size and op.layer is not layer_of("argmax") else 0.0)
        if (st := op.layer.observe(op, ins, out)) is not None:
            stats[i] = st
    if frac_bits == "auto":
        scales, fw = choose_scales(plan, comp.weights, maxabs, stats)
    else:
        if not isinstance(frac_bits, int) or not 1 <= frac_bits <= 20:
            raise UsageError(f"frac_bits must be 'auto' or an int in 1..20, got {frac_bits!r}")
        scales, fw = _uniform_scales(plan, frac_bits, maxabs)
    f = scales[0]
    cal = Calibration(f, fw, maxabs, stats, scales)
    new_ops = tuple(replace(op, params=op.layer.calibrate(op, i, cal, plan.ops)) for i, op in enumerate(plan.ops))
    axes = (0, *range(2, samples.ndim))
    lo, hi = samples.min(axis=axes), samples.max(axis=axes)
    input_range = {"lo": [float(v) for v in lo], "hi": [float(v) for v in hi],
                   "margin": float(plan.meta.get("input_margin", INPUT_MARGIN)),
                   "clip": bool(plan.meta.get("clip_input", False))}
    new_plan = replace(plan, ops=new_ops, frac_bits=f, scales=tuple(scales),
                       meta={**plan.meta, "calibration_max_abs": max(maxabs), "input_range": input_range})
    validate(new_plan)
    return Compiled(new_plan, comp.weights)


# ----------------------------------------------------------------- encoding


def encode_weights(comp: Compiled) -> dict[int, tuple[np.ndarray, np.ndarray | None]]:
    """Fixed-point weights (scale fw) and biases (the conv output's scale: its input's + fw) as ring elements."""
    from .ring import encode

    out = {}
    for i, (wt, b) in comp.weights.items():
        op = comp.plan.ops[i]
        fw = int(op.params.fw)
        out[i] = (
            encode(wt, fw, f"weights of {op.name}"),
            encode(b, comp.plan.scale(i), f"bias of {op.name}") if b is not None else None,
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
