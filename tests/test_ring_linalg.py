"""Ring, fixed point, PRG, bit-slicing and exact ring linear algebra vs slow Python-int references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from blindseg import linalg
from blindseg.bits import bitslice, select_material, unslice
from blindseg.errors import ScaleOverflowError, UsageError
from blindseg.prg import Prg
from blindseg.ring import decode, encode, reconstruct, share

M = 1 << 32


def slow_conv2d(x: np.ndarray, w: np.ndarray, stride: int, pad: int, dil: int) -> np.ndarray:
    n, cin, h, wd = x.shape
    cout, _, kh, kw = w.shape
    ho = (h + 2 * pad - dil * (kh - 1) - 1) // stride + 1
    wo = (wd + 2 * pad - dil * (kw - 1) - 1) // stride + 1
    out = np.zeros((n, cout, ho, wo), dtype=np.uint32)
    xl, wl = x.astype(object), w.astype(object)
    for b in range(n):
        for co in range(cout):
            for y in range(ho):
                for xx in range(wo):
                    acc = 0
                    for ci in range(cin):
                        for ky in range(kh):
                            for kx in range(kw):
                                iy, ix = y * stride + ky * dil - pad, xx * stride + kx * dil - pad
                                if 0 <= iy < h and 0 <= ix < wd:
                                    acc += int(xl[b, ci, iy, ix]) * int(wl[co, ci, ky, kx])
                    out[b, co, y, xx] = acc % M
    return out


def slow_conv_t(x: np.ndarray, w: np.ndarray, stride: int, pad: int, opad: int, dil: int) -> np.ndarray:
    n, cin, h, wd = x.shape
    _, cout, kh, kw = w.shape
    ho = (h - 1) * stride - 2 * pad + dil * (kh - 1) + opad + 1
    wo = (wd - 1) * stride - 2 * pad + dil * (kw - 1) + opad + 1
    acc = np.zeros((n, cout, ho, wo), dtype=object)
    for b in range(n):
        for ci in range(cin):
            for y in range(h):
                for xx in range(wd):
                    for co in range(cout):
                        for ky in range(kh):
                            for kx in range(kw):
                                oy, ox = y * stride + ky * dil - pad, xx * stride + kx * dil - pad
                                if 0 <= oy < ho and 0 <= ox < wo:
                                    acc[b, co, oy, ox] += int(x[b, ci, y, xx]) * int(w[ci, co, ky, kx])
    return (acc % M).astype(np.uint32)


def rand_u32(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return rng.integers(0, M, size=shape, dtype=np.uint64).astype(np.uint32)


@pytest.mark.parametrize("shape,k,stride,pad,dil", [
    ((1, 3, 7, 6), 3, 1, 1, 1), ((2, 2, 8, 8), 3, 2, 1, 1), ((1, 4, 9, 9), 3, 1, 2, 2),
    ((1, 1, 5, 5), 1, 1, 0, 1), ((1, 2, 6, 7), 2, 2, 0, 1), ((1, 5, 4, 4), 3, 1, 0, 1),
    # wide enough for the direct kernel (the narrow ones above take im2col + GEMM)
    ((1, 2, 4, 40), 3, 1, 1, 1), ((2, 3, 5, 71), 3, 2, 1, 1), ((1, 2, 6, 45), 3, 1, 2, 2), ((1, 9, 3, 33), 1, 1, 0, 1),
])
def test_conv2d_bit_exact(rng: np.random.Generator, shape: tuple[int, ...], k: int, stride: int, pad: int, dil: int) -> None:
    x = rand_u32(rng, shape)
    w = rand_u32(rng, (3, shape[1], k, k))
    np.testing.assert_array_equal(linalg.conv2d(x, w, stride, pad, dil), slow_conv2d(x, w, stride, pad, dil))


@pytest.mark.parametrize("shape,k,stride,pad,opad,dil", [
    ((1, 3, 4, 5), 2, 2, 0, 0, 1), ((2, 2, 3, 3), 3, 2, 1, 1, 1), ((1, 2, 4, 4), 3, 1, 1, 0, 1),
    ((1, 2, 3, 3), 2, 2, 0, 0, 2), ((1, 1, 5, 4), 4, 2, 1, 0, 1),
])
def test_conv_transpose2d_bit_exact(rng: np.random.Generator, shape: tuple[int, ...], k: int, stride: int, pad: int,
                                    opad: int, dil: int) -> None:
    x = rand_u32(rng, shape)
    w = rand_u32(rng, (shape[1], 3, k, k))
    got = linalg.conv_transpose2d(x, w, stride, pad, opad, dil)
    np.testing.assert_array_equal(got, slow_conv_t(x, w, stride, pad, opad, dil))
    # the shape agrees with torch's
    ref = torch.nn.functional.conv_transpose2d(torch.zeros(shape), torch.zeros(shape[1], 3, k, k), None, stride, pad, opad, 1, dil)
    assert got.shape == tuple(ref.shape)


@pytest.mark.parametrize("shape,cout,k,stride,pad,dil,chunk", [
    ((2, 8, 9, 11), 33, 3, 1, 1, 1, None),  # K = 72 taps, 33 output channels (rows padded to 4): the GEMM
    ((1, 8, 10, 12), 32, 3, 2, 1, 1, None),  # strided
    ((1, 7, 11, 9), 6, 3, 1, 2, 2, None),  # few channels, K = 63 < 64: the direct kernel
    ((1, 16, 8, 8), 4, 3, 1, 1, 1, None),  # few channels over 144 taps: still the GEMM (K <= 256)
    ((1, 8, 13, 10), 36, 3, 1, 1, 1, 4 * 72 * 10 * 3),  # im2col in chunks of 3 output rows
])
def test_conv2d_gemm_path_bit_exact(rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch, shape: tuple[int, ...],
                                    cout: int, k: int, stride: int, pad: int, dil: int, chunk: int | None) -> None:
    """Convs with 64 taps or more go through im2col + the blocked GEMM (K blocks of 64, 64 x 256 tasks,
    4-row sweeps), built a chunk of output rows at a time: bit-exact against Python ints."""
    if chunk is not None:
        monkeypatch.setattr(linalg, "_IM2COL_BYTES", chunk)
    x = rand_u32(rng, shape)
    w = rand_u32(rng, (cout, shape[1], k, k))
    np.testing.assert_array_equal(linalg.conv2d(x, w, stride, pad, dil), slow_conv2d(x, w, stride, pad, dil))


@pytest.mark.parametrize("m,k,n", [(67, 130, 300), (4, 64, 256), (1, 1, 1), (130, 7, 513)])
def test_gemm_blocks_and_edges(rng: np.random.Generator, m: int, k: int, n: int) -> None:
    """matmul across the GEMM's row padding, K blocks and column tiles, against uint64 products (exact mod
    2^32: 2^32 divides the 2^64 they wrap at)."""
    a, b = rand_u32(rng, (m, k)), rand_u32(rng, (k, n))
    want = ((a.astype(np.uint64) @ b.astype(np.uint64)) & np.uint64(M - 1)).astype(np.uint32)
    np.testing.assert_array_equal(linalg.matmul(a, b), want)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 6), st.integers(1, 9), st.integers(1, 7), st.integers(0, 2**32 - 1))
def test_matmul_property(m: int, k: int, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    a, b = rand_u32(rng, (m, k)), rand_u32(rng, (k, n))
    want = np.array([[sum(int(a[i, t]) * int(b[t, j]) for t in range(k)) % M for j in range(n)] for i in range(m)],
                    dtype=np.uint32).reshape(m, n)
    np.testing.assert_array_equal(linalg.matmul(a, b), want)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-1000, 1000, allow_nan=False), min_size=1, max_size=50), st.integers(0, 16))
def test_encode_share_roundtrip(vals: list[float], f: int) -> None:
    x = np.array(vals)
    enc = encode(x, f)
    x0, x1 = share(enc, Prg(b"k" * 32))
    np.testing.assert_array_equal(reconstruct(x0, x1), enc)
    assert np.max(np.abs(decode(enc, f) - x)) <= 2.0 ** (-f - 1) + 1e-12


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 300), st.integers(0, 2**32 - 1))
def test_bitslice_roundtrip(n: int, seed: int) -> None:
    x = rand_u32(np.random.default_rng(seed), (n,))
    w = bitslice(x, 0, 32)
    assert w.shape == (32, (n + 63) // 64)
    np.testing.assert_array_equal(unslice(w, n), x)
    j = seed % 32
    bits = ((x >> np.uint32(j)) & 1).astype(np.uint32)
    np.testing.assert_array_equal(unslice(bitslice(x, j, 1), n), bits)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 700), st.integers(0, 31), st.integers(1, 32), st.integers(0, 2**32 - 1))
def test_bitslice_matches_the_layout_written_out(n: int, lo: int, nbits: int, seed: int) -> None:
    """Bit j of element e sits in row j, word e // 64, bit e % 64 (numpy, element by element), and
    unslice of any row count inverts it."""
    nbits = min(nbits, 32 - lo)
    x = rand_u32(np.random.default_rng(seed), (n,))
    e = np.arange(n)
    want = np.zeros((nbits, (n + 63) // 64), dtype=np.uint64)
    for j in range(nbits):
        bit = ((x >> np.uint32(lo + j)) & 1).astype(np.uint64) << (e % 64).astype(np.uint64)
        np.bitwise_or.at(want[j], e // 64, bit)
    np.testing.assert_array_equal(bitslice(x, lo, nbits), want)
    np.testing.assert_array_equal(unslice(want, n), (x >> np.uint32(lo)) & np.uint32((1 << nbits) - 1))


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 700), st.integers(0, 20), st.sampled_from([np.uint8, np.uint16, np.uint32]),
       st.integers(0, 2**32 - 1))
def test_select_material_matches_python_ints(n: int, s: int, v_dtype: type, seed: int) -> None:
    """The dealer's fused pass: u = -((r mod 2^31) >> s), v = msb(r), rho, rho*u, rho*v per element,
    against Python integers (v and rho*v mod 2^width of their dtype)."""
    rng = np.random.default_rng(seed)
    r = rand_u32(rng, (n,))
    rho_words = rng.integers(0, 2**64, (n + 63) // 64, dtype=np.uint64)
    u, v, rho_a, rho_u, rho_v = select_material(r, rho_words, s, v_dtype)
    vmod = 1 << (8 * np.dtype(v_dtype).itemsize)
    for i in range(n):
        ri, rho = int(r[i]), (int(rho_words[i // 64]) >> (i % 64)) & 1
        ui = (-((ri % 2**31) >> s)) % 2**32
        assert (int(u[i]), int(v[i]), int(rho_a[i])) == (ui, ri >> 31, rho)
        assert (int(rho_u[i]), int(rho_v[i])) == (rho * ui, (rho * (ri >> 31)) % vmod)
    assert v.dtype == rho_v.dtype == v_dtype


def test_encode_refuses_bad_values() -> None:
    with pytest.raises(UsageError, match="NaN"):
        encode(np.array([1.0, np.nan]), 8)
    with pytest.raises(ScaleOverflowError, match="does not fit"):
        encode(np.array([2.0**30]), 4)


def test_prg_streams_deterministic_and_distinct() -> None:
    seed = b"s" * 32
    a = Prg(seed, stream=3).uint32(1000)
    np.testing.assert_array_equal(a, Prg(seed, stream=3).uint32(1000))
    assert not np.array_equal(a, Prg(seed, stream=4).uint32(1000))
    with pytest.raises(ValueError):
        Prg(b"short")


def _conv3d_ints(x: np.ndarray, w: np.ndarray, stride: int, pad: int, dil: int) -> np.ndarray:
    """Slow Python-int conv3d mod 2^32 (the definition, no floats anywhere)."""
    n, c, d, h, wd = x.shape
    co, _, kd, kh, kw = w.shape
    X = [[[[[int(x[a, b, i, j, k]) for k in range(wd)] for j in range(h)] for i in range(d)] for b in range(c)]
         for a in range(n)]
    W = w.astype(object)
    od, oh, ow = ((s + 2 * pad - dil * (kk - 1) - 1) // stride + 1 for s, kk in ((d, kd), (h, kh), (wd, kw)))
    out = np.zeros((n, co, od, oh, ow), dtype=np.uint64)
    for a in range(n):
        for o in range(co):
            for i in range(od):
                for j in range(oh):
                    for k in range(ow):
                        acc = 0
                        for b in range(c):
                            for p in range(kd):
                                for q in range(kh):
                                    for r in range(kw):
                                        zi, zj, zk = i * stride - pad + p * dil, j * stride - pad + q * dil, \
                                            k * stride - pad + r * dil
                                        if 0 <= zi < d and 0 <= zj < h and 0 <= zk < wd:
                                            acc += X[a][b][zi][zj][zk] * int(W[o, b, p, q, r])
                        out[a, o, i, j, k] = acc % (1 << 32)
    return out.astype(np.uint32)


def _conv_transpose3d_ints(x: np.ndarray, w: np.ndarray, stride: int, pad: int, opad: int) -> np.ndarray:
    """Slow Python-int conv_transpose3d mod 2^32: scatter every input voxel through the kernel."""
    n, c, d, h, wd = x.shape
    _, co, kd, kh, kw = w.shape
    size = [(s - 1) * stride - 2 * pad + (kk - 1) + opad + 1 for s, kk in ((d, kd), (h, kh), (wd, kw))]
    full = {}
    for a in range(n):
        for b in range(c):
            for i in range(d):
                for j in range(h):
                    for k in range(wd):
                        v = int(x[a, b, i, j, k])
                        for o in range(co):
                            for p in range(kd):
                                for q in range(kh):
                                    for r in range(kw):
                                        key = (a, o, i * stride + p - pad, j * stride + q - pad, k * stride + r - pad)
                                        full[key] = full.get(key, 0) + v * int(w[b, o, p, q, r])
    out = np.zeros((n, co, *size), dtype=np.uint64)
    for (a, o, i, j, k), v in full.items():
        if 0 <= i < size[0] and 0 <= j < size[1] and 0 <= k < size[2]:
            out[a, o, i, j, k] = v % (1 << 32)
    return out.astype(np.uint32)


@pytest.mark.parametrize("stride,pad,dil", [(1, 1, 1), (2, 0, 1), (2, 1, 2)])
def test_conv3d_bit_exact_on_full_range_values(rng: np.random.Generator, stride: int, pad: int, dil: int) -> None:
    x = rng.integers(0, 1 << 32, (1, 2, 5, 4, 6), dtype=np.uint64).astype(np.uint32)
    w = rng.integers(0, 1 << 32, (2, 2, 2, 3, 2), dtype=np.uint64).astype(np.uint32)
    np.testing.assert_array_equal(linalg.conv3d(x, w, stride, pad, dil), _conv3d_ints(x, w, stride, pad, dil))


@pytest.mark.parametrize("stride,pad,opad,k", [(2, 0, 0, 2), (2, 1, 1, 3), (1, 1, 0, 3)])
def test_conv_transpose3d_bit_exact_on_full_range_values(rng: np.random.Generator, stride: int, pad: int, opad: int,
                                                         k: int) -> None:
    x = rng.integers(0, 1 << 32, (1, 2, 3, 2, 3), dtype=np.uint64).astype(np.uint32)
    w = rng.integers(0, 1 << 32, (2, 2, k, k, k), dtype=np.uint64).astype(np.uint32)
    np.testing.assert_array_equal(linalg.conv_transpose3d(x, w, stride, pad, opad),
                                  _conv_transpose3d_ints(x, w, stride, pad, opad))
