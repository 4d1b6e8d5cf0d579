"""Reading scans and writing masks (NIfTI, PNG, NPY) for the data owner."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from blindseg.errors import UsageError


def read_dicom_series(directory: str | Path) -> tuple[np.ndarray, dict[str, Any]]:
    """A DICOM series directory as N x 1 x H x W float32 in scanner units (HU for CT).

    Slices are sorted by position along the slice normal; RescaleSlope/Intercept applied.
    Refused with a clear error: no DICOM files, a file without pixel data, mixed series,
    inconsistent rows/columns/orientation/pixel spacing, uneven slice spacing.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    d = Path(directory)
    files = [d] if d.is_file() else sorted(f for f in d.iterdir() if f.is_file() and not f.name.startswith("."))
    slices, skipped = [], []
    for f in files:
        try:
            ds = pydicom.dcmread(f)
        except (InvalidDicomError, OSError, ValueError):
            skipped.append(f.name)  # a README, LICENSE or DICOMDIR-like file beside the series
            continue
        if "PixelData" not in ds:
            skipped.append(f.name)
            continue
        slices.append((f, ds))
    if not slices:
        raise UsageError(f"{d}: no DICOM image files" + (f" (skipped: {', '.join(skipped[:5])})" if skipped else ""))
    if len(slices) == 1 and int(slices[0][1].get("NumberOfFrames", 1) or 1) > 1:
        return _multiframe(*slices[0], skipped)
    from collections import Counter

    # the reference slice is one of the majority geometry, so the odd file out is the one named
    common = Counter((ds.Rows, ds.Columns, ds.get("SeriesInstanceUID")) for _, ds in slices).most_common(1)[0][0]
    first = next(ds for _, ds in slices if (ds.Rows, ds.Columns, ds.get("SeriesInstanceUID")) == common)
    uid = first.get("SeriesInstanceUID")
    orient = np.asarray(first.get("ImageOrientationPatient", [1, 0, 0, 0, 1, 0]), dtype=np.float64)
    spacing = np.asarray(first.get("PixelSpacing", [1, 1]), dtype=np.float64)
    normal = np.cross(orient[:3], orient[3:])
    keyed = []
    for f, ds in slices:
        if ds.get("SeriesInstanceUID") != uid:
            raise UsageError(f"{f}: belongs to another series (mixed series in {d})")
        if (ds.Rows, ds.Columns) != (first.Rows, first.Columns):
            raise UsageError(f"{f}: {ds.Rows}x{ds.Columns} pixels, the series has {first.Rows}x{first.Columns}")
        if not np.allclose(np.asarray(ds.get("ImageOrientationPatient", orient), dtype=np.float64), orient, atol=1e-4):
            raise UsageError(f"{f}: slice orientation differs from the rest of the series")
        if not np.allclose(np.asarray(ds.get("PixelSpacing", spacing), dtype=np.float64), spacing, rtol=1e-4):
            raise UsageError(f"{f}: pixel spacing differs from the rest of the series")
        pos = ds.get("ImagePositionPatient")
        key = float(np.dot(np.asarray(pos, dtype=np.float64), normal)) if pos is not None else float(ds.get("InstanceNumber", 0))
        keyed.append((key, f, ds))
    keyed.sort(key=lambda t: t[0])
    if len(keyed) > 2:
        gaps = np.diff([k for k, _, _ in keyed])
        if np.any(gaps <= 0) or np.ptp(gaps) > 0.01 * max(abs(float(np.median(gaps))), 1e-6):
            raise UsageError(f"{d}: slices are not evenly spaced (inconsistent geometry or duplicate positions)")
    vol, pads = [], []
    for _, f, ds in keyed:
        try:
            raw_px = ds.pixel_array
        except Exception as e:
            raise UsageError(f"{f}: pixel data cannot be decoded ({e.__class__.__name__})") from None
        pads.append(_padding(ds, raw_px))
        vol.append(raw_px.astype(np.float32) * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0)))
    arr = np.stack(vol)[:, None]
    pad = np.stack(pads)
    p0 = np.asarray(keyed[0][2].get("ImagePositionPatient", [0, 0, 0]), dtype=np.float64)
    dz = float(np.median(np.diff([k for k, _, _ in keyed]))) if len(keyed) > 1 else 1.0
    affine = np.eye(4)  # LPS (DICOM) -> RAS (NIfTI): flip the first two axes
    affine[:3, 0] = orient[3:] * spacing[0]
    affine[:3, 1] = orient[:3] * spacing[1]
    affine[:3, 2] = normal * dz
    affine[:3, 3] = p0
    affine = np.diag([-1, -1, 1, 1]) @ affine
    meta: dict[str, Any] = {"kind": "dicom", "affine": affine, "files": [str(f) for _, f, _ in keyed],
                            "skipped": skipped}
    return _mask_padding(arr, pad, meta)


def _padding(ds: Any, px: np.ndarray) -> np.ndarray:
    """Voxels equal to the scanner's PixelPaddingValue (e.g. -3024 HU outside the CT field of view)."""
    val = ds.get("PixelPaddingValue")
    if val is None:
        return np.zeros(px.shape, dtype=bool)
    hi = ds.get("PixelPaddingRangeLimit")
    lo, hi = (min(val, hi), max(val, hi)) if hi is not None else (val, val)
    return (px >= lo) & (px <= hi)


def _mask_padding(arr: np.ndarray, pad: np.ndarray, meta: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
    """Padding voxels take the lowest real value (they must not enter the model as -3024 HU); the
    data owner sets their label to background and reports how many there were."""
    pad = pad.reshape(arr.shape)
    if pad.any():
        real = arr[~pad]
        arr = arr.copy()
        arr[pad] = real.min() if real.size else 0.0
        meta["padding_mask"] = pad[:, 0]
    return arr, meta


def _multiframe(f: Path, ds: Any, skipped: list[str]) -> tuple[np.ndarray, dict[str, Any]]:
    """An enhanced (multi-frame) DICOM: frames ordered along the slice normal from the per-frame
    plane positions; refused if they are not recorded."""
    try:
        frames = ds.pixel_array
    except Exception as e:
        raise UsageError(f"{f}: pixel data cannot be decoded ({e.__class__.__name__})") from None
    groups = ds.get("PerFrameFunctionalGroupsSequence")
    shared = ds.get("SharedFunctionalGroupsSequence")
    try:
        pos = [np.asarray(g.PlanePositionSequence[0].ImagePositionPatient, dtype=np.float64) for g in groups]
        plane = (shared[0] if shared else groups[0]).PlaneOrientationSequence[0]
        orient = np.asarray(plane.ImageOrientationPatient, dtype=np.float64)
        measures = (shared[0] if shared else groups[0]).PixelMeasuresSequence[0]
        spacing = np.asarray(measures.PixelSpacing, dtype=np.float64)
    except (AttributeError, IndexError, TypeError, KeyError):
        raise UsageError(f"{f}: multi-frame DICOM without per-frame positions and orientation; cannot place "
                         "its frames") from None
    normal = np.cross(orient[:3], orient[3:])
    order = np.argsort([float(np.dot(p, normal)) for p in pos])
    slope, inter = float(ds.get("RescaleSlope", 1)), float(ds.get("RescaleIntercept", 0))
    try:
        ts = shared[0].PixelValueTransformationSequence[0] if shared else None
        if ts is not None:
            slope, inter = float(ts.RescaleSlope), float(ts.RescaleIntercept)
    except (AttributeError, IndexError):
        pass
    raw_px = frames[order]
    arr = (raw_px.astype(np.float32) * slope + inter)[:, None]
    keys = sorted(float(np.dot(p, normal)) for p in pos)
    dz = float(np.median(np.diff(keys))) if len(keys) > 1 else 1.0
    affine = np.eye(4)
    affine[:3, 0], affine[:3, 1], affine[:3, 2] = orient[3:] * spacing[0], orient[:3] * spacing[1], normal * dz
    affine[:3, 3] = pos[int(order[0])]
    meta: dict[str, Any] = {"kind": "dicom", "affine": np.diag([-1, -1, 1, 1]) @ affine, "files": [str(f)],
                            "skipped": skipped, "frames": int(len(order))}
    return _mask_padding(arr, _padding(ds, raw_px), meta)


def _is_dicom(p: Path) -> bool:
    with open(p, "rb") as f:
        head = f.read(132)
    return len(head) == 132 and head[128:132] == b"DICM"


def read_image(path: str | Path) -> tuple[np.ndarray, dict[str, Any]]:
    """A scan as N x 1 x H x W float32 (axial slices for a volume) plus what is needed to write it back."""
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{p}: no such file or directory")
    if p.is_dir():
        return read_dicom_series(p)
    name = p.name.lower()
    try:
        if name.endswith((".nii", ".nii.gz")):
            import nibabel as nib

            img: Any = nib.load(p)
            vol = np.asarray(img.get_fdata(dtype=np.float32))
            if vol.ndim == 2:
                vol = vol[:, :, None]
            if vol.ndim != 3:
                raise UsageError(f"{p}: expected a 2D or 3D volume, got {vol.ndim} dimensions")
            arr = np.moveaxis(vol, 2, 0)[:, None]
            meta = {"kind": "nifti", "affine": img.affine, "shape": vol.shape, "image": img}
        elif name.endswith(".npy"):
            arr = np.load(p, allow_pickle=False)
            meta = {"kind": "npy"}
        elif name.endswith(".dcm") or _is_dicom(p):
            return read_dicom_series(p)  # one file: a single slice, or a multi-frame volume
        elif name.endswith(".png"):
            import matplotlib.image as mpimg

            arr = np.asarray(mpimg.imread(p), dtype=np.float32)
            if arr.ndim == 3:
                arr = arr[..., :3].mean(axis=2)
            meta = {"kind": "png"}
        else:
            raise UsageError(f"{p}: unsupported file type (NIfTI .nii/.nii.gz, .npy, .png, a DICOM file or a DICOM "
                             "series directory)")
    except UsageError:
        raise
    except Exception as e:
        raise UsageError(f"{p}: cannot be read as an image ({e.__class__.__name__})") from None
    arr = np.asarray(arr, dtype=np.float32)
    if arr.ndim == 2:
        arr = arr[None, None]
    elif arr.ndim == 3:
        arr = arr[:, None]  # a stack of 2D slices
    if arr.size == 0:
        raise UsageError(f"{p}: the image is empty")
    if arr.ndim != 4:
        raise UsageError(f"{p}: expected at most 4 dimensions, got {arr.ndim}")
    return arr, meta


def write_mask(path: str | Path, mask: np.ndarray, meta: dict[str, Any] | None = None) -> Path:
    """Write N x H x W labels as .npy, .png (first slice) or NIfTI (with the input's affine); atomically."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".part")
    name = p.name.lower()
    dtype = np.uint8 if mask.size == 0 or int(mask.max()) < 256 else np.uint16  # never wraps a label
    if name.endswith((".nii", ".nii.gz")):
        import nibabel as nib

        affine = (meta or {}).get("affine", np.eye(4))
        vol = np.moveaxis(mask.astype(dtype), 0, 2)
        nib.save(nib.Nifti1Image(vol, affine), tmp.with_name(p.name + ".part" + (".nii.gz" if name.endswith(".gz") else ".nii")))
        tmp = tmp.with_name(p.name + ".part" + (".nii.gz" if name.endswith(".gz") else ".nii"))
    elif name.endswith(".png"):
        import matplotlib.pyplot as plt

        plt.imsave(tmp.with_suffix(".png"), mask[0], cmap="viridis", vmin=0, vmax=max(1, int(mask.max())))
        tmp = tmp.with_suffix(".png")
    else:
        with open(tmp, "wb") as f:
            np.save(f, mask.astype(dtype))
    tmp.replace(p)
    return p


def write_overlay(path: str | Path, image: np.ndarray, mask: np.ndarray, class_names: list[str],
                  title: str = "") -> Path:
    """Image with coloured classes and a legend (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    colors = [(0, 0, 0, 0), (0.2, 0.6, 1.0, 0.45), (1.0, 0.3, 0.3, 0.45), (1.0, 0.9, 0.2, 0.45),
              (0.3, 1.0, 0.3, 0.45), (0.8, 0.3, 1.0, 0.45)]
    rgba = np.zeros((*mask.shape, 4))
    for c in range(1, int(mask.max()) + 1):
        rgba[mask == c] = colors[c % len(colors)]
    fig, ax = plt.subplots(figsize=(5, 5), dpi=120)
    lo, hi = np.percentile(image, [1, 99]) if image.size else (0, 1)
    ax.imshow(image, cmap="gray", vmin=lo, vmax=max(hi, lo + 1e-6))  # a display window, e.g. for CT in HU
    ax.imshow(rgba)
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=9)
    ax.legend(handles=[Patch(color=colors[c % len(colors)][:3], label=n) for c, n in enumerate(class_names) if c],
              loc="lower right", fontsize=7)
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".part.png")
    fig.savefig(tmp, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(p)
    return p
