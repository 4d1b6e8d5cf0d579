"""The data owner (hospital): shares the image, and alone reconstructs the output.

Input checks happen here, before anything leaves: shape, dtype, NaN/inf and
range against the plan's public input description.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from blindseg.errors import UsageError
from blindseg.plan import Plan, apply_head
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


def check_input_range(plan: Plan, x: np.ndarray) -> tuple[np.ndarray, int]:
    """Refuse (or clip, if the model owner's plan says so) an input outside the range the model was
    calibrated for, before anything is shared: every fixed-point bound of the plan was chosen on that
    range, so a value far outside it can overflow the ring and give a wrong mask with no error.

    Overflow is a matter of magnitude, so per channel the accepted range is +-(1 + ``margin``) times the
    largest calibrated magnitude. Returns the (possibly clipped) input and how many voxels were clipped."""
    r = plan.meta.get("input_range")
    if r is None:
        raise UsageError("this plan records no calibrated input range (compiled by an older blindseg): "
                         "ask the model owner to deploy it again")
    lo, hi = np.asarray(r["lo"], np.float64), np.asarray(r["hi"], np.float64)
    if lo.shape != (x.shape[1],):
        raise UsageError(f"the plan's input range has {lo.size} channels, the input {x.shape[1]}")
    bound = ((1.0 + float(r["margin"])) * np.maximum(np.abs(lo), np.abs(hi))).reshape(1, -1, *[1] * (x.ndim - 2))
    alo, ahi = -bound, bound
    out = (x < alo) | (x > ahi)
    n = int(out.sum())
    if not n:
        return x, 0
    if r.get("clip"):
        return np.clip(x, alo, ahi), n
    c = int(np.argmax(out.reshape(x.shape[0], x.shape[1], -1).any(axis=(0, 2))))
    xc = x[:, c]
    pre = plan.meta.get("preprocess")
    raise UsageError(
        f"input channel {c} spans [{xc.min():.4g}, {xc.max():.4g}] after the model's preprocessing "
        f"({pre or 'none'}), but the model was calibrated for [{lo[c]:.4g}, {hi[c]:.4g}] and accepts "
        f"[{alo.reshape(-1)[c]:.4g}, {ahi.reshape(-1)[c]:.4g}]: {n} of {x.size} voxels are outside, where the "
        "secure computation could overflow. Give the scan in the units the model expects, or ask the model "
        "owner to calibrate on scans like this one (or to allow clipping)")


def share_image(plan: Plan, image: np.ndarray, seed: bytes | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Check the input against the plan (shape, finiteness, calibrated range), encode at the plan's
    scale and split: x0 uniform, x1 = x - x0."""
    x, clipped = check_input_range(plan, validate_image(plan, image))
    x = encode(x, plan.frac_bits, "image")
    x0 = Prg(seed or new_seed()).uint32(x.shape)
    return x0, x - x0


def reconstruct(plan: Plan, out0: np.ndarray, out1: np.ndarray) -> np.ndarray:
    """Label mask (N x *spatial, int64) or logits (float; through the model's sigmoid/softmax head if it has
    one) from the two servers' output shares."""
    if plan.output == "mask":
        bits = int(plan.ops[-1].params.bits)
        low = (out0.astype(np.uint32) + out1.astype(np.uint32)) & np.uint32((1 << bits) - 1)
        labels = (plan.classes - 1) - low.astype(np.int64)
        if labels.min() < 0:
            raise UsageError("reconstructed labels are out of range: the output shares are inconsistent")
        return labels
    return apply_head(plan.meta.get("head"), decode(out0 + out1, plan.output_scale))

