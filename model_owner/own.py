"""The model owner's own model, from files: a ``torch.export`` program (``.pt2``), or a Python factory
``package.module:function`` plus a state dict; calibration samples from ``.npy`` / ``.npz`` (N x C x
spatial) or NIfTI (axial slices); the preprocessing and class names for the plan's metadata.

The result is a compiled, verified plan (:func:`blindseg.compiler.compile_model` /
:func:`~blindseg.compiler.compile_exported`): a model that does not compile into the same function,
or whose calibration cannot fit the ring, is refused here, before anything is deployed."""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from blindseg import intensity
from blindseg.compiler import compile_exported, compile_model
from blindseg.errors import UsageError
from blindseg.plan import Compiled


def load_samples(path: str | Path, preprocess: dict[str, Any] | None = None) -> np.ndarray:
    """Calibration samples as the model sees them (after ``preprocess``), N x C x spatial float64."""
    p = Path(path)
    if not p.exists():
        raise UsageError(f"calibration file {p} does not exist")
    name = p.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        import nibabel as nib

        vol = np.asarray(nib.load(str(p)).get_fdata(), dtype=np.float64)  # type: ignore[attr-defined]
        if vol.ndim != 3:
            raise UsageError(f"{p}: a calibration NIfTI must be one 3D volume, got shape {vol.shape}")
        arr = np.moveaxis(vol, 2, 0)[:, None]  # axial slices, N x 1 x H x W
    elif name.endswith(".npz"):
        with np.load(p) as z:
            if len(z.files) != 1:
                raise UsageError(f"{p}: a calibration .npz holds one array, this one {len(z.files)}")
            arr = np.asarray(z[z.files[0]], dtype=np.float64)
    elif name.endswith(".npy"):
        arr = np.asarray(np.load(p, allow_pickle=False), dtype=np.float64)
    else:
        raise UsageError(f"{p}: calibration samples are read from .npy, .npz or NIfTI (.nii, .nii.gz)")
    if arr.ndim < 4:
        raise UsageError(f"{p}: calibration samples must be N x C x H x W, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise UsageError(f"{p}: calibration samples contain NaN or infinite values")
    return intensity.apply(preprocess, arr) if preprocess else arr


def load_factory(spec: str, weights: str | Path | None) -> Any:
    """``package.module:function`` called with no arguments, then the state dict from ``weights``."""
    import torch

    mod_name, _, fn_name = spec.partition(":")
    if not mod_name or not fn_name:
        raise UsageError(f"model {spec!r}: give a .pt2 file or package.module:factory")
    try:
        factory = getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError) as exc:
        raise UsageError(f"model factory {spec!r} cannot be loaded: {exc}") from None
    model = factory()
    if not isinstance(model, torch.nn.Module):
        raise UsageError(f"{spec} returned a {type(model).__name__}, not a torch.nn.Module")
    if weights is not None:
        try:
            state = torch.load(str(weights), map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many kinds for a bad file
            raise UsageError(f"weights {weights} cannot be read as a state dict: {exc}") from None
        try:
            model.load_state_dict(state)
        except (RuntimeError, KeyError) as exc:
            raise UsageError(f"weights {weights} do not fit {spec}: {str(exc).splitlines()[0]}") from None
    return model.eval()


def parse_geometry(text: str | None) -> dict[str, Any] | None:
    """``RAS:2,2,2`` or ``RAS:1,1,3:rot90=1``: the orientation and voxel spacing (mm) the model was trained
    at, and the quarter turns applied to each axial slice in training (data owners bring scans to it)."""
    if text is None:
        return None
    parts = text.split(":")
    try:
        orient = parts[0].upper()
        spacing = [float(v) for v in parts[1].split(",")]
        rot = int(parts[2].split("=", 1)[1]) if len(parts) > 2 else 0
    except (IndexError, ValueError):
        raise UsageError(f"--geometry {text!r}: write e.g. RAS:2,2,2 or RAS:1,1,3:rot90=1") from None
    if len(orient) != 3 or set(orient) - set("RLAPSI") or len(spacing) != 3 or min(spacing) <= 0:
        raise UsageError(f"--geometry {text!r}: three axis codes (R/L, A/P, S/I) and three positive spacings")
    pairs = [{"R", "L"}, {"A", "P"}, {"S", "I"}]
    if any(len(p & set(orient)) != 1 for p in pairs):
        raise UsageError(f"--geometry {text!r}: each of R/L, A/P, S/I exactly once")
    return {"orientation": orient, "spacing": spacing, "rot90": rot}


def compile_own(model: str, samples: np.ndarray, weights: str | Path | None = None, output: str = "mask",
                preprocess: dict[str, Any] | None = None, class_names: list[str] | None = None,
                clip_input: bool = False, geometry: dict[str, Any] | None = None) -> Compiled:
    """Compile the owner's model (``.pt2`` path or ``module:factory``) on its calibration samples."""
    meta: dict[str, Any] = {"preprocess": preprocess or {"kind": "none"}, "name": Path(model).stem,
                            "clip_input": clip_input}
    if geometry is not None:
        meta["geometry"] = geometry
    shape = tuple(int(d) for d in samples.shape[1:])
    if model.endswith(".pt2"):
        comp = compile_exported(model, shape, output, "auto", samples, meta)
    else:
        comp = compile_model(load_factory(model, weights), shape, output, "auto", samples, meta)
    k = comp.plan.classes
    names = class_names or [f"class {i}" for i in range(k)]
    if len(names) != k:
        raise UsageError(f"{len(names)} class names for a model with {k} classes")
    comp.plan.meta["class_names"] = names
    return comp


def parse_preprocess(text: str | None) -> dict[str, Any] | None:
    """``none``, ``mri-percentile`` (p 99), ``ct-window:40,400`` or a JSON object."""
    if text is None:
        return None
    if text.startswith("{"):
        try:
            spec = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UsageError(f"--preprocess is not valid JSON: {exc}") from None
    elif text.startswith("ct-window:"):
        try:
            c, w = (float(v) for v in text.split(":", 1)[1].split(","))
        except ValueError:
            raise UsageError("--preprocess ct-window:<center>,<width>") from None
        spec = {"kind": "ct-window", "center": c, "width": w}
    elif text == "mri-percentile":
        spec = {"kind": "mri-percentile", "p": 99}
    else:
        spec = {"kind": text}
    intensity.apply(spec, np.zeros((1, 1, 2, 2)) + 1.0)  # refuses an unknown kind now, not at the hospital
    return spec
