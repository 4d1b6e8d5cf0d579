"""Covering every voxel: a slice larger than the model's input is segmented in overlapping windows
(as MONAI's ``sliding_window_inference``), a smaller one is padded; no voxel is cropped away.

Windows start on a grid of ``stride = size * (1 - overlap)`` (rounded down to the model's total
downsampling factor, so every window sees the pooling grid the same way) and the last one is flush
with the far edge. Each voxel takes its label from the window whose centre is nearest along each
axis (the window's *core*): the voxels nearest a window's edge, where the model sees the least
context, are taken from the neighbouring window instead. Padding uses the slice's own minimum
(air / background in scanner units), never 0 (which is water in CT).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from blindseg.errors import UsageError


@dataclass(frozen=True)
class Windows:
    """Where the model's windows lie on one slice grid (per axis: window starts; the pad around it)."""

    image: tuple[int, int]
    size: tuple[int, int]
    starts: tuple[tuple[int, ...], tuple[int, ...]]
    pad: tuple[int, int]  # padding before the image on each axis (when it is smaller than a window)

    @property
    def count(self) -> int:
        return len(self.starts[0]) * len(self.starts[1])

    def describe(self) -> dict[str, object]:
        return {"windows_per_slice": self.count, "window": list(self.size), "image": list(self.image),
                "starts": [list(s) for s in self.starts], "padded": any(self.pad)}


def _axis(n: int, size: int, overlap: float, align: int) -> tuple[int, ...]:
    if n <= size:
        return (0,)
    stride = max(align, int(size * (1.0 - overlap)) // align * align)
    starts = list(range(0, n - size, stride)) + [n - size]
    return tuple(sorted(set(starts)))


def plan_windows(image: tuple[int, int], size: tuple[int, int], overlap: float = 0.25, align: int = 1) -> Windows:
    if not 0.0 <= overlap < 1.0:
        raise UsageError(f"window overlap {overlap} must be in [0, 1)")
    starts = (_axis(image[0], size[0], overlap, align), _axis(image[1], size[1], overlap, align))
    pad = (max(0, (size[0] - image[0]) // 2), max(0, (size[1] - image[1]) // 2))
    return Windows(image, size, starts, pad)


def cut(arr: np.ndarray, w: Windows) -> np.ndarray:
    """N x C x H x W slices -> (N * windows) x C x h x w model inputs (slice-major order)."""
    n, c = arr.shape[:2]
    h, wd = w.size
    if any(w.pad) or arr.shape[2] < h or arr.shape[3] < wd:
        fill = arr.reshape(n, -1).min(axis=1).reshape(n, 1, 1, 1)
        big = np.broadcast_to(fill, (n, c, max(h, arr.shape[2]), max(wd, arr.shape[3]))).copy()
        big[:, :, w.pad[0]:w.pad[0] + arr.shape[2], w.pad[1]:w.pad[1] + arr.shape[3]] = arr
        arr = big
    out = [arr[:, :, y:y + h, x:x + wd] for y in w.starts[0] for x in w.starts[1]]
    return np.stack(out, axis=1).reshape(n * w.count, c, h, wd)


def _owner(n: int, size: int, starts: tuple[int, ...]) -> np.ndarray:
    """For each position on an axis, the index of the window whose centre is nearest."""
    centres = np.asarray(starts) + size / 2.0
    pos = np.arange(n) + 0.5
    return np.argmin(np.abs(pos[:, None] - centres[None, :]), axis=1)


def stitch(masks: np.ndarray, w: Windows) -> np.ndarray:
    """(N * windows) x h x w labels -> N x H x W labels on the slice grid (every voxel from one window)."""
    h, wd = w.size
    ny, nx = len(w.starts[0]), len(w.starts[1])
    n = masks.shape[0] // w.count
    m = masks.reshape(n, ny, nx, h, wd)
    hh, ww = max(h, w.image[0]), max(wd, w.image[1])
    oy, ox = _owner(hh, h, w.starts[0]), _owner(ww, wd, w.starts[1])
    yy, xx = np.meshgrid(np.arange(hh), np.arange(ww), indexing="ij")
    iy, ix = oy[yy], ox[xx]
    ly, lx = yy - np.asarray(w.starts[0])[iy], xx - np.asarray(w.starts[1])[ix]
    full = m[:, iy, ix, ly, lx]
    return np.ascontiguousarray(full[:, w.pad[0]:w.pad[0] + w.image[0], w.pad[1]:w.pad[1] + w.image[1]])

