"""Exact Z_2^32 linear algebra: matmul, conv2d, conv_transpose2d.

No BLAS computes mod 2^32, so these are numba kernels on ``uint32`` whose
wrap-around *is* the reduction (bit-exact by construction; checked against a
slow Python-int reference in the tests). Layouts follow torch: activations
N x C x H x W, conv weights Cout x Cin x kh x kw, transposed-conv weights
Cin x Cout x kh x kw.

- conv2d: direct loops; one output row of 8 output channels is held in L1
  while every (input channel, ky, kx) tap streams over it, the 8 weights in
  registers so each input element is loaded once for 8 multiply-adds (AVX2
  vpmulld). Strided convs read phase-de-interleaved columns, so every tap is a
  contiguous run. 1-4x a float32 conv here (was 13-30x with one channel per pass). Outputs narrower
  than 33 columns (the U-Net's bottom) go through im2col and the same 8-row register blocking as a
  GEMM: the direct kernel's short rows made an 8 x 8 output 45x a float32 conv, the GEMM 5-10x.
- conv_transpose2d: per-pixel matmul Cin -> Cout*kh*kw, then a public
  rearrangement: a pixel shuffle when kernel == stride (the U-Net k2s2 case,
  no zero insertion ever), else an exact col2im scatter-add.
"""

from __future__ import annotations

import numba as nb
import numpy as np

_COB = 8  # output channels per register block (the weights stay in registers, the input row is read once)


@nb.njit(parallel=True, cache=True, nogil=True, boundscheck=False)
def _conv2d_kernel(x, w, out, stride, dil):  # pragma: no cover - numba
    # x: N x Cin x Hp x stride x ceil(Wp / stride), input column q*stride + p stored at [..., p, q], so every
    # tap reads a contiguous run for any stride; 8 output channels share each load.
    n_b, cin, _, _, _ = x.shape
    cout, _, kh, kw = w.shape
    ho, wo = out.shape[2], out.shape[3]
    nblk = cout // _COB
    for t in nb.prange(n_b * nblk * ho):
        n = t // (nblk * ho)
        rem = t % (nblk * ho)
        c0 = (rem // ho) * _COB
        y = rem % ho
        acc = np.zeros((_COB, wo), dtype=np.uint32)
        for ci in range(cin):
            for ky in range(kh):
                yy = y * stride + ky * dil
                for kx in range(kw):
                    ph = (kx * dil) % stride
                    q0 = (kx * dil) // stride
                    w0 = w[c0, ci, ky, kx]
                    w1 = w[c0 + 1, ci, ky, kx]
                    w2 = w[c0 + 2, ci, ky, kx]
                    w3 = w[c0 + 3, ci, ky, kx]
                    w4 = w[c0 + 4, ci, ky, kx]
                    w5 = w[c0 + 5, ci, ky, kx]
                    w6 = w[c0 + 6, ci, ky, kx]
                    w7 = w[c0 + 7, ci, ky, kx]
                    for j in range(wo):
                        r = x[n, ci, yy, ph, q0 + j]
                        acc[0, j] += w0 * r
                        acc[1, j] += w1 * r
                        acc[2, j] += w2 * r
                        acc[3, j] += w3 * r
                        acc[4, j] += w4 * r
                        acc[5, j] += w5 * r
                        acc[6, j] += w6 * r
                        acc[7, j] += w7 * r
        for c in range(_COB):
            for j in range(wo):
                out[n, c0 + c, y, j] = acc[c, j]


_GEMM_COLS = 256  # output columns per task of the blocked GEMM
_DIRECT_MIN_WIDTH = 33  # narrower outputs go through im2col + GEMM (the direct kernel's row loop is too short)


@nb.njit(parallel=True, cache=True, nogil=True, boundscheck=False)
def _gemm8_kernel(w, cols, out):  # pragma: no cover - numba
    # out (M x N) = w (M x K) @ cols (K x N), M a multiple of 8: like the direct conv, 8 rows of w in
    # registers per sweep so each column element is loaded once for 8 multiply-adds. The inner block is
    # written out here and in _conv2d_kernel on purpose: one shared inline helper (slices or row/offset
    # arguments) measured 1.4-1.8x slower on the U-Net's narrow convs.
    m, k = w.shape
    n = cols.shape[1]
    nnb = (n + _GEMM_COLS - 1) // _GEMM_COLS
    for t in nb.prange((m // _COB) * nnb):
        r0 = (t // nnb) * _COB
        j0 = (t % nnb) * _GEMM_COLS
        nj = min(j0 + _GEMM_COLS, n) - j0
        acc = np.zeros((_COB, nj), dtype=np.uint32)
        for kk in range(k):
            w0 = w[r0, kk]
            w1 = w[r0 + 1, kk]
            w2 = w[r0 + 2, kk]
            w3 = w[r0 + 3, kk]
            w4 = w[r0 + 4, kk]
            w5 = w[r0 + 5, kk]
            w6 = w[r0 + 6, kk]
            w7 = w[r0 + 7, kk]
            for j in range(nj):
                r = cols[kk, j0 + j]
                acc[0, j] += w0 * r
                acc[1, j] += w1 * r
                acc[2, j] += w2 * r
                acc[3, j] += w3 * r
                acc[4, j] += w4 * r
                acc[5, j] += w5 * r
                acc[6, j] += w6 * r
                acc[7, j] += w7 * r
        for c in range(_COB):
            for j in range(nj):
                out[r0 + c, j0 + j] = acc[c, j]


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


def _im2col(x: np.ndarray, kh: int, kw: int, ho: int, wo: int, stride: int, dil: int) -> np.ndarray:
    """(Cin*kh*kw) x (N*ho*wo) patch matrix of a padded input, rows ordered like a flattened weight."""
    n, c = x.shape[:2]
    cols = np.empty((c, kh, kw, n, ho, wo), dtype=np.uint32)
    for ky in range(kh):
        for kx in range(kw):
            y0, x0 = ky * dil, kx * dil
            tap = x[:, :, y0: y0 + (ho - 1) * stride + 1: stride, x0: x0 + (wo - 1) * stride + 1: stride]
            cols[:, ky, kx] = tap.transpose(1, 0, 2, 3)
    return cols.reshape(c * kh * kw, n * ho * wo)


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
    cout = w.shape[0]
    if cout % _COB:
        w = np.concatenate([w, np.zeros((_COB - cout % _COB, *w.shape[1:]), dtype=np.uint32)])
    if wo < _DIRECT_MIN_WIDTH:
        out = np.empty((w.shape[0], x.shape[0] * ho * wo), dtype=np.uint32)
        _gemm8_kernel(np.ascontiguousarray(w.reshape(w.shape[0], -1)), _im2col(x, w.shape[2], w.shape[3], ho, wo,
                                                                                 stride, dilation), out)
        return np.ascontiguousarray(out.reshape(w.shape[0], x.shape[0], ho, wo)[:cout].transpose(1, 0, 2, 3))
    if stride == 1:
        xs = x[:, :, :, None, :]
    else:  # de-interleave columns by phase: column q*stride + p goes to [..., p, q]
        wq = -(-x.shape[3] // stride)
        xs = np.zeros((*x.shape[:3], stride, wq), dtype=np.uint32)
        for p in range(stride):
            cols = x[..., p::stride]
            xs[..., p, : cols.shape[-1]] = cols
    out = np.empty((x.shape[0], w.shape[0], ho, wo), dtype=np.uint32)
    _conv2d_kernel(xs, w, out, stride, dilation)
    return out if out.shape[1] == cout else np.ascontiguousarray(out[:, :cout])


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


def conv_out_shape(sp: tuple[int, ...], k: tuple[int, ...], stride: int, padding: int, dilation: int,
                   transposed: bool = False, output_padding: int = 0) -> tuple[int, ...]:
    """Output spatial size of an N-d (transposed) conv (torch's formulas)."""
    pairs = zip(sp, k, strict=True)
    if transposed:
        return tuple((s - 1) * stride - 2 * padding + dilation * (kk - 1) + output_padding + 1 for s, kk in pairs)
    return tuple((s + 2 * padding - dilation * (kk - 1) - 1) // stride + 1 for s, kk in pairs)


def conv3d(x: np.ndarray, w: np.ndarray, stride: int = 1, padding: int = 0, dilation: int = 1) -> np.ndarray:
    """Exact ring conv3d: for each depth tap, one batched conv2d over all (padded) depth slices, then the
    taps summed at their output depths (groups=1, zero padding, no bias)."""
    x, w = _u32(x), _u32(w)
    if x.ndim != 5 or w.ndim != 5 or x.shape[1] != w.shape[1]:
        raise ValueError(f"conv3d shapes do not agree: input {x.shape}, weight {w.shape}")
    n, c, d = x.shape[:3]
    do = conv_out_shape((d,), (w.shape[2],), stride, padding, dilation)[0]
    if do <= 0:
        raise ValueError(f"conv3d output would be empty for input {x.shape}")
    if padding:
        x = np.pad(x, ((0, 0), (0, 0), (padding, padding), (0, 0), (0, 0)))
    dp = x.shape[2]
    slices = np.ascontiguousarray(x.transpose(0, 2, 1, 3, 4).reshape(n * dp, c, *x.shape[3:]))
    def tap(kd: int) -> np.ndarray:
        y = conv2d(slices, w[:, :, kd], stride, padding, dilation)
        return y.reshape(n, dp, *y.shape[1:])[:, kd * dilation: kd * dilation + (do - 1) * stride + 1: stride]

    out = tap(0)
    for kd in range(1, w.shape[2]):
        out = out + tap(kd)
    return np.ascontiguousarray(out.transpose(0, 2, 1, 3, 4))


def conv_transpose3d(x: np.ndarray, w: np.ndarray, stride: int = 1, padding: int = 0, output_padding: int = 0,
                     dilation: int = 1) -> np.ndarray:
    """Exact ring conv_transpose3d: per depth tap, one batched conv_transpose2d over the input slices,
    scattered to depth ``i * stride + kd * dilation`` of the full output, then cropped by ``padding``."""
    x, w = _u32(x), _u32(w)
    if x.ndim != 5 or w.ndim != 5 or x.shape[1] != w.shape[0]:
        raise ValueError(f"conv_transpose3d shapes do not agree: input {x.shape}, weight {w.shape}")
    n, c, d = x.shape[:3]
    kd_n = w.shape[2]
    do = conv_out_shape((d,), (kd_n,), stride, padding, dilation, True, output_padding)[0]
    slices = np.ascontiguousarray(x.transpose(0, 2, 1, 3, 4).reshape(n * d, c, *x.shape[3:]))
    hw = conv_out_shape(tuple(x.shape[3:]), tuple(w.shape[3:]), stride, padding, dilation, True, output_padding)
    depth = max((d - 1) * stride + dilation * (kd_n - 1) + 1 + output_padding, padding + do)
    full = np.zeros((n, depth, w.shape[1], *hw), dtype=np.uint32)
    for kd in range(kd_n):  # one tap in memory at a time
        y = conv_transpose2d(slices, w[:, :, kd], stride, padding, output_padding, dilation)
        full[:, kd * dilation: kd * dilation + (d - 1) * stride + 1: stride] += y.reshape(n, d, *y.shape[1:])
    return np.ascontiguousarray(full[:, padding: padding + do].transpose(0, 2, 1, 3, 4))
