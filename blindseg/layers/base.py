"""What every secure layer kind provides, and the contexts it is given.

A layer kind is one :class:`Layer` object (registered in :mod:`blindseg.layers`) that owns,
for the ops of its kind: typed parameters, the material it consumes (:meth:`Layer.specs`), the
dealer half (:meth:`Layer.derive`), offline precomputation, the online protocol
(:meth:`Layer.online`, a pure generator of :class:`~blindseg.protocols.Open` rounds), the
fixed-point reference and the float forward. Shapes are (batch, channels, *spatial).
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from ..circuit import Circuit
from ..errors import UsageError
from ..preprocessing import Material, MatSpec, derive_material

if TYPE_CHECKING:
    import torch

    from ..plan import Op
    from ..protocols import Proto


@dataclass(frozen=True)
class Params:
    """Base of every layer's parameters: frozen, validated on construction, plain-data round trip."""

    def to_dict(self) -> dict[str, Any]:
        return {f.name: list(v) if isinstance(v, tuple) else v for f, v in
                ((f, getattr(self, f.name)) for f in dataclasses.fields(self))}

    @classmethod
    def from_dict(cls, d: Any) -> Params:
        """Rebuild from untrusted data: unknown or missing keys and wrong types are UsageErrors."""
        if not isinstance(d, dict):
            raise UsageError(f"{cls.__name__}: parameters must be a map")
        fs = {f.name: f for f in dataclasses.fields(cls)}
        extra = set(d) - set(fs)
        if extra:
            raise UsageError(f"{cls.__name__}: unknown parameters {sorted(extra)}")
        kwargs: dict[str, Any] = {}
        for name, f in fs.items():
            if name not in d:
                if f.default is dataclasses.MISSING:
                    raise UsageError(f"{cls.__name__}: missing parameter {name!r}")
                continue
            kwargs[name] = _coerce(cls.__name__, name, str(f.type), d[name])
        return cls(**kwargs)


def _coerce(owner: str, name: str, typ: str, v: Any) -> Any:
    ok: bool
    if typ == "int":
        ok = isinstance(v, int) and not isinstance(v, bool)
    elif typ == "bool":
        ok = isinstance(v, bool)
    elif typ == "float":  # finite: a NaN or infinite constant would compute garbage, never refuse
        ok = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
        v = float(v) if ok else v
    elif typ == "str":
        ok = isinstance(v, str)
    elif typ.startswith("tuple[int"):
        ok = isinstance(v, list | tuple) and all(isinstance(x, int) and not isinstance(x, bool) for x in v)
        v = tuple(v) if ok else v
    elif typ.startswith("tuple[float"):
        ok = isinstance(v, list | tuple) and all(isinstance(x, int | float) and not isinstance(x, bool)
                                                  and math.isfinite(x) for x in v)
        v = tuple(float(x) for x in v) if ok else v
    else:  # pragma: no cover - a layer declared a field type this helper does not know
        raise UsageError(f"{owner}.{name}: unsupported parameter type {typ}")
    if not ok:
        raise UsageError(f"{owner}: parameter {name!r} must be {typ}, got {v!r}")
    return v


@dataclass(frozen=True)
class NoParams(Params):
    """Layers without parameters."""


def check(cond: bool, what: str) -> None:
    """Parameter validation that survives ``python -O``."""
    if not cond:
        raise UsageError(what)


@dataclass
class Runtime:
    """What an online protocol may read besides its inputs: this server's party, the comparison
    circuit, and its share of the deployed model (per weighted op)."""

    party: int
    circuit: Circuit
    model: dict[int, Any] = field(default_factory=dict)


@dataclass
class OpMaterial:
    """One op's preprocessing at run time: expanded items (per material spec) and what the
    offline phase stored for it (e.g. a linear op's F_i)."""

    mats: list[Material]
    stored: list[np.ndarray]


@dataclass
class DealContext:
    """What the dealer knows when deriving an op's material: plain model masks B and the circuit."""

    masks: dict[int, np.ndarray]
    circuit: Circuit


@dataclass
class Calibration:
    """Scales chosen by calibration: the input's scale f, weight bits per weighted op, observed float
    ranges per op (max |value|), what layers observed beyond that (:meth:`Layer.observe`), and every
    op's value scale (fraction bits; empty: f for every activation)."""

    f: int
    fw: dict[int, int]
    maxabs: list[float]
    stats: dict[int, dict[str, float]] = field(default_factory=dict)
    scales: list[int] = field(default_factory=list)

    def scale(self, i: int) -> int:
        return self.scales[i] if self.scales else self.f


class Layer(ABC):
    """One secure layer kind. Subclasses set ``kind`` and ``params`` and override what applies."""

    kind: ClassVar[str]
    params: ClassVar[type[Params]] = NoParams
    #: the value is an activation at scale f (calibration bounds it); False for pre-truncation values
    activation: ClassVar[bool] = True
    #: carries secret weights from the model owner (a bilinear op with model masks)
    weighted: ClassVar[bool] = False
    #: may end a plan (what the data owner receives)
    terminal: ClassVar[bool] = False
    #: items consumed by the offline precomputation (not expanded again online)
    offline_items: ClassVar[tuple[str, ...]] = ()
    #: how many inputs an op of this kind takes (least, most); plan validation checks it
    arity: ClassVar[tuple[int, int]] = (1, 1)
    #: how the value's fraction bits are set: ``join`` (the same as every input's), ``source`` (chosen by
    #: calibration; the op converts), ``derived`` (the input's plus the op's own bits: fw or scale_bits)
    scale_mode: ClassVar[str] = "join"

    def out_shape(self, op: Op, in_shapes: list[tuple[int, ...]]) -> tuple[int, ...] | None:
        """The output shape the op's inputs imply (None: not checkable here); validation compares."""
        return None

    def weight_shape(self, op: Op, cin: int) -> tuple[int, ...]:
        """Shape of a weighted op's weights (and of its model mask B) given its input channels."""
        raise UsageError(f"op kind {self.kind!r} carries no weights")

    def specs(self, op: Op, in_shapes: list[tuple[int, ...]], batch: int, circ: Circuit) -> list[MatSpec]:
        """Material one job of ``batch`` inputs consumes for this op (default: none, a local op)."""
        return []

    def derive(self, op: Op, i: int, ms: MatSpec, rand: dict[str, np.ndarray], ctx: DealContext
               ) -> dict[str, np.ndarray]:
        """Dealer: plain values of the derived items from the plain random ones."""
        return derive_material(ms, rand, ctx.circuit)

    def precompute(self, rt: Runtime, i: int, op: Op, mats: list[Material]) -> list[np.ndarray]:
        """Offline, at a server: what to store for the op given its full material (default: nothing)."""
        return []

    @abstractmethod
    def online(self, rt: Runtime, i: int, op: Op, ins: list[np.ndarray], mat: OpMaterial) -> Proto:
        """The op's protocol for one server (a generator of rounds returning the output share)."""

    @abstractmethod
    def reference(self, op: Op, ins: list[np.ndarray], weights: Any = None) -> np.ndarray:
        """The plaintext fixed-point result (int64) the secure run must match."""

    @abstractmethod
    def forward(self, op: Op, ins: list[torch.Tensor], weights: Any) -> torch.Tensor:
        """The float64 result (what calibration observes; for weighted ops, before rescaling)."""

    def value_scale(self, op: Op, in_scales: list[int], fw: int) -> int:
        """Fraction bits of a ``derived`` value (or a join reading one) from its inputs': a conv adds its
        weight bits, an interp its own bits."""
        if self.weighted:
            return in_scales[0] + fw
        return in_scales[0] + (self.scale_bits(op) if self.scale_mode == "derived" else 0)

    def scale_bits(self, op: Op) -> int:
        """Fraction bits this op's output carries above f (public weights; the next rescale removes them)."""
        return 0

    def scale_caps(self, op: Op, i: int, maxabs: list[float], stats: dict[int, dict[str, float]]) -> dict[int, int]:
        """The most fraction bits this op's protocol allows on its inputs or output, by value index
        (default: none beyond every value's own range)."""
        return {}

    def input_headroom(self, op: Op) -> int:
        """Extra bits this op needs above its input's range (argmax lifts values by the class bits)."""
        return 0

    def observe(self, op: Op, ins: list[np.ndarray], out: np.ndarray) -> dict[str, float] | None:
        """Statistics of the float values on the calibration samples this layer's scales need beyond
        max |output| (default: none)."""
        return None

    def calibrate(self, op: Op, i: int, cal: Calibration, ops: tuple[Op, ...]) -> Params:
        """The op's parameters once scales are chosen (default: unchanged)."""
        return op.params

    def validate_inputs(self, op: Op, srcs: list[Op]) -> None:
        """Refuse (UsageError) parameters that rely on what the input ops compute (default: none do)."""
        return None


class LocalLayer(Layer):
    """A layer computed locally on shares: no material, no rounds."""

    @abstractmethod
    def local(self, party: int, op: Op, ins: list[np.ndarray]) -> np.ndarray:
        """This server's output share (linear in the input shares)."""

    def online(self, rt: Runtime, i: int, op: Op, ins: list[np.ndarray], mat: OpMaterial) -> Proto:
        return self.local(rt.party, op, ins)
        yield  # a generator with no rounds  # noqa: B901

    def reference(self, op: Op, ins: list[np.ndarray], weights: Any = None) -> np.ndarray:
        return self.local(0, op, ins)


def windows(x: Any, k: int, stride: int) -> list[Any]:
    """The k^d strided views of every pooling window position over the spatial axes (row-major)."""
    import itertools

    spatial = x.shape[2:]
    outs = [(s - k) // stride + 1 for s in spatial]
    views = []
    for offs in itertools.product(range(k), repeat=len(spatial)):
        idx = (slice(None), slice(None), *(slice(o, o + stride * (n - 1) + 1, stride) for o, n in zip(offs, outs,
                                                                                                          strict=True)))
        views.append(x[idx])
    return views


def pooled_shape(shape: tuple[int, ...], k: int, stride: int) -> tuple[int, ...]:
    return (shape[0], *((s - k) // stride + 1 for s in shape[1:]))


Forward = Callable[..., Any]
