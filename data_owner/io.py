"""Reading scans and writing masks (NIfTI, PNG, NPY) for the data owner."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from blindseg.errors import UsageError


def read_dicom_series(directory: str | Path, series: str | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """A DICOM series directory as N x 1 x H x W float32 in scanner units (HU for CT).

    Slices are sorted by position along the slice normal; RescaleSlope/Intercept applied. A folder
    holding several series needs ``series`` (a SeriesInstanceUID; the refusal lists them). Refused
    with a clear error: no DICOM files, inconsistent rows/columns/orientation/pixel spacing, uneven
    slice spacing. Files that are not DICOM images (a LICENSE, a DICOMDIR) are skipped and listed.
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
    slices = _one_series(d, slices, series)
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
                            "skipped": skipped, "series": str(uid) if uid else None}
    return _mask_padding(arr, pad, meta)


def _one_series(d: Path, slices: list[tuple[Path, Any]], series: str | None) -> list[tuple[Path, Any]]:
    """The files of the chosen series (``series``), or of the only one; several without a choice are
    refused, each listed with its modality, description and file count."""
    from collections import Counter

    uids = Counter(str(ds.get("SeriesInstanceUID", "")) for _, ds in slices)
    if series is not None:
        chosen = [(f, ds) for f, ds in slices if str(ds.get("SeriesInstanceUID", "")) == series]
        if not chosen:
            raise UsageError(f"{d}: no series {series}; it holds {_list_series(slices, uids)}")
        return chosen
    if len(uids) > 1:
        raise UsageError(f"{d}: holds {len(uids)} series ({_list_series(slices, uids)}); choose one with "
                         "--series <SeriesInstanceUID>")
    return slices


def _list_series(slices: list[tuple[Path, Any]], uids: Any) -> str:
    first = {str(ds.get("SeriesInstanceUID", "")): ds for _, ds in reversed(slices)}
    return "; ".join(f"{uid or '(no uid)'}: {first[uid].get('Modality', '?')} "
                     f"'{first[uid].get('SeriesDescription', '')}', {n} files" for uid, n in uids.most_common())


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


def name_is_dicom(p: Path) -> bool:
    return p.name.lower().endswith(".dcm") or _is_dicom(p)


def _is_dicom(p: Path) -> bool:
    with open(p, "rb") as f:
        head = f.read(132)
    return len(head) == 132 and head[128:132] == b"DICM"


_SPACE_SIGNS = {"right": 1, "left": -1, "anterior": 1, "posterior": -1, "superior": 1, "inferior": -1,
                "r": 1, "l": -1, "a": 1, "p": -1, "s": 1, "i": -1}


def _ras_signs(space: str) -> np.ndarray:
    """NRRD ``space`` (e.g. "left-posterior-superior", "RAS") -> the sign that maps each axis to RAS."""
    s = space.lower()
    parts = s.split("-") if "-" in s else list(s)
    if len(parts) != 3 or any(q not in _SPACE_SIGNS for q in parts):
        raise UsageError(f"NRRD space {space!r} is not an anatomical space (e.g. left-posterior-superior)")
    return np.asarray([_SPACE_SIGNS[q] for q in parts], dtype=np.float64)


def read_nrrd(p: Path) -> tuple[np.ndarray, dict[str, Any]]:
    """An NRRD volume (pynrrd) as axial slices with its affine in RAS (from ``space``, ``space
    directions`` and ``space origin``); refused if it has a non-spatial axis or no anatomical space."""
    import nibabel as nib
    import nrrd

    try:
        data, header = nrrd.read(str(p))
    except Exception as e:  # pynrrd raises its own NRRDError and OSErrors
        raise UsageError(f"{p}: cannot be read as NRRD ({e})") from None
    if data.ndim == 2:
        data = data[:, :, None]
    if data.ndim != 3:
        raise UsageError(f"{p}: expected a 2D or 3D NRRD volume, got {data.ndim} dimensions (a vector or "
                         "time axis is not a scan the model takes)")
    affine = np.eye(4)
    dirs = header.get("space directions")
    if dirs is not None:
        dirs = np.asarray(dirs, dtype=np.float64)
        if dirs.shape[0] == 2:  # a single slice: unit step along the normal
            dirs = np.vstack([dirs, np.cross(dirs[0], dirs[1]) / max(np.linalg.norm(np.cross(dirs[0], dirs[1])), 1e-9)])
        if dirs.shape != (3, 3) or not np.all(np.isfinite(dirs)):
            raise UsageError(f"{p}: NRRD 'space directions' are not three spatial axes ({dirs.tolist()})")
        affine[:3, :3] = dirs.T
        affine[:3, 3] = np.asarray(header.get("space origin", [0, 0, 0]), dtype=np.float64)
        signs = _ras_signs(str(header.get("space", "left-posterior-superior")))
        affine = np.diag([*signs, 1.0]) @ affine
    elif header.get("spacings") is not None:
        affine[:3, :3] = np.diag(np.asarray(header["spacings"], dtype=np.float64)[:3])
    img = nib.Nifti1Image(np.asarray(data, dtype=np.float32), affine)
    keep = {k: header[k] for k in ("space", "space directions", "space origin") if k in header}
    arr = np.moveaxis(np.asarray(data, dtype=np.float32), 2, 0)[:, None]
    return arr, {"kind": "nrrd", "affine": affine, "shape": data.shape, "image": img, "nrrd_header": keep}


def write_nrrd_mask(path: str | Path, mask: np.ndarray, meta: dict[str, Any]) -> Path:
    """The mask (N x a x b, slices along the scan's last axis) as NRRD with the input's space, directions
    and origin (gzip), atomically."""
    import nrrd

    p = Path(path)
    tmp = p.with_name(p.name + ".part")
    dtype = np.uint8 if mask.size == 0 or int(mask.max()) < 256 else np.uint16
    header = {**meta.get("nrrd_header", {}), "encoding": "gzip"}
    nrrd.write(str(tmp), np.ascontiguousarray(np.moveaxis(mask.astype(dtype), 0, 2)), header)
    tmp.replace(p)
    return p


def read_image(path: str | Path, series: str | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """A scan as N x 1 x H x W float32 (axial slices for a volume) plus what is needed to write it back.
    ``series``: the SeriesInstanceUID to read from a folder holding several."""
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{p}: no such file or directory")
    if series is not None and not (p.is_dir() or name_is_dicom(p)):
        raise UsageError(f"{p}: --series chooses a DICOM series; this is not DICOM")
    if p.is_dir():
        return read_dicom_series(p, series)
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
        elif name.endswith((".nrrd", ".nhdr")):
            return read_nrrd(p)
        elif name.endswith(".npy"):
            arr = np.load(p, allow_pickle=False)
            meta = {"kind": "npy"}
        elif name.endswith(".dcm") or _is_dicom(p):
            return read_dicom_series(p, series)  # one file: a single slice, or a multi-frame volume
        elif name.endswith(".png"):
            import matplotlib.image as mpimg

            arr = np.asarray(mpimg.imread(p), dtype=np.float32)
            if arr.ndim == 3:
                arr = arr[..., :3].mean(axis=2)
            meta = {"kind": "png"}
        else:
            raise UsageError(f"{p}: unsupported file type (NIfTI .nii/.nii.gz, NRRD .nrrd/.nhdr, .npy, .png, a DICOM "
                             "file or a DICOM series directory)")
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
                  title: str = "", window: tuple[float, float] | None = None, affine: np.ndarray | None = None
                  ) -> Path:
    """The scan in a display window (e.g. the model's CT window) with the classes alpha-blended and a
    legend (PNG). ``image``, ``mask``: H x W, or N x a x b with slices along the scan's last axis; with
    the scan's ``affine`` a volume is shown as a three-plane montage (axial, coronal, sagittal, in RAS
    with the voxel spacing as aspect) through the label-weighted centre, else its middle slice."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    image, mask = np.asarray(image), np.asarray(mask)
    if window is None:
        lo, hi = np.percentile(image, [1, 99]) if image.size else (0.0, 1.0)
        window = (float(lo), float(max(hi, lo + 1e-6)))
    if image.ndim == 2:
        panels = [(image, mask, 1.0, "")]
    elif affine is not None:
        panels = _three_planes(image, mask, affine)
    else:
        k = _centre(mask)[0] if image.ndim == 3 else 0
        panels = [(image[k], mask[k], 1.0, f"slice {k + 1}/{len(image)}")]
    colors = [(0, 0, 0, 0), (0.2, 0.6, 1.0, 0.45), (1.0, 0.3, 0.3, 0.45), (1.0, 0.9, 0.2, 0.45),
              (0.3, 1.0, 0.3, 0.45), (0.8, 0.3, 1.0, 0.45)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 5), dpi=120, squeeze=False)
    for ax, (img, m, aspect, label) in zip(axes[0], panels, strict=True):
        rgba = np.zeros((*m.shape, 4))
        for c in range(1, int(m.max()) + 1 if m.size else 1):
            rgba[m == c] = colors[c % len(colors)]
        ax.imshow(img, cmap="gray", vmin=window[0], vmax=window[1], aspect=aspect)
        ax.imshow(rgba, aspect=aspect)
        ax.set_axis_off()
        if label:
            ax.set_title(label, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    axes[0][-1].legend(handles=[Patch(color=colors[c % len(colors)][:3], label=n)
                                for c, n in enumerate(class_names) if c], loc="lower right", fontsize=7)
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".part.png")
    fig.savefig(tmp, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(p)
    return p


def _centre(mask: np.ndarray) -> tuple[int, ...]:
    """The label-weighted centre (of the non-background voxels), or the middle where there are none."""
    idx = np.nonzero(mask)
    if not idx[0].size:
        return tuple(n // 2 for n in mask.shape)
    return tuple(int(round(float(np.mean(i)))) for i in idx)


def _three_planes(image: np.ndarray, mask: np.ndarray, affine: np.ndarray
                  ) -> list[tuple[np.ndarray, np.ndarray, float, str]]:
    """Axial, coronal and sagittal planes through the label-weighted centre of the volume brought to the
    closest RAS axes (superior / anterior up)."""
    from nibabel import orientations as no

    ornt = no.ornt_transform(no.io_orientation(affine), no.axcodes2ornt(("R", "A", "S")))
    vol = no.apply_orientation(np.moveaxis(image, 0, 2), ornt)
    lab = no.apply_orientation(np.moveaxis(mask, 0, 2), ornt)
    zooms = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))[np.argsort(ornt[:, 0])]
    x, y, z = _centre(lab)
    planes = [(np.rot90(vol[:, :, z]), np.rot90(lab[:, :, z]), zooms[1] / zooms[0], f"axial {z + 1}/{vol.shape[2]}"),
            (np.rot90(vol[:, y, :]), np.rot90(lab[:, y, :]), zooms[2] / zooms[0], f"coronal {y + 1}/{vol.shape[1]}"),
            (np.rot90(vol[x, :, :]), np.rot90(lab[x, :, :]), zooms[2] / zooms[1], f"sagittal {x + 1}/{vol.shape[0]}")]
    return [p for p in planes if min(p[0].shape) > 2] or planes[:1]  # a thin slab: the axial plane only
