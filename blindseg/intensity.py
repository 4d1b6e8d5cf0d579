"""The model owner's input preprocessing, carried in the plan's public metadata.

The data owner applies it before encoding, so nobody hand-normalises:

- ``{"kind": "mri-percentile", "p": 99}``: divide by the p-th percentile of the
  image's non-zero voxels (per image), clip to [0, 4];
- ``{"kind": "ct-window", "center": c, "width": w}``: Hounsfield window to [0, 1];
- ``{"kind": "none"}``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import UsageError


def apply(spec: dict[str, Any] | None, image: np.ndarray) -> np.ndarray:
    """``image`` N x C x H x W float -> what the model expects."""
    kind = (spec or {"kind": "none"}).get("kind", "none")
    if kind == "none":
        return np.asarray(image, dtype=np.float64)
    x = np.asarray(image, dtype=np.float32)
    if kind == "mri-percentile":
        p = float(spec.get("p", 99)) if spec else 99.0
        out = np.empty_like(x)
        for i in range(x.shape[0]):
            nz = x[i][x[i] > 0]
            scale = float(np.percentile(nz, p)) if nz.size else 1.0
            out[i] = np.clip(x[i] / (scale if scale > 0 else 1.0), 0.0, 4.0)
        return out
    if kind == "ct-window":
        c, w = float(spec["center"]), float(spec["width"])  # type: ignore[index]
        return np.clip((x - (c - w / 2)) / w, 0.0, 1.0)
    raise UsageError(f"unknown preprocessing kind {kind!r} in the model's plan")
