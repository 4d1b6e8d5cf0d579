"""The data owner (hospital): shares the image, and alone reconstructs the output.

Input checks happen here, before anything leaves: shape, dtype, NaN/inf and
range against the plan's public input description.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from blindseg.errors import UsageError
from blindseg.plan import Plan
from blindseg.prg import Prg, new_seed
from blindseg.ring import decode, encode


def validate_image(plan: Plan, image: Any) -> np.ndarray:
    """The image as float64 (N, C, *spatial) as the plan expects, or a UsageError naming the problem."""
    torch = sys.modules.get("torch")  # a tensor implies torch is loaded; never import it just to check
    if torch is not None and isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    arr = np.asarray(image)
    if arr.dtype.kind not in "fiu":
        raise UsageError(f"image must be a numeric array, got dtype {arr.dtype}")
    want = 2 + len(plan.input_shape) - 1
    if arr.ndim != want:
        axes = "N x C x " + " x ".join("DHW"[-(want - 2):])
        raise UsageError(f"image must be {axes} ({want - 2}D model), got {arr.ndim} dimensions {arr.shape}")
    if tuple(arr.shape[1:]) != plan.input_shape:
        raise UsageError(f"image has shape (C, *spatial) = {tuple(arr.shape[1:])}, the model expects {plan.input_shape}")
    if arr.shape[0] < 1:
        raise UsageError("image batch is empty")
    arr = arr.astype(np.float64)
    if not np.all(np.isfinite(arr)):
        raise UsageError("image contains NaN or infinite values")
    return arr


def share_image(plan: Plan, image: np.ndarray, seed: bytes | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Encode at the plan's scale and split: x0 uniform, x1 = x - x0."""
    x = encode(validate_image(plan, image), plan.frac_bits, "image")
    x0 = Prg(seed or new_seed()).uint32(x.shape)
    return x0, x - x0


def reconstruct(plan: Plan, out0: np.ndarray, out1: np.ndarray) -> np.ndarray:
    """Label mask (N x *spatial, int64) or logits (float) from the two servers' output shares."""
    if plan.output == "mask":
        bits = int(plan.ops[-1].params.bits)
        low = (out0.astype(np.uint32) + out1.astype(np.uint32)) & np.uint32((1 << bits) - 1)
        labels = (plan.classes - 1) - low.astype(np.int64)
        if labels.min() < 0:
            raise UsageError("reconstructed labels are out of range: the output shares are inconsistent")
        return labels
    return decode(out0 + out1, plan.frac_bits)
