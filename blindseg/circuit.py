"""The borrow circuit behind every comparison: [a < r] for public a, shared r.

Used by SecReLU / SecMaxPool / argmax (see ``protocols.py``): with c = x' + r
opened, the sign of x is c_30 XOR r_30 XOR [c mod 2^30 < r mod 2^30].

Steps (all on bit-sliced words, 64 elements per uint64):

- level 0, local: bits are grouped (pairs, or groups of up to 6 bits). With a public, a group's
  borrow generate G = [a_grp < r_grp] and propagate P = [a_grp == r_grp] are linear in the dealer's
  shares of the products r_S of the group's bits (S of size >= 2; the bits themselves for |S| = 1):
  G = XOR_i XOR_{S above i} ~a_i prod_{j above i, not in S} ~a_j * r_{S + i},
  P = XOR_S prod_{j not in S} ~a_j * r_S (r_{} = 1); for a pair (hi, lo) that is
  G = ~a_h r_h ^ ~a_h ~a_l r_l ^ ~a_l (r_h r_l), P = ~a_h ~a_l ^ ~a_h r_l ^ ~a_l r_h ^ r_h r_l.
- levels 1..L, one round each: nodes of k children (low -> high) combine as
  G = XOR_t G_t * prod_{s>t} P_s, P = prod_t P_t. Every monomial of a level
  is evaluated in one round with dealer *multi-AND tuples*: each variable x is
  opened as d = x ^ alpha, and prod_{i in M} x_i = XOR_{S subset M}
  (prod_{i not in S} d_i) * [alpha_S], the dealer supplying shares of alpha_S
  for every |S| >= 2. P is computed only where an ancestor needs it.

Cost per element: ``opened_bits`` bits sent per server, ``len(levels)``
rounds, ``derived_bits`` bits of dealer corrections to server 1.

A truncating comparison (the fused ReLU of ``z >> s``) needs only bits s..29 (:func:`compare_circuit`):
c >> s - r >> s is the truncated value itself (the truncation's rounding bit is the borrow out of the
low s bits), so its sign, read from bits s..30, is the sign of what the ReLU selects. From s = 12 on that
narrow comparison fits one AND level over 3-4 groups of 2-5 bits: 3 rounds per ReLU instead of 4.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from itertools import combinations

import numba as nb
import numpy as np

ALL = np.uint64(0xFFFFFFFFFFFFFFFF)
WIDTH = 30  # the full comparison: values live in [-2^30, 2^30), the sign is bit 30 of c - r


@dataclass(frozen=True)
class Node:
    """One node of a level: children are indices into the previous level (low -> high)."""

    children: tuple[int, ...]
    need_p: bool


@dataclass(frozen=True)
class Level:
    """One AND round: which previous-level values are opened and which monomials are built."""

    nodes: tuple[Node, ...]
    variables: tuple[tuple[int, int], ...]  # (child index in previous level, 0 = G / 1 = P)
    monomials: tuple[tuple[int, ...], ...]  # variable indices, each of size >= 2
    subsets: tuple[tuple[int, ...], ...]  # mask products the dealer supplies (size >= 2)
    node_g: tuple[tuple[int, ...], ...]  # monomials XORed into each node's G
    node_p: tuple[int, ...]  # monomial giving each node's P, -1 if not needed

    @property
    def nvars(self) -> int:
        return len(self.variables)


@dataclass(frozen=True)
class Circuit:
    """The whole borrow circuit for ``width`` bits starting at bit ``lo`` (bits lo .. lo + width - 1 of
    c and r, compared; the sign at bit ``top`` = lo + width; level-0 groups of ``group_bits`` bits, low
    to high)."""

    width: int
    need_p0: tuple[bool, ...]  # level-0 groups whose P is needed
    levels: tuple[Level, ...]
    group_bits: tuple[int, ...] = ()
    lo: int = 0

    @property
    def groups(self) -> int:
        return len(self.group_bits)

    @property
    def prod_subsets(self) -> tuple[tuple[int, ...], ...]:
        """The products of r's bits level 0 needs (bit indices from ``lo``): every subset of size >= 2 of
        each group, group by group (for pairs: one product per pair, low bit first)."""
        out: list[tuple[int, ...]] = []
        start = 0
        for k in self.group_bits:
            bits = range(start, start + k)
            out += [c for n in range(2, k + 1) for c in combinations(bits, n)]
            start += k
        return tuple(out)

    @property
    def top(self) -> int:
        return self.lo + self.width

    @property
    def pairs(self) -> bool:
        return all(k == 2 for k in self.group_bits)

    @property
    def rounds(self) -> int:
        return len(self.levels)

    @property
    def opened_bits(self) -> int:
        return sum(lv.nvars for lv in self.levels)

    @property
    def derived_bits(self) -> int:
        return len(self.prod_subsets) + sum(len(lv.subsets) for lv in self.levels)


MAX_GROUP = 6  # level-0 group width limit: a k-bit group needs 2^k - k - 1 dealer products


def build_circuit(width: int = WIDTH, arities: tuple[int, ...] = (3, 5), group: int = 2, lo: int = 0,
                  group_bits: tuple[int, ...] | None = None) -> Circuit:
    """Build the tree: level-0 groups of ``group`` bits (an odd bit left over joins the top group), or
    of ``group_bits`` bits (low to high), then levels of the given arities (then binary)."""
    if group_bits is None:
        if not 1 <= group <= MAX_GROUP or width < group:
            raise ValueError(f"circuit width {width} / group {group} out of range")
        gb = [group] * (width // group)
        gb[-1] += width % group
    else:
        gb = list(group_bits)
    if width < 2 or sum(gb) != width or not all(1 <= k <= MAX_GROUP for k in gb) or lo < 0 or lo + width > WIDTH:  # the sign bit
        raise ValueError(f"circuit width {width} / groups {gb} / lo {lo} out of range")
    n = len(gb)
    tree: list[list[tuple[int, ...]]] = []  # per level: children tuples
    count = n
    depth = 0
    while count > 1:
        k = arities[depth] if depth < len(arities) else 2
        chunks = [tuple(range(i, min(i + k, count))) for i in range(0, count, k)]
        tree.append(chunks)
        count = len(chunks)
        depth += 1
    # need_p top-down: root needs none; child t>0 always needed (for lower G terms).
    need: list[list[bool]] = [[False] * len(tree[-1])] if tree else [[False]]
    for lvl in range(len(tree) - 1, -1, -1):
        parent_need = need[0]
        child_need = [False] * sum(len(c) for c in tree[lvl])
        for p, chunk in enumerate(tree[lvl]):
            for t, child in enumerate(chunk):
                child_need[child] = t > 0 or parent_need[p]
        need.insert(0, child_need)
    levels = []
    for lvl, chunks in enumerate(tree):
        variables: list[tuple[int, int]] = []
        index: dict[tuple[int, int], int] = {}

        def var(key: tuple[int, int], variables: list[tuple[int, int]] = variables,
                index: dict[tuple[int, int], int] = index) -> int:
            if key not in index:
                index[key] = len(variables)
                variables.append(key)
            return index[key]

        monomials: list[tuple[int, ...]] = []
        node_g: list[tuple[int, ...]] = []
        node_p: list[int] = []
        nodes = []
        for p, chunk in enumerate(chunks):
            need_p = need[lvl + 1][p]
            nodes.append(Node(chunk, need_p))
            g_terms = []
            for t in range(len(chunk) - 1):  # top child's G is a degree-1 term, kept local
                mono = (var((chunk[t], 0)),) + tuple(var((chunk[s], 1)) for s in range(t + 1, len(chunk)))
                monomials.append(mono)
                g_terms.append(len(monomials) - 1)
            node_g.append(tuple(g_terms))
            if need_p and len(chunk) > 1:
                monomials.append(tuple(var((c, 1)) for c in chunk))
                node_p.append(len(monomials) - 1)
            else:
                node_p.append(-1)
        subsets = sorted(
            {s for m in monomials for r in range(2, len(m) + 1) for s in combinations(sorted(m), r)},
            key=lambda s: (len(s), s),
        )
        levels.append(
            Level(tuple(nodes), tuple(variables), tuple(monomials), tuple(subsets), tuple(node_g), tuple(node_p))
        )
    return Circuit(width, tuple(need[0]), tuple(levels), tuple(gb), lo)


@lru_cache(maxsize=64)
def compare_circuit(base: Circuit, shift: int, bound: int = WIDTH) -> Circuit:
    """The circuit a comparison of ``z >> shift`` runs (module docstring): ``base`` for shift 0; else
    bits ``shift`` .. 29 only. ``bound`` < 30 (shift 0): z is known by construction to lie in
    [-2^bound, 2^bound) (a max-pool of truncated ReLU outputs), so bits 0 .. bound - 1 decide, the sign at
    bit ``bound`` of c + 2^bound - 2^30 - r. Either way in one AND level over 2-4 balanced groups of up
    to 5 bits (the grouping with the fewest dealer bits) when that needs no more dealer bits than ``base``
    (from 18 bits down), otherwise ``base``'s pairs and level arities on the narrower width."""
    if bound < base.width and shift:
        raise ValueError("a comparison is either truncating or of a bounded value, not both")
    if shift <= 0 and bound >= base.width:
        return base
    lo, width = (shift, base.width - shift) if shift > 0 else (0, bound)
    if width < 2:
        raise ValueError(f"a comparison of {width} bits (shift {shift}, bound {bound}) is not supported")
    ones = [build_circuit(width, (m,) if m > 1 else (), lo=lo,
                          group_bits=tuple(width // m + (1 if i >= m - width % m else 0) for i in range(m)))
            for m in range(-(-width // 5), min(4, width) + 1)]
    one = min(ones, key=lambda c: c.derived_bits, default=None)
    if one is not None and one.derived_bits <= base.derived_bits:
        return one
    arities = tuple(len(lv.nodes[0].children) for lv in base.levels)
    return build_circuit(width, arities, 2, lo) if width >= 4 else build_circuit(width, (), width, lo)


# ---------------------------------------------------------------- pure steps


def level0(party: int, a_words: np.ndarray, r_bits: np.ndarray, r_prods: np.ndarray,
           circ: Circuit) -> tuple[np.ndarray, np.ndarray]:
    """Local level 0: G, P shares of each group. a_words: public (width, nw); r_bits: shares of r's
    compared bits (width, nw); r_prods: shares of the products ``circ.prod_subsets``. Bit pairs: the
    written-out formulas; wider groups: :func:`_group_terms` in one numba pass."""
    if circ.pairs:
        na = ~a_words
        nl, nh = na[0::2], na[1::2]
        rl, rh = r_bits[0::2], r_bits[1::2]
        g = (nh & rh) ^ (nh & nl & rl) ^ (nl & r_prods)
        p = (nh & rl) ^ (nl & rh) ^ r_prods
        if party == 0:
            p ^= nh & nl
        return g, p
    out, pub_ptr, pub, sec = _group_terms(circ)
    nw = a_words.shape[1]
    g = np.empty((circ.groups, nw), dtype=np.uint64)
    p = np.empty((circ.groups, nw), dtype=np.uint64)
    c = np.ascontiguousarray
    prods = c(r_prods) if len(r_prods) else np.zeros((1, nw), dtype=np.uint64)
    _level0_kernel(c(a_words), c(r_bits), prods, out, pub_ptr, pub, sec, party, circ.width, g, p)
    return g, p


@lru_cache(maxsize=64)
def _group_terms(circ: Circuit) -> tuple[np.ndarray, ...]:
    """Level 0 of ``circ`` as flat terms (module docstring): per term its output row (group * 2, + 1 for
    P), the public bits whose complements it ANDs, and its secret factor (a bit index < width, width +
    a product index, or -1: the public constant 1, party 0 only)."""
    prod_index = {sub: i for i, sub in enumerate(circ.prod_subsets)}
    out, pub_ptr, pub, sec = [], [0], list[int](), []

    def term(row: int, public: list[int], secret: tuple[int, ...]) -> None:
        out.append(row)
        pub.extend(public)
        pub_ptr.append(len(pub))
        sec.append(-1 if not secret else secret[0] if len(secret) == 1 else circ.width + prod_index[secret])

    start = 0
    for gi, k in enumerate(circ.group_bits):
        bits = list(range(start, start + k))
        for i in bits:  # G: bit i is where r first exceeds a, the bits above it are equal
            above = [j for j in bits if j > i]
            for n in range(len(above) + 1):
                for sub in combinations(above, n):
                    term(2 * gi, [i] + [j for j in above if j not in sub], tuple(sorted((i, *sub))))
        for n in range(k + 1):  # P: every bit equal
            for sub in combinations(bits, n):
                term(2 * gi + 1, [j for j in bits if j not in sub], sub)
        start += k
    i64 = np.int64
    return np.array(out, i64), np.array(pub_ptr, i64), np.array(pub + [0], i64), np.array(sec, i64)


@nb.njit(parallel=True, cache=True, nogil=True)
def _level0_kernel(a, rb, prods, out, pub_ptr, pub, sec, party, width, g, p):  # pragma: no cover - numba
    # The same term walk as _combine_kernel (a factor from one of three sources, ANDed with a list of
    # public words), over another table; kept apart so each hot loop stays one flat numba loop. Blocks of
    # _BLOCK words, each term's AND chain a vectorised loop over the block (word by word it was 5-10x slower).
    nw = a.shape[1]
    for blk in nb.prange((nw + _BLOCK - 1) // _BLOCK):
        w0 = blk * _BLOCK
        w1 = min(w0 + _BLOCK, nw)
        g[:, w0:w1] = 0
        p[:, w0:w1] = 0
        acc = np.empty(w1 - w0, dtype=np.uint64)
        for t in range(out.shape[0]):
            x = sec[t]
            if x < 0:
                if party != 0:
                    continue
                acc[:] = ALL
            elif x < width:
                acc[:] = rb[x, w0:w1]
            else:
                acc[:] = prods[x - width, w0:w1]
            for k in range(pub_ptr[t], pub_ptr[t + 1]):
                row = a[pub[k], w0:w1]
                for w in range(w1 - w0):
                    acc[w] &= ~row[w]
            r = out[t]
            dst = g[r // 2, w0:w1] if r % 2 == 0 else p[r // 2, w0:w1]
            for w in range(w1 - w0):
                dst[w] ^= acc[w]


def group_products(circ: Circuit, r_bits: np.ndarray) -> np.ndarray:
    """Dealer side: the plain products of r's compared bits that level 0 needs (``circ.prod_subsets``;
    r_bits: the compared bits, (width, nw))."""
    subs = circ.prod_subsets
    out = np.empty((len(subs), r_bits.shape[1]), dtype=np.uint64)
    for i, sub in enumerate(subs):
        acc = r_bits[sub[0]].copy()
        for j in sub[1:]:
            acc &= r_bits[j]
        out[i] = acc
    return out


def open_vars(level: Level, g: np.ndarray, p: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Shares of d = x ^ alpha for the level's variables (what this server sends)."""
    out = np.empty((level.nvars, g.shape[1]), dtype=np.uint64)
    for i, (child, which) in enumerate(level.variables):
        out[i] = (p if which else g)[child] ^ masks[i]
    return out


@lru_cache(maxsize=64)
def _program(level: Level) -> tuple[np.ndarray, ...]:
    """The level's combine step as flat tables for :func:`_combine_kernel`: one term per (monomial,
    non-empty subset S of it) = alpha_S AND the opened d of the rest, the party-0-only terms (the
    product of all d) last; then per node, its top child and the monomials XORed into its G."""
    sub_index = {s: i for i, s in enumerate(level.subsets)}
    t_mono, t_alpha, rest, ptr = [], [], [], [0]
    for full in (False, True):
        for mi, m in enumerate(level.monomials):
            ms = tuple(sorted(m))
            for s in ([()] if full else [c for r in range(1, len(ms) + 1) for c in combinations(ms, r)]):
                t_mono.append(mi)
                t_alpha.append(-1 if not s else s[0] if len(s) == 1 else level.nvars + sub_index[s])
                rest += [i for i in ms if i not in s]
                ptr.append(len(rest))
    common = len(t_mono) - len(level.monomials)
    g_ptr, g_idx = [0], list[int]()
    for ni in range(len(level.nodes)):
        g_idx += level.node_g[ni]
        g_ptr.append(len(g_idx))
    last = [n.children[-1] for n in level.nodes]
    p_child = [n.children[0] if level.node_p[ni] < 0 and len(n.children) == 1 else -1
               for ni, n in enumerate(level.nodes)]
    i64 = np.int64
    return (np.array(t_mono, i64), np.array(t_alpha, i64), np.array(ptr, i64), np.array(rest + [0], i64),
            np.array([common, len(t_mono)], i64), np.array(last, i64), np.array(g_ptr, i64),
            np.array(g_idx + [0], i64), np.array(level.node_p, i64), np.array(p_child, i64))


_BLOCK = 256  # words per block of the level-0 and combine kernels: their rows stay in cache while every term runs


@nb.njit(parallel=True, cache=True, nogil=True)
def _combine_kernel(d, masks, prods, nvars, t_mono, t_alpha, ptr, rest, nterms, mono, g, p, last, g_ptr, g_idx,
                    node_p, p_child, gn, pn):  # pragma: no cover - numba
    nw = d.shape[1]
    for b in nb.prange((nw + _BLOCK - 1) // _BLOCK):
        w0 = b * _BLOCK
        w1 = min(w0 + _BLOCK, nw)
        mono[:, w0:w1] = 0
        for t in range(nterms):
            a = t_alpha[t]
            mi = t_mono[t]
            for w in range(w0, w1):
                if a < 0:
                    acc = ALL
                elif a < nvars:
                    acc = masks[a, w]
                else:
                    acc = prods[a - nvars, w]
                for k in range(ptr[t], ptr[t + 1]):
                    acc &= d[rest[k], w]
                mono[mi, w] ^= acc
        for ni in range(gn.shape[0]):
            for w in range(w0, w1):
                x = g[last[ni], w]
                for k in range(g_ptr[ni], g_ptr[ni + 1]):
                    x ^= mono[g_idx[k], w]
                gn[ni, w] = x
            if node_p[ni] >= 0:
                pn[ni, w0:w1] = mono[node_p[ni], w0:w1]
            elif p_child[ni] >= 0:
                pn[ni, w0:w1] = p[p_child[ni], w0:w1]
            else:
                pn[ni, w0:w1] = 0


def combine(
    party: int, level: Level, g: np.ndarray, p: np.ndarray, d: np.ndarray, masks: np.ndarray, prods: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """After the opening: the level's node G, P shares from opened d and dealer tuples (one numba pass
    over the words; :func:`combine_reference` is the same step written out in numpy)."""
    t_mono, t_alpha, ptr, rest, counts, last, g_ptr, g_idx, node_p, p_child = _program(level)
    nw = g.shape[1]
    mono = np.empty((len(level.monomials), nw), dtype=np.uint64)
    gn = np.empty((len(level.nodes), nw), dtype=np.uint64)
    pn = np.empty((len(level.nodes), nw), dtype=np.uint64)
    c = np.ascontiguousarray
    prods = prods if len(prods) else np.zeros((1, nw), dtype=np.uint64)
    _combine_kernel(c(d), c(masks), c(prods), level.nvars, t_mono, t_alpha, ptr, rest, int(counts[1 if party == 0 else 0]),
                    mono, c(g), c(p), last, g_ptr, g_idx, node_p, p_child, gn, pn)
    return gn, pn


def combine_reference(
    party: int, level: Level, g: np.ndarray, p: np.ndarray, d: np.ndarray, masks: np.ndarray, prods: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """After the opening: the level's node G, P shares from opened d and dealer tuples (slow, plain)."""
    nw = g.shape[1]
    sub_index = {s: i for i, s in enumerate(level.subsets)}

    def alpha(s: tuple[int, ...]) -> np.ndarray:
        return masks[s[0]] if len(s) == 1 else prods[sub_index[s]]

    mono = np.zeros((len(level.monomials), nw), dtype=np.uint64)
    for mi, m in enumerate(level.monomials):
        acc = mono[mi]
        ms = tuple(sorted(m))
        for r in range(1, len(ms) + 1):
            for s in combinations(ms, r):
                rest = [i for i in ms if i not in s]
                term = alpha(s).copy()
                for i in rest:
                    term &= d[i]
                acc ^= term
        if party == 0:
            full = np.full(nw, ALL, dtype=np.uint64)
            for i in ms:
                full &= d[i]
            acc ^= full
    gn = np.zeros((len(level.nodes), nw), dtype=np.uint64)
    pn = np.zeros((len(level.nodes), nw), dtype=np.uint64)
    for ni, node in enumerate(level.nodes):
        gn[ni] = g[node.children[-1]]
        for mi in level.node_g[ni]:
            gn[ni] ^= mono[mi]
        if level.node_p[ni] >= 0:
            pn[ni] = mono[level.node_p[ni]]
        elif len(node.children) == 1:
            pn[ni] = p[node.children[0]]
    return gn, pn


def mask_products(level: Level, masks: np.ndarray) -> np.ndarray:
    """Dealer side: the plain products alpha_S for every subset the level needs."""
    out = np.empty((len(level.subsets), masks.shape[1]), dtype=np.uint64)
    for i, s in enumerate(level.subsets):
        acc = masks[s[0]].copy()
        for j in s[1:]:
            acc &= masks[j]
        out[i] = acc
    return out
