"""Bit-slicing: bit j of element e lives in word e // 64, bit e % 64 of row j.

Boolean shares of n elements' bits are ``uint64`` arrays of shape
(nbits, nwords) with nwords = ceil(n / 64); one AND of two such rows is one
word op per 64 elements. The transposes are numba 64 x 64 bit-matrix transposes (~0.7 ms for
2^18 elements, 32 bits, on 2 cores).
"""

from __future__ import annotations

import numba as nb
import numpy as np


def nwords(n: int) -> int:
    """Words needed to hold one bit of each of n elements."""
    return (n + 63) // 64


_CHUNK = 32  # words per parallel task of the transposes


@nb.njit(inline="always", cache=True)
def _transpose64(a):  # pragma: no cover - numba
    # In place: bit j of a[i] <-> bit i of a[j] (six swap stages of halving blocks, Hacker's Delight 7-3).
    j = 32
    m = np.uint64(0x00000000FFFFFFFF)
    while j != 0:
        sj = np.uint64(j)
        k = 0
        while k < 64:
            t = ((a[k] >> sj) ^ a[k + j]) & m
            a[k] ^= t << sj
            a[k + j] ^= t
            k = (k + j + 1) & ~j
        j >>= 1
        m ^= m << np.uint64(j)


@nb.njit(parallel=True, cache=True, nogil=True)
def _slice_kernel(x, lo, nbits, out):  # pragma: no cover - numba
    n = x.size
    nw = out.shape[1]
    for c in nb.prange((nw + _CHUNK - 1) // _CHUNK):
        a = np.empty(64, np.uint64)
        for w in range(c * _CHUNK, min(nw, c * _CHUNK + _CHUNK)):
            e0 = w * 64
            m = min(64, n - e0)
            for e in range(m):
                a[e] = np.uint64(x[e0 + e])
            for e in range(m, 64):
                a[e] = 0
            _transpose64(a)
            for j in range(nbits):
                out[j, w] = a[lo + j]


@nb.njit(parallel=True, cache=True, nogil=True)
def _unslice_kernel(words, n, out):  # pragma: no cover - numba
    nbits = words.shape[0]
    nw = words.shape[1]
    for c in nb.prange((nw + _CHUNK - 1) // _CHUNK):
        a = np.empty(64, np.uint64)
        for w in range(c * _CHUNK, min(nw, c * _CHUNK + _CHUNK)):
            for j in range(nbits):
                a[j] = words[j, w]
            for j in range(nbits, 64):
                a[j] = 0
            _transpose64(a)
            e0 = w * 64
            for e in range(min(64, n - e0)):
                out[e0 + e] = np.uint32(a[e] & np.uint64(0xFFFFFFFF))


@nb.njit(parallel=True, cache=True, nogil=True)
def _unslice_few_kernel(words, n, out):  # pragma: no cover - numba
    # a handful of rows (rho, e): bit by bit is cheaper than a 64 x 64 transpose per word
    nbits = words.shape[0]
    for w in nb.prange(words.shape[1]):
        e0 = w * 64
        for e in range(min(64, n - e0)):
            acc = np.uint32(0)
            for j in range(nbits):
                acc |= np.uint32((words[j, w] >> np.uint64(e)) & np.uint64(1)) << np.uint32(j)
            out[e0 + e] = acc


@nb.njit(parallel=True, cache=True, nogil=True)
def _select_material_kernel(r, rho_w, s, u, v, rho_a, rho_u, rho_v):  # pragma: no cover - numba
    # the dealer's plain u, v, rho, rho*u, rho*v in one pass (v and rho*v cut to their item's width)
    mask31 = np.uint32(0x7FFFFFFF)
    s32 = np.uint32(s)
    for i in nb.prange(r.size):
        ri = r[i]
        ui = np.uint32(0) - ((ri & mask31) >> s32)
        m = ri >> np.uint32(31)
        rh = np.uint32((rho_w[i >> 6] >> np.uint64(i & 63)) & np.uint64(1))
        u[i] = ui
        v[i] = m
        rho_a[i] = rh
        rho_u[i] = rh * ui
        rho_v[i] = rh * m


def select_material(r: np.ndarray, rho_words: np.ndarray, s: int, v_dtype: object
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Dealer side of a truncating select, from the plain r (uint32) and rho (one bit-sliced row): u =
    -((r mod 2^31) >> s), v = msb(r), rho, rho*u, rho*v (v and rho*v as ``v_dtype``), one pass."""
    n = r.size
    u, rho_a, rho_u = (np.empty(n, dtype=np.uint32) for _ in range(3))
    v, rho_v = np.empty(n, dtype=v_dtype), np.empty(n, dtype=v_dtype)  # type: ignore[call-overload]
    _select_material_kernel(np.ascontiguousarray(r, dtype=np.uint32), np.ascontiguousarray(rho_words, dtype=np.uint64),
                            s, u, v, rho_a, rho_u, rho_v)
    return u, v, rho_a, rho_u, rho_v


def bitslice(x: np.ndarray, lo: int, nbits: int) -> np.ndarray:
    """Bits lo .. lo+nbits-1 of uint32 elements, sliced into (nbits, nwords) uint64."""
    flat = np.ascontiguousarray(x, dtype=np.uint32).reshape(-1)
    out = np.empty((nbits, nwords(flat.size)), dtype=np.uint64)
    _slice_kernel(flat, lo, nbits, out)
    return out


def unslice(words: np.ndarray, n: int) -> np.ndarray:
    """Inverse of :func:`bitslice` with lo=0: (nbits, nwords) -> uint32[n] (nbits <= 32)."""
    w = np.ascontiguousarray(words, dtype=np.uint64)
    if w.ndim == 1:
        w = w.reshape(1, -1)
    out = np.empty(n, dtype=np.uint32)
    (_unslice_kernel if w.shape[0] > 4 else _unslice_few_kernel)(w, n, out)
    return out


@nb.njit(parallel=True, cache=True, nogil=True)
def _select_kernel(c, ew, u, v, rho_a, rho_u, rho_v, s, party0, out, value):  # pragma: no cover - numba
    # mod 2^64 arithmetic, cut to 32 bits at the end: a ring map onto Z_2^32, one pass, no temporaries
    n = c.size
    sh_v = np.uint64(31 - s)
    s64 = np.uint64(s)
    off = np.uint64(1) << np.uint64(30 - s)
    one = np.uint64(1)
    for i in nb.prange(n):
        ci = np.uint64(c[i])
        ch = ci >> np.uint64(31)
        t = ((ci & np.uint64(0x7FFFFFFF)) >> s64) + (ch << sh_v) - off
        k = one - (ch << one)
        e = (ew[i >> 6] >> np.uint64(i & 63)) & one
        val = np.uint64(u[i]) + k * (np.uint64(v[i]) << sh_v)
        o = (one - (e << one)) * (t * np.uint64(rho_a[i]) + np.uint64(rho_u[i]) + k * (np.uint64(rho_v[i]) << sh_v))
        o += e * val
        if party0:
            o += e * t
            val += t
        out[i] = np.uint32(o & np.uint64(0xFFFFFFFF))
        value[i] = np.uint32(val & np.uint64(0xFFFFFFFF))


def select_output(party: int, c: np.ndarray, ew: np.ndarray, mat: dict[str, np.ndarray], s: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """The select protocol's last step in one pass: from the opened c, the opened e = b ^ rho (bit-sliced)
    and the dealer's u, v, rho, rho*u, rho*v, this server's shares of (b * (z >> s), z >> s)."""
    n = c.size
    out = np.empty(n, dtype=np.uint32)
    value = np.empty(n, dtype=np.uint32)
    _select_kernel(np.ascontiguousarray(c, dtype=np.uint32), np.ascontiguousarray(ew, dtype=np.uint64),
                   mat["u"], mat["v"], mat["rho_a"], mat["rho_u"], mat["rho_v"], s, party == 0, out, value)
    return out, value


@nb.njit(parallel=True, cache=True, nogil=True)
def _pick_kernel(e1w, n, rows_x, rows_y, ge, rho, c, u, v, ra, ru, rv, c_o, u_o, v_o, ra_o, ru_o, rv_o, e2w, ey_o
                 ):  # pragma: no cover - numba
    # one output word (64 elements) per task: the word of e2 bits is built without sharing it between threads
    n2 = c_o.size
    one = np.uint64(1)
    for w in nb.prange(e2w.size):
        word = np.uint64(0)
        for b in range(min(64, n2 - w * 64)):
            i = w * 64 + b
            j = i // n
            pos = i - j * n
            k = 0
            if rows_x[j] >= 0:
                ix = rows_x[j] * n + pos
                k = 2 * np.int64((e1w[ix >> 6] >> np.uint64(ix & 63)) & one)
            ey = 0
            if rows_y[j] >= 0:
                iy = rows_y[j] * n + pos
                ey = np.int64((e1w[iy >> 6] >> np.uint64(iy & 63)) & one)
            src = (k + ey) * n2 + i
            c_o[i] = c[src]
            u_o[i] = u[src]
            v_o[i] = v[src]
            ra_o[i] = ra[src]
            ru_o[i] = ru[src]
            rv_o[i] = rv[src]
            word |= (((ge[src >> 6] ^ rho[src >> 6]) >> np.uint64(src & 63)) & one) << np.uint64(b)
            ey_o[i] = ey
        e2w[w] = word


def pick_candidates(e1w: np.ndarray, n: int, rows_x: np.ndarray, rows_y: np.ndarray, ge: np.ndarray, c: np.ndarray,
                    mat: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """The speculative tournament level's pick (:func:`blindseg.protocols._speculative_pair`), in one pass.

    Candidate (i, j) of second-level element e (pair e // n) sits at (2i + j) * n2 + e of ``c``, ``ge`` (the
    comparison's sign shares, bit-sliced) and ``mat``; i and j are the first level's opened e bits (words
    ``e1w``, n elements per row) of rows ``rows_x`` / ``rows_y`` of the pair (-1: a pass-through operand,
    always 0). Returns the picked c, the picked select material, the words of e2 = sign ^ rho to open, and
    j per element (which Y candidate is real)."""
    n2 = c.size // 4
    out = {name: np.empty(n2, dtype=mat[name].dtype) for name in ("u", "v", "rho_a", "rho_u", "rho_v")}
    c_o = np.empty(n2, dtype=np.uint32)
    e2w = np.empty(nwords(n2), dtype=np.uint64)
    ey = np.empty(n2, dtype=np.uint8)
    _pick_kernel(e1w, n, rows_x, rows_y, ge, mat["rho"], c, mat["u"], mat["v"], mat["rho_a"], mat["rho_u"],
                 mat["rho_v"], c_o, out["u"], out["v"], out["rho_a"], out["rho_u"], out["rho_v"], e2w, ey)
    return c_o, out, e2w, ey
