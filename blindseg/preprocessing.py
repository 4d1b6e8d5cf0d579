"""Preprocessing material: items, the delivery rule, the dealer's half of an op, server expansion.

A *bundle* is everything one job consumes. Each op's material is a list of
items (arithmetic uint32 arrays or bit-sliced uint64 words). An item is either

- *random*: both servers draw their share from their own PRG stream (so the
  secret value is uniform and known only to the dealer, who holds both seeds), or
- *derived*: a function of random items (e.g. Beaver C = f(A, B)); server 0
  draws its share from its PRG, server 1 receives ``value - share0`` (or XOR)
  as a *correction* -- the only offline bytes that must travel.

Who receives what is decided in one place, :func:`by_correction`. Server 0's bundle is therefore a 32-byte seed; server 1's is a seed plus the
corrections. PRG streams are per op (AES-CTR nonce = op index), so material
can be expanded op by op.

Material kinds:

- ``beaver``: A (random, input shape), C (derived, output shape).
- ``trunc``: r (random), u = -((r mod 2^31) >> s), v = 2^(31-s) * msb(r) (derived).
- ``select`` (ReLU, max, argmax): bits of r (random, 32 rows), rho (random bit),
  multi-AND masks per circuit level (random); products of r's bits per level-0 group, mask
  products, r, u, v, rho, rho*u, rho*v (derived).
- ``sign`` ([x >= 0] as an arithmetic share): ``select``'s items without u, v, rho*u, rho*v.
- ``mul`` (product of two secrets, the second broadcast against the first): A, B (random),
  C = A * B (derived). ``square``: A (random), C = A^2 (derived).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from .bits import nwords, select_material, unslice
from .circuit import WIDTH, Circuit, compare_circuit, group_products, mask_products
from .errors import ProtocolError, UsageError
from .prg import Prg


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

    kind: str  # "beaver" | "trunc" | "select" | "sign" | "mul" | "square"
    n: int  # elements (select/trunc)
    shift: int
    items: tuple[Item, ...]
    bound: int = WIDTH  # select: |value| < 2^bound by construction (circuit.compare_circuit)
    compare: int = 0  # select: the comparison's low bit (= shift for a truncating ReLU; an argmax's resolution)


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


def _circuit_items(n: int, circuit: Circuit) -> list[Item]:
    """The comparison's items: r's bits and rho (random), multi-AND masks (random), their products (derived)."""
    nw = nwords(n)
    items = [Item("rbits", "bool", (32, nw), False), Item("rho", "bool", (nw,), False)]
    items += [Item(f"mask{k}", "bool", (lv.nvars, nw), False) for k, lv in enumerate(circuit.levels)]
    items.append(Item("rprods", "bool", (len(circuit.prod_subsets), nw), True))
    items += [Item(f"prod{k}", "bool", (len(lv.subsets), nw), True) for k, lv in enumerate(circuit.levels)]
    return items


def select_spec(n: int, shift: int, circuit: Circuit, bound: int = WIDTH, compare: int | None = None) -> MatSpec:
    """The fused truncation by ``shift`` and ReLU (of a value below 2^bound): its comparison runs
    :func:`compare_circuit` from bit ``compare`` (default ``shift``; an argmax compares from a higher bit
    than the value it selects)."""
    cmp = shift if compare is None else compare
    items = _circuit_items(n, compare_circuit(circuit, cmp, bound))
    w = msb_width(shift)
    items += [Item(name, "arith", (n,), True, w if name in ("v", "rho_v") else 32)
              for name in ("r", "u", "v", "rho_a", "rho_u", "rho_v")]
    return MatSpec("select", n, shift, tuple(items), bound, cmp)


def sign_spec(n: int, circuit: Circuit) -> MatSpec:
    items = _circuit_items(n, circuit) + [Item("r", "arith", (n,), True), Item("rho_a", "arith", (n,), True)]
    return MatSpec("sign", n, 0, tuple(items))


def mul_spec(shape: tuple[int, ...], other: tuple[int, ...]) -> MatSpec:
    """Beaver triple for x * y with x of ``shape`` and y of ``other`` (broadcast against x)."""
    return MatSpec("mul", 0, 0, (Item("A", "arith", shape, False), Item("B", "arith", other, False),
                                 Item("C", "arith", shape, True)))


def square_spec(shape: tuple[int, ...]) -> MatSpec:
    return MatSpec("square", 0, 0, (Item("A", "arith", shape, False), Item("C", "arith", shape, True)))


def tournament(count: int) -> list[int]:
    """Pairs compared at each level of a max tournament over ``count`` candidates."""
    levels = []
    while count > 1:
        levels.append(count // 2)
        count = count - count // 2
    return levels


def tournament_steps(count: int) -> list[tuple[int, ...]]:
    """The tournament's levels as the protocol runs them: consecutive levels in pairs (the second one
    speculative, :func:`protocols.tournament_max`), a last odd level alone."""
    levels = tournament(count)
    return [tuple(levels[i : i + 2]) for i in range(0, len(levels), 2)]


def tournament_specs(count: int, n: int, circuit: Circuit, bound: int = WIDTH, compare: int = 0) -> list[MatSpec]:
    """Material of a max tournament over ``count`` candidates of ``n`` elements: one select per level,
    the speculative second level of a pair four times over (one per outcome of the two comparisons
    that feed it)."""
    out = []
    for step in tournament_steps(count):
        out += [select_spec(k * p * n, 0, circuit, bound, compare) for k, p in zip((1, 4), step, strict=False)]
    return out


# ------------------------------------------------------------ delivery rule


def by_correction(item: Item, party: int) -> bool:
    """The one delivery rule: does ``party`` receive ``item`` as a correction from the dealer?

    Random items: never (both servers draw their share from their own PRG stream).
    Derived items: server 1 receives ``value - share0`` (XOR for bits); server 0 draws its
    share from its stream. Dealer, servers and tests all ask this function.
    """
    return item.derived and party == 1


def corrections_of(specs: tuple[MatSpec, ...] | list[MatSpec], party: int) -> list[Item]:
    """The items of one op that ``party`` receives as corrections, in stream order."""
    return [it for ms in specs for it in ms.items if by_correction(it, party)]


def derive_material(ms: MatSpec, rand: dict[str, np.ndarray], circ: Circuit) -> dict[str, np.ndarray]:
    """Plain values of the derived items of a ``trunc``, ``select``, ``sign``, ``mul`` or ``square`` spec
    from its random items (``beaver`` needs the op's bilinear function: the linear layer derives it)."""
    if ms.kind == "mul":
        return {"C": rand["A"] * rand["B"]}
    if ms.kind == "square":
        return {"C": rand["A"] * rand["A"]}
    s = ms.shift
    r = rand["r"] if ms.kind == "trunc" else unslice(rand["rbits"], ms.n)
    if ms.kind == "trunc":  # v's items carry msb(r) mod 2^(s+1); the server shifts by 31 - s
        return {"u": np.uint32(0) - ((r & np.uint32(0x7FFFFFFF)) >> np.uint32(s)), "v": r >> np.uint32(31)}
    if ms.kind not in ("select", "sign"):
        raise UsageError(f"material kind {ms.kind!r} has no generic derivation")
    rb = rand["rbits"]
    circ = compare_circuit(circ, ms.compare, ms.bound)
    out = {"rprods": group_products(circ, rb[circ.lo:circ.top])}
    for k, level in enumerate(circ.levels):
        out[f"prod{k}"] = mask_products(level, rand[f"mask{k}"])
    if ms.kind == "sign":
        out.update(r=r, rho_a=unslice(rand["rho"], ms.n))
        return out
    v_dtype = next(it.dtype for it in ms.items if it.name == "v")
    u, msb, rho, rho_u, rho_v = select_material(r, rand["rho"], s, v_dtype)
    out.update(r=r, u=u, v=msb, rho_a=rho, rho_u=rho_u, rho_v=rho_v)
    return out


Derive = Callable[[MatSpec, dict[str, np.ndarray]], dict[str, np.ndarray]]


def deal_op(specs: tuple[MatSpec, ...] | list[MatSpec], seed0: bytes, seed1: bytes, op_index: int,
            derive: Derive) -> list[np.ndarray]:
    """Dealer side of one op: the corrections server 1 receives (per :func:`by_correction`).

    The dealer replays both servers' PRG streams for the op, adds (XORs) the two shares of every
    random item to get its value, derives the dependent values, and returns ``value - share0``."""
    prg0, prg1 = Prg(seed0, stream=op_index), Prg(seed1, stream=op_index)
    out: list[np.ndarray] = []
    for ms in specs:
        rand: dict[str, np.ndarray] = {}
        for it in ms.items:
            if not it.derived:
                a0, a1 = draw(prg0, it), draw(prg1, it)  # fresh arrays: combined in place
                rand[it.name] = np.add(a0, a1, out=a0) if it.kind == "arith" else np.bitwise_xor(a0, a1, out=a0)
        values = derive(ms, rand)
        del rand
        for it in ms.items:
            if by_correction(it, 1):
                share0 = draw(prg0, it)  # a fresh array: the correction is written over it
                val = values[it.name].astype(it.dtype, copy=False)
                out.append(np.subtract(val, share0, out=share0) if it.kind == "arith"
                           else np.bitwise_xor(val, share0, out=share0))
    return out


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
            if by_correction(it, party):
                if corrections is None:
                    raise UsageError("server 1 needs corrections to expand derived items")
                arr = next(corrections)
                if arr.dtype != it.dtype or arr.shape != it.shape:
                    raise ProtocolError(f"bundle item {it.name} of op {op_index} has the wrong dtype or shape")
                mat[it.name] = arr
            else:
                mat[it.name] = draw(prg, it)
        out.append(mat)
    return out
