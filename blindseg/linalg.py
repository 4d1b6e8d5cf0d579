"""Exact Z_2^32 linear algebra: matmul, conv2d, conv_transpose2d.

No BLAS computes mod 2^32, so these are numba kernels on ``uint32`` whose
wrap-around *is* the reduction (bit-exact by construction; checked against a
slow Python-int reference in the tests). Layouts follow torch: activations
N x C x H x W, conv weights Cout x Cin x kh x kw, transposed-conv weights
Cin x Cout x kh x kw.

- matmul and most convs: one blocked GEMM (:func:`_gemm_kernel`): tasks of 64 output rows x 256
  columns, K in blocks of 64 so the right operand's tile is read from L1 by every row of the task, 4 rows'
  weights in registers per sweep so LLVM vectorises the multiply-adds. 25-50 GMAC/s on 2 cores here,
  2.3-3.5x a float32 conv (session 11; the 8-row form before stayed scalar: 4-13x). Convs reach it
  through im2col, built a chunk of output rows at a time (64 MB) so a 512^2 layer never holds its whole
  patch matrix.
- conv2d, direct loops, for the convs im2col does not pay for (fewer than 64 taps, e.g. the first
  conv of a one-channel scan; or few output channels over many taps): one output row of 8 output
  channels is held in L1 while every (input channel, ky, kx) tap streams over it, the 8 weights in
  registers. Strided convs read phase-de-interleaved columns, so every tap is a contiguous run.
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
_GEMM_ROWS = 64  # output rows per task: their accumulators (64 KB) stay in L2
_GEMM_K = 64  # the K block: a (64 x 256) tile of the right operand stays in L1 while every row of the task uses it
_GEMM_R = 4  # rows per register sweep (M is padded to a multiple)
_DIRECT_MIN_K = 64  # convs with fewer (Cin * kh * kw) taps keep the direct kernel (a K this short starves the GEMM)
# few output channels over many taps (64 -> 16 at 128^2): building the patch matrix costs more than the GEMM saves
_GEMM_MIN_COUT, _GEMM_SMALL_K = 32, 256
_DIRECT_MIN_WIDTH = 33  # narrower output rows than this are too short for the direct kernel's inner loop
_IM2COL_BYTES = 64 << 20  # im2col chunk: the patch matrix is built for this many bytes of output rows at a time


@nb.njit(parallel=True, cache=True, nogil=True, boundscheck=False)
def _gemm_kernel(w, cols, out):  # pragma: no cover - numba
    # out (M x N) = w (M x K) @ cols (K x N) mod 2^32, M a multiple of 4. Tasks are (64 rows x 256 columns);
    # K runs in blocks of 64 so the cols tile is read from L1 by all 64 rows; each sweep keeps 4 rows'
    # weights in registers and reads one cols row once for 4 vectorised multiply-adds (4 accumulator rows
    # and one input row: few enough pointers for LLVM to vectorise behind its runtime alias checks; the
    # earlier 8-row form stayed scalar: 7-20 GMAC/s against 30-50 here).
    m, k = w.shape
    n = cols.shape[1]
    nnb = (n + _GEMM_COLS - 1) // _GEMM_COLS
    nrb = (m + _GEMM_ROWS - 1) // _GEMM_ROWS
    for t in nb.prange(nrb * nnb):
        r0 = (t // nnb) * _GEMM_ROWS
        r1 = min(r0 + _GEMM_ROWS, m)
        j0 = (t % nnb) * _GEMM_COLS
        nj = min(j0 + _GEMM_COLS, n) - j0
        acc = np.zeros((_GEMM_ROWS, _GEMM_COLS), dtype=np.uint32)
        for k0 in range(0, k, _GEMM_K):
            k1 = min(k0 + _GEMM_K, k)
            for r in range(r0, r1, _GEMM_R):
                a0 = acc[r - r0]
                a1 = acc[r - r0 + 1]
                a2 = acc[r - r0 + 2]
                a3 = acc[r - r0 + 3]
                for kk in range(k0, k1):
                    w0 = w[r, kk]
                    w1 = w[r + 1, kk]
                    w2 = w[r + 2, kk]
                    w3 = w[r + 3, kk]
                    row = cols[kk, j0 : j0 + nj]
                    for j in range(nj):
                        v = row[j]
                        a0[j] += w0 * v
                        a1[j] += w1 * v
                        a2[j] += w2 * v
                        a3[j] += w3 * v
        for r in range(r0, r1):
            out[r, j0 : j0 + nj] = acc[r - r0, :nj]


def _pad_rows(w: np.ndarray, multiple: int) -> np.ndarray:
    """``w`` with zero rows (first axis) appended up to a multiple of ``multiple``."""
    extra = -w.shape[0] % multiple
    return np.concatenate([w, np.zeros((extra, *w.shape[1:]), dtype=np.uint32)]) if extra else w


def _gemm(w: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """(M x K) @ (K x N) mod 2^32 by :func:`_gemm_kernel`; ``w``'s rows a multiple of 4 (:func:`_pad_rows`)."""
    out = np.empty((w.shape[0], cols.shape[1]), dtype=np.uint32)
    _gemm_kernel(np.ascontiguousarray(w), np.ascontiguousarray(cols), out)
    return out


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
    return _gemm(_pad_rows(a, _GEMM_R), b)[: a.shape[0]]


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


def _conv2d_gemm(x: np.ndarray, w: np.ndarray, ho: int, wo: int, stride: int, dil: int) -> np.ndarray:
    """A padded input's conv as im2col + :func:`_gemm`, a chunk of output rows at a time (the patch matrix
    of a 512^2 layer would be gigabytes)."""
    n, cout = x.shape[0], w.shape[0]
    k = w[0].size
    wm = np.ascontiguousarray(_pad_rows(w.reshape(cout, k), _GEMM_R))  # padded once, not per chunk
    out = np.empty((n, cout, ho, wo), dtype=np.uint32)
    rows = max(1, min(ho, _IM2COL_BYTES // (4 * k * wo)))  # output rows per chunk, per sample
    for b in range(n):
        for y0 in range(0, ho, rows):
            y1 = min(ho, y0 + rows)
            part = x[b : b + 1, :, y0 * stride : (y1 - 1) * stride + dil * (w.shape[2] - 1) + 1]
            res = _gemm(wm, _im2col(part, w.shape[2], w.shape[3], y1 - y0, wo, stride, dil))
            out[b, :, y0:y1] = res[:cout].reshape(cout, y1 - y0, wo)
    return out


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
    k = w[0].size
    if k >= _DIRECT_MIN_K and (cout >= _GEMM_MIN_COUT or k <= _GEMM_SMALL_K or wo < _DIRECT_MIN_WIDTH):
        return _conv2d_gemm(x, w, ho, wo, stride, dilation)
    w = _pad_rows(w, _COB)
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
