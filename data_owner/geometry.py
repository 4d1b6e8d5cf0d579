"""Scans in their own geometry: reoriented and resampled to the model's training geometry (from the
plan), and the mask mapped back onto the scan's own voxel grid and affine.

The plan's ``meta["geometry"]``: ``orientation`` (axis codes, e.g. "RAS"), ``spacing`` (mm per voxel,
3 values), ``rot90`` (quarter turns applied to each axial slice in training: the bundled MNI model
was trained on ``np.rot90(volume[:, :, z])``). A NIfTI scan in any orientation and spacing is brought
to that geometry (nibabel's orientation tools; linear resampling of the image), segmented, and the
labels are resampled back with nearest neighbour and reoriented to the scan's own axes -- so a scan
in LPS, or at 1 mm, gives the same mask (up to resampling) as the same scan in RAS at 2 mm.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from blindseg.errors import UsageError


def _resize(vol: np.ndarray, shape: tuple[int, ...], mode: str) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    if tuple(vol.shape) == tuple(shape):
        return vol
    t = torch.as_tensor(np.ascontiguousarray(vol), dtype=torch.float64)[None, None]
    if mode == "nearest":
        out = F.interpolate(t, size=shape, mode="nearest-exact")
    else:
        out = F.interpolate(t, size=shape, mode="trilinear", align_corners=False)
    return out[0, 0].numpy()


def to_model_geometry(img: Any, geometry: dict[str, Any]) -> tuple[np.ndarray, Callable[[np.ndarray], np.ndarray],
                                                                   dict[str, Any]]:
    """(axial slices N x 1 x H x W in the model's geometry, a function mapping an N x H x W label mask
    back onto the scan's own voxel grid, what was done) for a nibabel image."""
    import nibabel as nib
    from nibabel import orientations as no

    want = str(geometry.get("orientation", "RAS"))
    spacing = np.asarray(geometry.get("spacing", [1.0, 1.0, 1.0]), dtype=np.float64)
    turns = int(geometry.get("rot90", 0))
    data = np.asarray(img.get_fdata(dtype=np.float32))
    if data.ndim == 2:
        data = data[:, :, None]
    if data.ndim != 3:
        raise UsageError(f"expected a 2D or 3D scan, got {data.ndim} dimensions")
    if spacing.shape != (3,) or np.any(spacing <= 0) or len(want) != 3:
        raise UsageError(f"the plan's geometry is malformed: {geometry}")
    src = no.io_orientation(img.affine)
    dst = no.axcodes2ornt(tuple(want))
    to_model = no.ornt_transform(src, dst)
    vol = no.apply_orientation(data, to_model)
    zooms = np.abs(np.asarray(img.header.get_zooms()[:3], dtype=np.float64))
    zooms = zooms[np.argsort(to_model[:, 0])] if data.ndim == 3 else zooms  # in the model's axis order
    oriented_shape = vol.shape
    target = tuple(max(1, int(round(n * z / s))) for n, z, s in zip(vol.shape, zooms, spacing, strict=True))
    vol = _resize(vol, target, "linear")
    slices = np.stack([np.rot90(vol[:, :, k], turns) for k in range(vol.shape[2])])[:, None].astype(np.float32)
    back_ornt = no.ornt_transform(dst, src)

    def back(mask: np.ndarray) -> np.ndarray:
        m = np.stack([np.rot90(mask[k], -turns) for k in range(mask.shape[0])], axis=2)
        m = np.rint(_resize(m.astype(np.float64), oriented_shape, "nearest")).astype(mask.dtype)
        return np.asarray(no.apply_orientation(m, back_ornt))

    info = {"orientation": "".join(nib.aff2axcodes(img.affine)), "model_orientation": want,
            "spacing": [float(z) for z in zooms], "model_spacing": [float(s) for s in spacing],
            "resampled_shape": list(target)}
    return slices, back, info


def as_image(slices: np.ndarray, affine: np.ndarray) -> Any:
    """N x 1 x rows x cols slices (a DICOM series, sorted along its normal) with the affine of the array
    axes (row, column, slice) -> RAS, as a nibabel image (the one geometry path for every input)."""
    import nibabel as nib

    return nib.Nifti1Image(np.ascontiguousarray(np.moveaxis(slices[:, 0], 0, 2), dtype=np.float32), affine)
