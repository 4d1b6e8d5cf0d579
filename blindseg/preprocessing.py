"""What each plan op consumes from the dealer, and how a server expands its bundle.

A *bundle* is everything one job consumes. Each op's material is a list of
items (arithmetic uint32 arrays or bit-sliced uint64 words). An item is either

- *random*: both servers draw their share from their own PRG stream (so the
  secret value is uniform and known only to the dealer, who holds both seeds), or
- *derived*: a function of random items (e.g. Beaver C = f(A, B)); server 0
  draws its share from its PRG, server 1 receives ``value - share0`` (or XOR)
  as a *correction* -- the only offline bytes that must travel.

Server 0's bundle is therefore a 32-byte seed; server 1's is a seed plus the
corrections. PRG streams are per op (AES-CTR nonce = op index), so material
can be expanded op by op.

Material kinds:

- ``beaver``: A (random, input shape), C (derived, output shape).
- ``trunc``: r (random), u = -((r mod 2^31) >> s), v = 2^(31-s) * msb(r) (derived).
- ``select`` (ReLU, max, argmax): bits of r (random, 32 rows), rho (random bit),
  multi-AND masks per circuit level (random); r-bit pair products, mask
  products, r, u, v, rho, rho*u, rho*v (derived).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from .bits import nwords
from .circuit import Circuit, build_circuit
from .plan import LINEAR, Op, Plan
from .prg import Prg

DEFAULT_ARITIES = (3, 3, 2)


@dataclass(frozen=True)
class Item:
    """One array of preprocessing material."""

    name: str
    kind: str  # "arith" (additive mod 2^width) or "bool" (uint64 words, XOR)
    shape: tuple[int, ...]
    derived: bool
    width: int = 32  # arith only: shares live mod 2^width (8, 16 or 32 bits)

    @property
    def dtype(self) -> Any:
        if self.kind == "bool":
            return np.uint64
        return {8: np.uint8, 16: np.uint16}.get(self.width, np.uint32)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize


@dataclass(frozen=True)
class MatSpec:
    """One protocol instance's material: kind, sizes and its items (random first, then derived)."""

    kind: str  # "beaver" | "trunc" | "select"
    n: int  # elements (select/trunc)
    shift: int
    items: tuple[Item, ...]


def beaver_spec(in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> MatSpec:
    return MatSpec("beaver", 0, 0, (Item("A", "arith", in_shape, False), Item("C", "arith", out_shape, True)))


def msb_width(shift: int) -> int:
    """v = 2^(31-s) * msb(r) only needs shares of msb(r) mod 2^(s+1): the narrowest dtype that holds them."""
    return 8 if shift + 1 <= 8 else 16 if shift + 1 <= 16 else 32


def trunc_spec(n: int, shift: int) -> MatSpec:
    w = msb_width(shift)
    return MatSpec(
        "trunc", n, shift,
        (Item("r", "arith", (n,), False), Item("u", "arith", (n,), True), Item("v", "arith", (n,), True, w)),
    )


def select_spec(n: int, shift: int, circuit: Circuit) -> MatSpec:
    nw = nwords(n)
    items = [Item("rbits", "bool", (32, nw), False), Item("rho", "bool", (nw,), False)]
    items += [Item(f"mask{k}", "bool", (lv.nvars, nw), False) for k, lv in enumerate(circuit.levels)]
    items.append(Item("rpairs", "bool", (circuit.groups, nw), True))
    items += [Item(f"prod{k}", "bool", (len(lv.subsets), nw), True) for k, lv in enumerate(circuit.levels)]
    w = msb_width(shift)
    items += [Item(name, "arith", (n,), True, w if name in ("v", "rho_v") else 32)
              for name in ("r", "u", "v", "rho_a", "rho_u", "rho_v")]
    return MatSpec("select", n, shift, tuple(items))


def tournament(count: int) -> list[int]:
    """Pairs compared at each level of a max tournament over ``count`` candidates."""
    levels = []
    while count > 1:
        levels.append(count // 2)
        count = count - count // 2
    return levels


def op_specs(plan: Plan, i: int, batch: int, circuit: Circuit) -> list[MatSpec]:
    """The material op ``i`` consumes for a batch of ``batch`` images."""
    op: Op = plan.ops[i]
    if op.kind in LINEAR:
        src = plan.ops[op.inputs[0]].shape
        return [beaver_spec((batch, *src), (batch, *op.shape))]
    n = batch * int(np.prod(op.shape))
    if op.kind == "rescale":
        s = int(op.p("shift"))
        return [select_spec(n, s, circuit)] if op.p("relu") else [trunc_spec(n, s)]
    if op.kind == "maxpool":
        return [select_spec(p * n, 0, circuit) for p in tournament(int(op.p("kernel")) ** 2)]
    if op.kind == "argmax":
        return [select_spec(p * n, 0, circuit) for p in tournament(int(op.p("classes")))]
    return []


@dataclass(frozen=True)
class Layout:
    """The whole job's material, per op."""

    plan: Plan
    batch: int
    circuit: Circuit
    specs: tuple[tuple[MatSpec, ...], ...]

    @staticmethod
    def of(plan: Plan, batch: int, arities: tuple[int, ...] = DEFAULT_ARITIES) -> Layout:
        circuit = build_circuit(30, arities)
        return Layout(plan, batch, circuit, tuple(tuple(op_specs(plan, i, batch, circuit)) for i in range(len(plan.ops))))

    def material_bytes(self) -> int:
        """One server's expanded material for the whole job (upper bound: every item, both kinds)."""
        return sum(it.nbytes for op in self.specs for ms in op for it in ms.items)

    def correction_bytes(self, op: int | None = None) -> int:
        """Bytes of derived items (server 1's corrections) for one op, or the whole job."""
        ops = self.specs if op is None else (self.specs[op],)
        return sum(it.nbytes for specs in ops for ms in specs for it in ms.items if it.derived)


def draw(prg: Prg, item: Item) -> np.ndarray:
    """A share of ``item`` from a PRG stream."""
    n = int(np.prod(item.shape))
    return prg.bytes_(n * np.dtype(item.dtype).itemsize).view(item.dtype).reshape(item.shape)


Material = dict[str, np.ndarray]


def expand_op(
    specs: tuple[MatSpec, ...], party: int, seed: bytes, op_index: int, corrections: Iterator[np.ndarray] | None,
    skip: tuple[str, ...] = (),
) -> list[Material]:
    """Server side: this party's shares of op ``op_index``'s material (PRG stream = op index).

    Items named in ``skip`` are left out (derived items only, which come after
    every random item in the stream, so the stream stays aligned).
    """
    prg = Prg(seed, stream=op_index)
    out = []
    for ms in specs:
        mat: Material = {}
        for it in ms.items:
            if it.name in skip:
                continue
            if it.derived and party == 1:
                if corrections is None:
                    raise ValueError("server 1 needs corrections to expand derived items")
                arr = next(corrections)
                if arr.dtype != it.dtype or arr.shape != it.shape:
                    from .errors import ProtocolError

                    raise ProtocolError(f"bundle item {it.name} of op {op_index} has the wrong dtype or shape")
                mat[it.name] = arr
            else:
                mat[it.name] = draw(prg, it)
        out.append(mat)
    return out
