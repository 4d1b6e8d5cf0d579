"""Bit-slicing: bit j of element e lives in word e // 64, bit e % 64 of row j.

Boolean shares of n elements' bits are ``uint64`` arrays of shape
(nbits, nwords) with nwords = ceil(n / 64); one AND of two such rows is one
word op per 64 elements. The transposes are numba loops (~ms for 2^22
elements; numpy packbits is ~20x slower).
"""

from __future__ import annotations

import numba as nb
import numpy as np


def nwords(n: int) -> int:
    """Words needed to hold one bit of each of n elements."""
    return (n + 63) // 64


@nb.njit(parallel=True, cache=True, nogil=True)
def _slice_kernel(x, lo, nbits, out):  # pragma: no cover - numba
    n = x.size
    nw = out.shape[1]
    for w in nb.prange(nw):
        e0 = w * 64
        e1 = min(e0 + 64, n)
        for j in range(nbits):
            acc = np.uint64(0)
            sh = lo + j
            for e in range(e0, e1):
                acc |= np.uint64((x[e] >> sh) & 1) << np.uint64(e - e0)
            out[j, w] = acc


@nb.njit(parallel=True, cache=True, nogil=True)
def _unslice_kernel(words, n, out):  # pragma: no cover - numba
    nbits = words.shape[0]
    nw = words.shape[1]
    for w in nb.prange(nw):
        e0 = w * 64
        e1 = min(e0 + 64, n)
        for e in range(e0, e1):
            acc = np.uint32(0)
            for j in range(nbits):
                acc |= np.uint32((words[j, w] >> np.uint64(e - e0)) & np.uint64(1)) << np.uint32(j)
            out[e] = acc


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
    _unslice_kernel(w, n, out)
    return out
