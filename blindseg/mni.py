"""MNI152 2009c slices: the real training and demo data, read offline from the nilearn wheel.

The ``nilearn`` wheel ships the ICBM 2009c symmetric template (197x233x189,
1 mm): a skull-stripped T1 averaged over many real subjects, with grey- and
white-matter probability maps. We resample to 2 mm (2x2x2 block means),
take axial slices, pad/crop them to 128x128 and label four classes:

    0 background (outside the brain), 1 CSF / other brain, 2 grey matter, 3 white matter

(inside the brain mask, the largest of p_gm, p_wm and 1 - p_gm - p_wm).
Train and test are contiguous slabs of axial slices with a ``gap`` of unused
slices between them, so no test slice is a neighbour of a training slice.
Nothing is downloaded: the files are found through the installed package
(``importlib.util.find_spec``, which does not import nilearn).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import UsageError

CLASSES = ("background", "csf/other", "grey matter", "white matter")
SIZE = 128


def template_dir() -> Path:
    spec = importlib.util.find_spec("nilearn")
    if spec is None or spec.origin is None:
        raise UsageError("the MNI152 template comes from the nilearn wheel: pip install nilearn")
    return Path(spec.origin).parent / "datasets" / "data"


def _load(kind: str) -> np.ndarray:
    import nibabel as nib

    path = template_dir() / f"mni_icbm152_{kind}_tal_nlin_sym_09a_converted.nii.gz"
    if not path.exists():
        raise UsageError(f"MNI152 file missing from the nilearn wheel: {path}")
    return np.asarray(nib.load(path).get_fdata(dtype=np.float32))  # type: ignore[attr-defined]


def _down2(v: np.ndarray) -> np.ndarray:
    x, y, z = (s // 2 * 2 for s in v.shape)
    v = v[:x, :y, :z]
    return v.reshape(x // 2, 2, y // 2, 2, z // 2, 2).mean(axis=(1, 3, 5))


def _fit(a: np.ndarray, size: int = SIZE) -> np.ndarray:
    """Centre-pad / centre-crop the two in-plane axes to ``size``."""
    out = np.zeros((size, size), dtype=a.dtype)
    h, w = a.shape
    sy, sx = max(0, (h - size) // 2), max(0, (w - size) // 2)
    dy, dx = max(0, (size - h) // 2), max(0, (size - w) // 2)
    ch, cw = min(h, size), min(w, size)
    out[dy:dy + ch, dx:dx + cw] = a[sy:sy + ch, sx:sx + cw]
    return out


@dataclass
class Slices:
    """Axial slices: ``image`` N x 1 x 128 x 128 float32 (raw T1 intensity), ``label`` N x 128 x 128 uint8."""

    image: np.ndarray
    label: np.ndarray
    z: np.ndarray  # axial index (2 mm voxels) of each slice


def volume() -> tuple[np.ndarray, np.ndarray]:
    """The 2 mm T1 volume and its 4-class label volume (x, y, z)."""
    t1, gm, wm = (_down2(_load(k)) for k in ("t1", "gm", "wm"))
    pg, pw = gm / 255.0, wm / 255.0
    brain = (t1 > 0) & ((pg + pw) > 0.05) | (t1 > 0.1 * t1.max())
    label = np.argmax(np.stack([1.0 - pg - pw, pg, pw]), axis=0).astype(np.uint8) + 1
    label[~brain] = 0
    return t1, label


def load_split(gap: int = 3, test_fraction: float = 0.2) -> tuple[Slices, Slices]:
    """(train, test) slabs of brain-containing axial slices, ``gap`` slices apart."""
    t1, label = volume()
    zs = [z for z in range(t1.shape[2]) if (label[:, :, z] > 0).sum() > 200]
    n_test = max(1, int(len(zs) * test_fraction))
    start = int(len(zs) * 0.55)
    test_z = zs[start:start + n_test]
    train_z = [z for z in zs if z < test_z[0] - gap or z > test_z[-1] + gap]

    def take(z_list: list[int]) -> Slices:
        img = np.stack([_fit(np.rot90(t1[:, :, z])) for z in z_list])[:, None].astype(np.float32)
        lab = np.stack([_fit(np.rot90(label[:, :, z])) for z in z_list]).astype(np.uint8)
        return Slices(img, lab, np.asarray(z_list))

    return take(train_z), take(test_z)


def dice(pred: np.ndarray, truth: np.ndarray, classes: int = 4) -> list[float]:
    """Per-class Dice coefficient (NaN where a class is absent from both)."""
    out = []
    for c in range(classes):
        p, t = pred == c, truth == c
        den = p.sum() + t.sum()
        out.append(float(2 * (p & t).sum() / den) if den else float("nan"))
    return out
