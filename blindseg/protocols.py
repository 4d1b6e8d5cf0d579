"""Secure layers as pure, I/O-free generator protocols for one server.

Each protocol is a generator: it yields :class:`Open` (shares to open this
round, arithmetic ones by addition mod 2^32, boolean words by XOR), receives
the opened values, and finally returns its output share. The runtime moves the
bytes; nothing here touches a socket, a clock or a global.

Costs are per server and per element unless stated; ``L`` = circuit levels
(2 with the default (3, 5) tree).

- :func:`linear` (any bilinear op f, Beaver with fixed model masks):
  open D = X - A (1 round, 4 B per input element); Z_i = F_i + f(D, B_i + i*E)
  with F_i = C_i + f(A_i, E) + bias_i precomputed offline. One ring conv online.
- :func:`trunc`: open c = x + 2^30 + r (1 round, 4 B);
  x >> s = (c_L >> s) + 2^(31-s) c_H - 2^(30-s) + u + (1 - 2c_H) v. Exact up to the carry out of
  the low s bits of x + r_L: the result is floor(x / 2^s) + B with B ~ Bernoulli(frac(x / 2^s)) over
  the dealer's r, i.e. unbiased stochastic rounding: mean error 0, |error| < 1 LSB, mean |error|
  2p(1-p) for fraction p (1/3 LSB over uniformly spread fractions, 1/2 at most). Valid for x in
  [-2^30, 2^30) (calibration keeps every value below 2^29).
- :func:`select` (fused truncation + ReLU; max when s = 0): the same opening of
  c, then the borrow circuit (``circuit.py``) gives sign bit b (L rounds,
  ``opened_bits`` bits), then e = b ^ rho is opened (1 round, 1 bit) and
  b * (x >> s) is linear in the dealer's rho, rho*u, rho*v. 2 + L rounds.
- :func:`leaky`: LeakyReLU as ReLU plus a second truncation of the negative part. 3 + L rounds.
- :func:`tournament_max`: max(a, b) = b + ReLU(a - b) per level (max-pool 2x2: 2 levels,
  3 comparisons per output); levels in pairs, the second speculative (its c opened for all four
  outcomes of the first while the first finishes): L + 3 rounds per pair instead of 2L + 4, the
  second level's material and c openings four times over.
- :func:`mul` (product of two secrets, y broadcast against x): open D = x - A, E = y - B (1 round,
  4 B per element of each); xy = C + D*B + A*E + D*E. :func:`square`: open D = x - A (1 round, 4 B);
  x^2 = C + 2*D*A + D^2.
- :func:`drelu`: [x >= 0] as an arithmetic share: the opening of c, the borrow circuit, then
  e = b ^ rho opened; b = e + rho - 2*e*rho. 2 + L rounds, 4 B + ``opened_bits`` bits + 1 bit.
- :func:`parallel`: independent protocols in lockstep, their openings of a round sent together.
- :func:`argmax`: values lifted to x * 2^bits + (K - 1 - k), tournament of
  max; the low ``bits`` of the maximum are the label. Only those bits leave.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import circuit as cc
from .bits import bitslice, nwords, pick_candidates, select_output, unslice
from .preprocessing import Material, tournament_steps


@dataclass
class Open:
    """One round: shares this server contributes to the openings."""

    arith: list[np.ndarray] = field(default_factory=list)
    boolean: list[np.ndarray] = field(default_factory=list)

    def combine(self, theirs: list[np.ndarray]) -> Opened:
        """The opened values, from the peer's shares in the same order (arithmetic: add; boolean: XOR)."""
        na = len(self.arith)
        return ([_into(np.add, a, b) for a, b in zip(self.arith, theirs[:na], strict=True)],
                [_into(np.bitwise_xor, a, b) for a, b in zip(self.boolean, theirs[na:], strict=True)])


def _into(op: Any, mine: np.ndarray, theirs: np.ndarray) -> np.ndarray:
    """op(mine, theirs), written over the peer's received array where that one is ours to reuse."""
    if theirs.flags.writeable and theirs.shape == mine.shape and theirs.dtype == mine.dtype:
        return op(mine, theirs, out=theirs)  # type: ignore[no-any-return]
    return op(mine, theirs)  # type: ignore[no-any-return]


Opened = tuple[list[np.ndarray], list[np.ndarray]]
Proto = Generator[Open, Opened, np.ndarray]

HALF = np.uint32(1 << 30)


def linear(x: np.ndarray, mat: Material, f_pre: np.ndarray, w_online: np.ndarray,
           f: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> Proto:
    """Beaver for a bilinear op ``f``: open D = X - A, then Z_i = F_i + f(D, B_i + i*E)."""
    (d,), _ = yield Open(arith=[x - mat["A"]])
    return f_pre + f(d, w_online)


def _public_part(c: np.ndarray, s: int) -> tuple[np.ndarray, np.ndarray]:
    """T = (c_L >> s) + 2^(31-s) c_H - 2^(30-s) and K = 1 - 2 c_H (ring elements)."""
    ch = c >> np.uint32(31)
    t = ((c & np.uint32(0x7FFFFFFF)) >> np.uint32(s)) + (ch << np.uint32(31 - s)) - np.uint32(1 << (30 - s))
    k = np.uint32(1) - (ch << np.uint32(1))
    return t, k


def _msb_term(share: np.ndarray, s: int) -> np.ndarray:
    """Shares of 2^(31-s) * bit from shares of the bit mod 2^(s+1) (narrow dtype)."""
    return share.astype(np.uint32) << np.uint32(31 - s)


def _masked(party: int, z: np.ndarray, r: np.ndarray, s: int) -> np.ndarray:
    """Shares of c = z + 2^30 + r (no rounding offset: the carry out of r's low bits already rounds)."""
    c = z + r
    if party == 0:
        c += HALF
    return c


def trunc(party: int, z: np.ndarray, mat: Material, s: int) -> Proto:
    """Dealer-assisted truncation by s: floor(x / 2^s) + Bernoulli(frac(x / 2^s)), unbiased. 1 round."""
    shape = z.shape
    (c,), _ = yield Open(arith=[_masked(party, z.reshape(-1), mat["r"], s)])
    t, k = _public_part(c, s)
    out = mat["u"] + k * _msb_term(mat["v"], s)
    if party == 0:
        out += t
    return out.reshape(shape)


def sign_bits(party: int, c: np.ndarray, mat: Material, circ: cc.Circuit) -> Generator[Open, Opened, np.ndarray]:
    """Shares of [x >= 0] (bit-sliced) from the public c = x + 2^30 + r, comparing bits ``circ.lo`` .. 29
    (``lo`` = s for ``x = z >> s``: :func:`circuit.compare_circuit`). L rounds."""
    lo, hi = circ.lo, circ.top
    if hi != cc.WIDTH:  # a bounded value (circuit.compare_circuit): the sign is bit `hi` of c + 2^hi - 2^30 - r
        c = c + np.uint32(((1 << hi) - (1 << cc.WIDTH)) & 0xFFFFFFFF)
    a = bitslice(c, 0, hi + 1)
    g, p = cc.level0(party, a[lo:hi], mat["rbits"][lo:hi], mat["rprods"], circ)
    for k, level in enumerate(circ.levels):
        _, (d,) = yield Open(boolean=[cc.open_vars(level, g, p, mat[f"mask{k}"])])
        g, p = cc.combine(party, level, g, p, d, mat[f"mask{k}"], mat[f"prod{k}"])
    ge = g[0] ^ mat["rbits"][hi]
    if party == 0:
        ge ^= a[hi]
    return ge


def _sign_then_e(party: int, c: np.ndarray, mat: Material, circ: cc.Circuit) -> Generator[Open, Opened, np.ndarray]:
    """From the opened c: the borrow circuit ``circ`` (L rounds), then open e = [t >= 0] ^ rho (1 round,
    bit-sliced words)."""
    ge = yield from sign_bits(party, c, mat, circ)
    _, (ew,) = yield Open(boolean=[ge ^ mat["rho"]])
    return ew


def _open_then_sign(party: int, z: np.ndarray, mat: Material, circ: cc.Circuit
                    ) -> Generator[Open, Opened, tuple[np.ndarray, np.ndarray]]:
    """Open c = z + 2^30 + r (1 round), then the borrow circuit (L rounds): (c, shares of [t >= 0])."""
    (c,), _ = yield Open(arith=[_masked(party, z.reshape(-1), mat["r"], 0)])
    ge = yield from sign_bits(party, c, mat, circ)
    return c, ge


def _opened_sign(party: int, z: np.ndarray, mat: Material, s: int, circ: cc.Circuit, bound: int = cc.WIDTH,
                 cmp: int | None = None) -> Generator[Open, Opened, tuple[np.ndarray, np.ndarray]]:
    """The rounds every comparison shares: open c = z + 2^30 + r, the borrow circuit, open
    e = [t >= 0] ^ rho (bit-sliced), t = z >> s as this opening truncates it (for s = 0, z itself; the
    same sign as z's, except that z in [2^30 - 2^s, 2^30) reads as negative). ``cmp``: compare from bit
    ``cmp`` instead of ``s`` (the sign of z >> cmp decides, z itself is selected). Returns (c, e words).
    2 + L rounds (L of :func:`circuit.compare_circuit`: 1 for s >= 12 or a ``bound`` of 18 bits or less)."""
    (c,), _ = yield Open(arith=[_masked(party, z.reshape(-1), mat["r"], s)])
    ew = yield from _sign_then_e(party, c, mat, cc.compare_circuit(circ, s if cmp is None else cmp, bound))
    return c, ew


def select_value(party: int, z: np.ndarray, mat: Material, s: int, circ: cc.Circuit, bound: int = cc.WIDTH,
                 cmp: int | None = None) -> Generator[Open, Opened, tuple[np.ndarray, np.ndarray]]:
    """(ReLU(z >> s), z >> s): the ReLU and the truncated value it selects from, same rounds as :func:`select`."""
    shape = z.shape
    c, ew = yield from _opened_sign(party, z, mat, s, circ, bound, cmp)
    out, value = select_output(party, c, ew, mat, s)  # e*value + (1-2e)(t*rho + rho*u + k*rho*v), fused
    return out.reshape(shape), value.reshape(shape)


def select(party: int, z: np.ndarray, mat: Material, s: int, circ: cc.Circuit, bound: int = cc.WIDTH,
           cmp: int | None = None) -> Proto:
    """ReLU(z >> s) (s = 0: ReLU(z); ``bound``: |z| < 2^bound by construction; ``cmp``: the sign read from
    bits ``cmp`` and up, see :func:`_opened_sign`). 2 + L rounds; the sign and truncation share one opening."""
    out, _ = yield from select_value(party, z, mat, s, circ, bound, cmp)
    return out


def leaky(party: int, z: np.ndarray, mats: list[Material], s: int, q: int | np.ndarray, g: int,
          circ: cc.Circuit) -> Proto:
    """LeakyReLU(z >> s) with public slope q / 2^g (one, or an array broadcast over z: PReLU per channel):
    p + trunc(q * (t - p), g), p = ReLU(t), t = z >> s. 3 + L rounds; 4 B per element more than ReLU."""
    pos, t = yield from select_value(party, z, mats[0], s, circ)
    low = yield from trunc(party, (t - pos) * (np.asarray(q) & 0xFFFFFFFF).astype(np.uint32), mats[1], g)
    return pos + low


def mul(party: int, x: np.ndarray, y: np.ndarray, mat: Material) -> Proto:
    """x * y for two secrets (y broadcast against x): Beaver with a fresh triple. 1 round."""
    (d, e), _ = yield Open(arith=[x - mat["A"], y - mat["B"]])
    z = mat["C"] + d * mat["B"] + mat["A"] * e
    if party == 0:
        z += d * e
    return z


def square(party: int, x: np.ndarray, mat: Material) -> Proto:
    """x^2 from a square pair (A, A^2). 1 round, 4 B per element."""
    (d,), _ = yield Open(arith=[x - mat["A"]])
    z = mat["C"] + np.uint32(2) * d * mat["A"]
    if party == 0:
        z += d * d
    return z


def drelu(party: int, z: np.ndarray, mat: Material, circ: cc.Circuit) -> Proto:
    """Arithmetic shares of [z >= 0] for z in [-2^30, 2^30). 2 + L rounds."""
    _, ew = yield from _opened_sign(party, z, mat, 0, circ)
    e = unslice(ew, z.size)
    out = (np.uint32(1) - (e << np.uint32(1))) * mat["rho_a"]
    if party == 0:
        out += e
    return out.reshape(z.shape)


def parallel(*protos: Generator[Open, Opened, Any]) -> Generator[Open, Opened, list[Any]]:
    """Run independent protocols side by side: each round opens what every unfinished one asks for
    (one message), so the rounds are those of the longest, not their sum."""
    results: list[Any] = [None] * len(protos)
    pending: dict[int, Open] = {}
    for k, g in enumerate(protos):
        try:
            pending[k] = next(g)
        except StopIteration as stop:
            results[k] = stop.value
    while pending:
        merged = Open([a for o in pending.values() for a in o.arith], [b for o in pending.values() for b in o.boolean])
        arith, boolean = yield merged
        ia = ib = 0
        nxt: dict[int, Open] = {}
        for k, o in pending.items():
            part = (arith[ia : ia + len(o.arith)], boolean[ib : ib + len(o.boolean)])
            ia += len(o.arith)
            ib += len(o.boolean)
            try:
                nxt[k] = protos[k].send(part)
            except StopIteration as stop:
                results[k] = stop.value
        pending = nxt
    return results


def tournament_max(party: int, cands: list[np.ndarray], mats: list[Material], circ: cc.Circuit,
                   bound: int = cc.WIDTH, cmp: int = 0) -> Proto:
    """Max over candidates (same shape) by levels of max(a, b) = b + ReLU(a - b), batched per level
    (``bound``: every candidate is in [0, 2^bound), so |a - b| < 2^bound; ``cmp`` > 0: each comparison
    reads a - b from bit ``cmp`` up, so the result is within 2^cmp of the max). Levels run in pairs
    (:func:`preprocessing.tournament_steps`), the second speculatively (:func:`_speculative_pair`):
    L + 3 rounds per pair of levels instead of 2L + 4."""
    compare = cc.compare_circuit(circ, cmp, bound)
    k = 0
    for step in tournament_steps(len(cands)):
        if len(step) == 2:
            cands = yield from _speculative_pair(party, cands, step, mats[k], mats[k + 1], compare)
            k += 2
            continue
        pairs = step[0]
        a = np.stack(cands[0 : 2 * pairs : 2])
        b = np.stack(cands[1 : 2 * pairs : 2])
        m = b + (yield from select(party, a - b, mats[k], 0, circ, bound, cmp))
        cands = list(m) + cands[2 * pairs :]
        k += 1
    return cands[0]


def _speculative_pair(party: int, cands: list[np.ndarray], step: tuple[int, ...], mat1: Material,
                      mat2: Material, circ: cc.Circuit) -> Generator[Open, Opened, list[np.ndarray]]:
    """Two tournament levels in L + 3 rounds (``circ`` the comparison's circuit, L its AND levels).

    1. Open c1 = a - b + 2^30 + r1 for the first level's pairs (1 round). Before its sign is known, each
       winner has two candidates, b + rho*t (if e1 = 0) and b + t - rho*t (if e1 = 1), t = a - b, both
       linear in c1 and the dealer's rho*r terms.
    2. In lockstep (L + 1 rounds): the first level's borrow circuit and e1 opening; and, for each
       second-level pair (X, Y), the four differences X^i - Y^j of its operands' candidates, each opened
       under its own mask r2_ij and run through the circuit with its own material (4x the second level's).
    3. e1 public picks, per element, the candidate (i, j) that is real; open e2 = b2_ij ^ rho2_ij for it
       only (1 round); the winner is Y^j + b2 * (X^i - Y^j).

    Nothing more is revealed: every opened value is masked by its own uniform mask, whichever candidate
    is real. A pass-through operand (an odd count) has one candidate, listed twice."""
    p1, p2 = step
    a = np.stack(cands[0 : 2 * p1 : 2])
    b = np.stack(cands[1 : 2 * p1 : 2])
    (c1,), _ = yield Open(arith=[_masked(party, (a - b).reshape(-1), mat1["r"], 0)])
    q, value = select_output(party, c1, np.zeros(nwords(c1.size), dtype=np.uint64), mat1, 0)  # the e = 0 output
    lo, hi = b + q.reshape(a.shape), b + (value - q).reshape(a.shape)
    first = [(lo[i], hi[i]) for i in range(p1)] + [(x, x) for x in cands[2 * p1 :]]
    x0, x1, y0, y1 = (np.stack([first[2 * j + side][which] for j in range(p2)]) for side, which in
                      ((0, 0), (0, 1), (1, 0), (1, 1)))
    z2 = np.concatenate([(u - v).reshape(-1) for u in (x0, x1) for v in (y0, y1)])  # candidate i * 2 + j
    ew1, (c2, ge2) = yield from parallel(_sign_then_e(party, c1, mat1, circ), _open_then_sign(party, z2, mat2, circ))
    n = a[0].size
    rows_x = np.array([2 * j if 2 * j < p1 else -1 for j in range(p2)], dtype=np.int64)
    rows_y = np.array([2 * j + 1 if 2 * j + 1 < p1 else -1 for j in range(p2)], dtype=np.int64)
    c2_sel, sel, e2, ey = pick_candidates(ew1, n, rows_x, rows_y, ge2, c2, mat2)
    _, (ew2,) = yield Open(boolean=[e2])
    out, _ = select_output(party, c2_sel, ew2, sel, 0)
    winners = np.where(ey.reshape(y0.shape).astype(bool), y1, y0) + out.reshape(y0.shape)
    tail = [lo_ for lo_, _ in first[2 * p2 :]]
    if 2 * p2 < p1:  # a first-level winner that skips the second level (an odd count of them)
        e1 = unslice(ew1, c1.size).reshape(a.shape).astype(bool)
        tail[: p1 - 2 * p2] = [np.where(e1[r], hi[r], lo[r]) for r in range(2 * p2, p1)]
    return list(winners) + tail


def argmax(party: int, classes: int, bits: int, z: np.ndarray, mats: list[Material], circ: cc.Circuit,
           cmp: int = 0) -> Proto:
    """Label shares mod 2^bits: tournament over the lifted channels x*2^b + (K-1-k) (``cmp``: comparisons
    read from bit ``cmp`` of the lifted differences, see :func:`tournament_max`)."""
    cands = []
    for k in range(classes):
        v = z[:, k] << np.uint32(bits)
        if party == 0:
            v += np.uint32(classes - 1 - k)
        cands.append(v)
    m = yield from tournament_max(party, cands, mats, circ, cmp=cmp)
    return (m & np.uint32((1 << bits) - 1)).astype(np.uint8 if bits <= 8 else np.uint16)
