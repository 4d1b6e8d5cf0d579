"""Reading scans and writing masks (NIfTI, PNG, NPY) for the data owner."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from blindseg.errors import UsageError


def read_image(path: str | Path) -> tuple[np.ndarray, dict[str, Any]]:
    """A scan as N x 1 x H x W float32 (axial slices for a volume) plus what is needed to write it back."""
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{p}: no such file")
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
            meta = {"kind": "nifti", "affine": img.affine, "shape": vol.shape}
        elif name.endswith(".npy"):
            arr = np.load(p, allow_pickle=False)
            meta = {"kind": "npy"}
        elif name.endswith(".png"):
            import matplotlib.image as mpimg

            arr = np.asarray(mpimg.imread(p), dtype=np.float32)
            if arr.ndim == 3:
                arr = arr[..., :3].mean(axis=2)
            meta = {"kind": "png"}
        else:
            raise UsageError(f"{p}: unsupported file type (NIfTI .nii/.nii.gz, .npy or .png)")
    except UsageError:
        raise
    except Exception as e:
        raise UsageError(f"{p}: cannot be read as an image ({e.__class__.__name__})") from None
    arr = np.asarray(arr, dtype=np.float32)
    while arr.ndim < 4:
        arr = arr[None]
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
    if name.endswith((".nii", ".nii.gz")):
        import nibabel as nib

        affine = (meta or {}).get("affine", np.eye(4))
        vol = np.moveaxis(mask.astype(np.uint8), 0, 2)
        nib.save(nib.Nifti1Image(vol, affine), tmp.with_name(p.name + ".part" + (".nii.gz" if name.endswith(".gz") else ".nii")))
        tmp = tmp.with_name(p.name + ".part" + (".nii.gz" if name.endswith(".gz") else ".nii"))
    elif name.endswith(".png"):
        import matplotlib.pyplot as plt

        plt.imsave(tmp.with_suffix(".png"), mask[0], cmap="viridis", vmin=0, vmax=max(1, int(mask.max())))
        tmp = tmp.with_suffix(".png")
    else:
        with open(tmp, "wb") as f:
            np.save(f, mask.astype(np.uint8))
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
    ax.imshow(image, cmap="gray")
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
