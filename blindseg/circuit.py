"""The borrow circuit behind every comparison: [a < r] for public a, shared r.

Used by SecReLU / SecMaxPool / argmax (see ``protocols.py``): with c = x' + r
opened, the sign of x is c_30 XOR r_30 XOR [c mod 2^30 < r mod 2^30].

Steps (all on bit-sliced words, 64 elements per uint64):

- level 0, local: bits are grouped in pairs (hi, lo). With a public, the
  borrow generate/propagate of a pair are linear in the dealer's shares of
  r_lo, r_hi and r_lo*r_hi:
  G = ~a_h r_h ^ ~a_h ~a_l r_l ^ ~a_l (r_h r_l),
  P = ~a_h ~a_l ^ ~a_h r_l ^ ~a_l r_h ^ r_h r_l.
- levels 1..L, one round each: nodes of k children (low -> high) combine as
  G = XOR_t G_t * prod_{s>t} P_s, P = prod_t P_t. Every monomial of a level
  is evaluated in one round with dealer *multi-AND tuples*: each variable x is
  opened as d = x ^ alpha, and prod_{i in M} x_i = XOR_{S subset M}
  (prod_{i not in S} d_i) * [alpha_S], the dealer supplying shares of alpha_S
  for every |S| >= 2. P is computed only where an ancestor needs it.

Cost per element: ``opened_bits`` bits sent per server, ``len(levels)``
rounds, ``derived_bits`` bits of dealer corrections to server 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from itertools import combinations

import numba as nb
import numpy as np

ALL = np.uint64(0xFFFFFFFFFFFFFFFF)


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
    """The whole borrow circuit for ``width`` low bits (width even)."""

    width: int
    need_p0: tuple[bool, ...]  # level-0 groups whose P is needed
    levels: tuple[Level, ...]

    @property
    def groups(self) -> int:
        return self.width // 2

    @property
    def rounds(self) -> int:
        return len(self.levels)

    @property
    def opened_bits(self) -> int:
        return sum(lv.nvars for lv in self.levels)

    @property
    def derived_bits(self) -> int:
        return self.groups + sum(len(lv.subsets) for lv in self.levels)


def build_circuit(width: int = 30, arities: tuple[int, ...] = (3, 5)) -> Circuit:
    """Build the tree: level-0 pairs, then levels of the given arities (then binary)."""
    if width % 2 or width < 4:
        raise ValueError("circuit width must be even and >= 4")
    tree: list[list[tuple[int, ...]]] = []  # per level: children tuples
    count = width // 2
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
    return Circuit(width, tuple(need[0]), tuple(levels))


# ---------------------------------------------------------------- pure steps


def level0(party: int, a_words: np.ndarray, r_bits: np.ndarray, r_pairs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Local level 0: G, P shares of each bit pair. a_words: public (width, nw)."""
    na = ~a_words
    nl, nh = na[0::2], na[1::2]
    rl, rh = r_bits[0::2], r_bits[1::2]
    g = (nh & rh) ^ (nh & nl & rl) ^ (nl & r_pairs)
    p = (nh & rl) ^ (nl & rh) ^ r_pairs
    if party == 0:
        p ^= nh & nl
    return g, p


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


_BLOCK = 256  # words per block of the combine kernel: its rows stay in cache while every term runs


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
