"""One scan, start to finish, for the data owner: the model's geometry, windows over every voxel, the
secure jobs, the mask back on the scan's own grid, and the files a hospital uses.

Steps (:func:`segment_scan`): fetch the plan; bring the scan to the model's training geometry (if the
plan records one); cut each slice into the model's windows; run the windows in jobs of ``batch``;
stitch the window cores; map the mask back (reorient, resample, undo padding); write the mask (NIfTI
with the scan's affine, NRRD beside an NRRD input, NPY otherwise), a DICOM SEG for a DICOM series, an
overlay of the scan in the model's display window (a three-plane montage at the label-weighted centre
for a volume) and the per-layer cost chart; the caller writes ``report.json`` (the report returned).
Nothing else is written: no plaintext copy of the scan unless ``keep_input``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from blindseg.errors import UsageError
from blindseg.plan import Plan, downsampling
from blindseg.report import cost_chart, sum_layers

from .client import Client
from .io import write_mask, write_nrrd_mask, write_overlay
from .pacs import SEG_DESCRIPTION
from .windows import cut, plan_windows, stitch

AUTO_JOB_BYTES = 512 * 2**20  # per server: the material of one job when the batch is chosen for you
AUTO_MAX_BATCH = 16


@dataclass(frozen=True)
class Options:
    batch: int | None = None  # windows per secure job; None: as many as fit AUTO_JOB_BYTES (at most 16)
    overlap: float = 0.25  # of the windows over slices larger than the model input
    retries: int = 1  # of a failed job, with a fresh bundle
    quiet: bool = False  # no progress bar
    keep_input: bool = False  # also write the scan as the model saw it (plaintext; off by default)

    def __post_init__(self) -> None:
        if self.batch is not None and self.batch < 1:
            raise UsageError("--batch must be at least 1")
        if self.retries < 0:
            raise UsageError("--retries must be at least 0")


@dataclass
class Result:
    mask: np.ndarray  # N x a x b labels; moveaxis(mask, 0, 2) lies on the scan's own voxel grid
    report: dict[str, Any]
    seg: Path | None  # the DICOM SEG (DICOM input only)


def job_sizes(windows: int, plan: Plan, batch: int | None) -> tuple[int, int]:
    """(jobs, windows per job): every job the same size, so one dealer pool (per model and batch size)
    serves the whole scan and stays warm; the last job is topped up with copies of its last window
    (fewer than one per job). ``batch`` None: the largest batch whose material per server stays
    within AUTO_JOB_BYTES."""
    from blindseg.layout import Layout

    if batch is None:
        per = max(1, Layout.of(plan, 1).material_bytes())
        batch = max(1, min(AUTO_MAX_BATCH, AUTO_JOB_BYTES // per))
    batch = min(batch, windows)
    jobs = -(-windows // batch)
    return jobs, -(-windows // jobs)


def display_window(plan: Plan, image: np.ndarray) -> tuple[float, float]:
    """The intensity window to show the scan in: the model's CT window if it has one, else the 1st-99th
    percentile of the image (on at most ~1M voxels)."""
    pre = plan.meta.get("preprocess") or {}
    if pre.get("kind") == "ct-window":
        c, w = float(pre["center"]), float(pre["width"])
        return c - w / 2, c + w / 2
    flat = image.ravel()
    flat = flat[:: max(1, flat.size // 1_000_000)]
    lo, hi = (np.percentile(flat, [1, 99]) if flat.size else (0.0, 1.0))
    return float(lo), float(max(hi, lo + 1e-6))


async def segment_scan(client: Client, model: str, raw: np.ndarray, meta: dict[str, Any], out: Path,
                       opts: Options) -> Result:
    """``raw``: N x C x H x W as read (:func:`data_owner.io.read_image`), ``meta`` its reader's record."""
    t0 = time.perf_counter()
    plan = await client.plan(model)
    if raw.shape[1] != plan.input_shape[0]:
        raise UsageError(f"{raw.shape[1]} channels in the scan, model {model} expects {plan.input_shape[0]}")
    if len(plan.input_shape) != 3:
        raise UsageError(f"model {model} is a {len(plan.input_shape) - 1}D model; the segment command feeds 2D "
                         "slices (use the Python API for volumes)")
    scan = raw  # as read, for the overlay
    back, geometry = None, None
    if meta["kind"] in ("nifti", "dicom", "nrrd") and plan.meta.get("geometry"):
        from .geometry import as_image, to_model_geometry

        image = meta["image"] if "image" in meta else as_image(raw, meta["affine"])
        raw, back, geometry = to_model_geometry(image, plan.meta["geometry"])
    win = plan_windows(raw.shape[2:], plan.input_shape[1:], opts.overlap,  # type: ignore[arg-type]
                       downsampling(plan.ops))
    tiles = cut(raw, win)
    sizes = job_sizes(len(tiles), plan, opts.batch)
    masks, costs = await _run_jobs(client, model, tiles, len(raw), win.count, opts, sizes)
    mask = stitch(np.concatenate(masks)[:len(tiles)], win)
    if back is not None:  # onto the scan's own voxel grid (slices along its last axis)
        mask = np.ascontiguousarray(np.moveaxis(back(mask), 2, 0))
    if "padding_mask" in meta:  # the scanner's PixelPaddingValue: outside the patient, never segmented
        mask = mask.copy()
        mask[meta["padding_mask"]] = 0
    out.mkdir(parents=True, exist_ok=True)
    names = list(plan.meta.get("class_names", [str(c) for c in range(plan.classes)]))
    volume = meta["kind"] in ("nifti", "dicom", "nrrd")
    written = [write_mask(out / ("mask.nii.gz" if volume else "mask.npy"), mask, meta)]
    if meta["kind"] == "nrrd":
        written.append(write_nrrd_mask(out / "mask.nrrd", mask, meta))
    seg = None
    if meta["kind"] == "dicom" and len(meta["files"]) == len(mask):  # for the PACS, beside the series
        from .dicomseg import write_seg

        seg = write_seg(out / "mask.seg.dcm", mask, meta["files"], names, SEG_DESCRIPTION.format(model=model))
        written.append(seg)
    window = display_window(plan, scan)
    written.append(write_overlay(out / "overlay.png", scan[:, 0], mask, names, f"blindseg {model}", window,
                                 meta.get("affine") if volume else None))
    if opts.keep_input:  # what the model saw, in the model's geometry (plaintext: only when asked)
        with open(out / "input.npy.part", "wb") as f:
            np.save(f, raw)
        (out / "input.npy.part").replace(out / "input.npy")
        written.append(out / "input.npy")
    report = {"model": model, "slices": int(len(scan)), "jobs": len(costs), "windows_per_job": sizes[1],
              **win.describe(),
              **({"geometry": geometry} if geometry is not None else {}),
              **({"skipped_files": meta["skipped"]} if meta.get("skipped") else {}),
              **({"series": meta["series"]} if meta.get("series") else {}),
              "voxels": int(mask.size), "voxels_segmented": int(mask.size),
              "padding_voxels": int(np.sum(meta.get("padding_mask", 0))),
              "display_window": list(window),
              "wall_seconds": time.perf_counter() - t0,
              "online_seconds": sum(c["online_seconds"] for c in costs),
              "wait_seconds": sum(c["wait_seconds"] for c in costs),  # part of online_seconds: before first rounds
              "rounds": sum(c["rounds"] for c in costs),
              "online_bytes_per_server": max(sum(c["server_bytes"][i] for c in costs) for i in (0, 1)),
              "offline_bytes_per_server": max(sum(c["offline_bytes"][i] for c in costs) for i in (0, 1)),
              "offline_seconds": sum(c["offline_seconds"] for c in costs),
              "clipped_voxels": sum(c["clipped_voxels"] for c in costs),
              "files": [p.name for p in written] + ["report.json", "cost.png"],
              "layers": sum_layers([c["layers"] for c in costs])}
    cost_chart(report, out / "cost.png", f"blindseg {model}: per-layer cost ({len(scan)} slices)")
    return Result(mask, report, seg)


async def _run_jobs(client: Client, model: str, tiles: np.ndarray, slices: int, per_slice: int, opts: Options,
                    sizes: tuple[int, int]) -> tuple[list[np.ndarray], list[dict[str, Any]]]:
    """The windows in ``sizes`` = (jobs, windows per job), with a bar in windows (advanced op by op
    inside each job, so the ETA is remaining windows at the measured rate) naming what it waits for."""
    from tqdm import tqdm

    n_jobs, per_job = sizes
    bar = tqdm(total=len(tiles), disable=opts.quiet, unit="window", smoothing=0.1,
               bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total} windows [{elapsed}<{remaining}]")
    head = f"{slices} slices x {per_slice} windows"
    done, size = [0.0], [0]
    masks: list[np.ndarray] = []
    costs: list[dict[str, Any]] = []

    def progress(op: int, n: int, phase: str) -> None:
        what = "waiting for a bundle" if phase == "bundle" else "online"
        bar.set_description_str(f"{head}, job {len(masks) + 1}/{n_jobs} {what}", refresh=False)
        frac = size[0] * op / max(n, 1)
        if frac > done[0]:
            bar.update(frac - done[0])
            done[0] = frac

    try:
        for i in range(0, len(tiles), per_job):
            part = tiles[i:i + per_job]
            size[0], done[0] = len(part), 0.0
            if len(part) < per_job:  # the same batch size as the others (the copies' labels are dropped)
                part = np.concatenate([part, np.repeat(part[-1:], per_job - len(part), axis=0)])
            bar.set_description_str(f"{head}, job {len(masks) + 1}/{n_jobs} starting")
            m, c = await client.segment(model, part, progress, retries=opts.retries)
            bar.update(size[0] - done[0])
            masks.append(m[:size[0]])
            costs.append(c)
        bar.set_description_str(f"{head}, writing results")
    finally:
        bar.close()
    return masks, costs
