"""Exact Z_2^32 linear algebra: matmul, conv2d, conv_transpose2d.

No BLAS computes mod 2^32, so these are numba kernels on ``uint32`` whose
wrap-around *is* the reduction (bit-exact by construction; checked against a
slow Python-int reference in the tests). Layouts follow torch: activations
N x C x H x W, conv weights Cout x Cin x kh x kw, transposed-conv weights
Cin x Cout x kh x kw.

- conv2d: direct loops, one output row of a block of output channels held in
  cache while every (input channel, ky, kx) tap streams over it.
- conv_transpose2d: per-pixel matmul Cin -> Cout*kh*kw, then a public
  rearrangement: a pixel shuffle when kernel == stride (the U-Net k2s2 case,
  no zero insertion ever), else an exact col2im scatter-add.
"""

from __future__ import annotations

import numba as nb
import numpy as np

_COB = 4  # output channels per register block


@nb.njit(parallel=True, cache=True, nogil=True)
def _conv2d_kernel(x, w, out, stride, dil):  # pragma: no cover - numba
    n_b, cin, _, _ = x.shape
    cout, _, kh, kw = w.shape
    ho, wo = out.shape[2], out.shape[3]
    nblk = (cout + _COB - 1) // _COB
    for t in nb.prange(n_b * nblk * ho):
        n = t // (nblk * ho)
        rem = t % (nblk * ho)
        blk = rem // ho
        y = rem % ho
        c0 = blk * _COB
        c1 = min(c0 + _COB, cout)
        acc = np.zeros((_COB, wo), dtype=np.uint32)
        for ci in range(cin):
            for ky in range(kh):
                row = x[n, ci, y * stride + ky * dil]
                for kx in range(kw):
                    off = kx * dil
                    for c in range(c0, c1):
                        wv = w[c, ci, ky, kx]
                        a = acc[c - c0]
                        if stride == 1:
                            for j in range(wo):
                                a[j] += wv * row[off + j]
                        else:
                            for j in range(wo):
                                a[j] += wv * row[off + j * stride]
        for c in range(c0, c1):
            out[n, c, y, :] = acc[c - c0]


@nb.njit(parallel=True, cache=True, nogil=True)
def _matmul_kernel(a, b, out):  # pragma: no cover - numba
    m, k = a.shape
    n = b.shape[1]
    for i in nb.prange(m):
        acc = np.zeros(n, dtype=np.uint32)
        for kk in range(k):
            av = a[i, kk]
            brow = b[kk]
            for j in range(n):
                acc[j] += av * brow[j]
        out[i, :] = acc


@nb.njit(parallel=True, cache=True, nogil=True)
def _col2im_kernel(cols, out, stride, dil):  # pragma: no cover - numba
    # cols: N, H, W, Cout, kh, kw ; out: N, Cout, Hf, Wf (full, before cropping)
    n_b, h, w, cout, kh, kw = cols.shape
    for t in nb.prange(n_b * cout):
        n = t // cout
        c = t % cout
        for y in range(h):
            for x in range(w):
                for ky in range(kh):
                    for kx in range(kw):
                        out[n, c, y * stride + ky * dil, x * stride + kx * dil] += cols[n, y, x, c, ky, kx]


def _u32(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.uint32)


def matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(M x K) @ (K x N) mod 2^32."""
    a, b = _u32(a), _u32(b)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"matmul shapes do not agree: {a.shape} @ {b.shape}")
    out = np.empty((a.shape[0], b.shape[1]), dtype=np.uint32)
    _matmul_kernel(a, b, out)
    return out


def conv2d_out_hw(h: int, w: int, k: tuple[int, int], stride: int, padding: int, dilation: int) -> tuple[int, int]:
    """Output height and width of a conv2d (torch's formula)."""
    ho = (h + 2 * padding - dilation * (k[0] - 1) - 1) // stride + 1
    wo = (w + 2 * padding - dilation * (k[1] - 1) - 1) // stride + 1
    return ho, wo


def conv2d(x: np.ndarray, w: np.ndarray, stride: int = 1, padding: int = 0, dilation: int = 1) -> np.ndarray:
    """Exact ring conv2d (groups=1, zero padding, no bias)."""
    x, w = _u32(x), _u32(w)
    if x.ndim != 4 or w.ndim != 4 or x.shape[1] != w.shape[1]:
        raise ValueError(f"conv2d shapes do not agree: input {x.shape}, weight {w.shape}")
    ho, wo = conv2d_out_hw(x.shape[2], x.shape[3], (w.shape[2], w.shape[3]), stride, padding, dilation)
    if ho <= 0 or wo <= 0:
        raise ValueError(f"conv2d output would be empty for input {x.shape}")
    if padding:
        x = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    out = np.empty((x.shape[0], w.shape[0], ho, wo), dtype=np.uint32)
    _conv2d_kernel(x, w, out, stride, dilation)
    return out


def conv_transpose2d_out_hw(
    h: int, w: int, k: tuple[int, int], stride: int, padding: int, output_padding: int, dilation: int
) -> tuple[int, int]:
    """Output height and width of a conv_transpose2d (torch's formula)."""
    ho = (h - 1) * stride - 2 * padding + dilation * (k[0] - 1) + output_padding + 1
    wo = (w - 1) * stride - 2 * padding + dilation * (k[1] - 1) + output_padding + 1
    return ho, wo


def conv_transpose2d(
    x: np.ndarray,
    w: np.ndarray,
    stride: int = 1,
    padding: int = 0,
    output_padding: int = 0,
    dilation: int = 1,
) -> np.ndarray:
    """Exact ring conv_transpose2d: per-pixel matmul, then shuffle or col2im."""
    x, w = _u32(x), _u32(w)
    if x.ndim != 4 or w.ndim != 4 or x.shape[1] != w.shape[0]:
        raise ValueError(f"conv_transpose2d shapes do not agree: input {x.shape}, weight {w.shape}")
    n, cin, h, wd = x.shape
    cout, kh, kw = w.shape[1], w.shape[2], w.shape[3]
    ho, wo = conv_transpose2d_out_hw(h, wd, (kh, kw), stride, padding, output_padding, dilation)
    pix = np.ascontiguousarray(x.transpose(0, 2, 3, 1).reshape(n * h * wd, cin))
    cols = matmul(pix, w.reshape(cin, cout * kh * kw)).reshape(n, h, wd, cout, kh, kw)
    if kh == kw == stride and dilation == 1:
        full = cols.transpose(0, 3, 1, 4, 2, 5).reshape(n, cout, h * kh, wd * kw)
    else:
        hf = (h - 1) * stride + dilation * (kh - 1) + 1
        wf = (wd - 1) * stride + dilation * (kw - 1) + 1
        full = np.zeros((n, cout, hf + output_padding, wf + output_padding), dtype=np.uint32)
        _col2im_kernel(cols, full, stride, dilation)
    if full.shape[2] < padding + ho or full.shape[3] < padding + wo:
        full = np.pad(full, ((0, 0), (0, 0), (0, padding + ho - full.shape[2]), (0, padding + wo - full.shape[3])))
    return np.ascontiguousarray(full[:, :, padding : padding + ho, padding : padding + wo])
