"""``python -m data_owner segment --config data_owner.toml --model ID --input FILE|demo --out DIR``"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from blindseg.config import PartyConfig
from blindseg.errors import UsageError
from blindseg.node import run_service
from blindseg.report import sum_layers


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m data_owner")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("segment", help="segment a scan on the deployment")
    s.add_argument("--config", required=True)
    s.add_argument("--model", required=True, help="model id deployed by the model owner")
    s.add_argument("--input", required=True,
                   help="NIfTI, NPY or PNG file, a DICOM series directory, or 'demo' (a bundled MNI152 test slice)")
    s.add_argument("--out", required=True, type=Path, help="output directory (mask, overlay, report.json)")
    s.add_argument("--batch", type=int, default=8, help="slices per secure job")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.add_argument("--retries", type=int, default=1, help="retry a failed job this many times (fresh bundle)")
    s.add_argument("--pacs", default=None,
                   help="DICOMweb root of the PACS (e.g. http://pacs:8042/dicom-web): store the DICOM SEG there")
    s.add_argument("--pacs-user", default=None)
    s.add_argument("--pacs-password-file", default=None)
    s.add_argument("--overlap", type=float, default=0.25,
                   help="overlap of the windows over slices larger than the model input (0 <= overlap < 1)")
    args = ap.parse_args(argv)

    async def go() -> None:
        from blindseg.models import demo_slices
        from blindseg.plan import downsampling

        from .client import Client
        from .io import read_image, write_mask, write_overlay
        from .windows import cut, plan_windows, stitch

        if args.batch < 1:
            raise UsageError("--batch must be at least 1")
        if args.input == "demo":
            d = demo_slices()
            k = len(d["test_image"]) // 2
            raw, meta = d["test_image"][k:k + 1].astype(np.float32), dict[str, Any](kind="npy")
        else:
            raw, meta = read_image(args.input)
        cfg = PartyConfig.load(args.config, "data_owner")
        masks, costs = [], []
        async with Client(cfg) as client:
            plan = await client.plan(args.model)
            if raw.shape[1] != plan.input_shape[0]:
                raise UsageError(f"{args.input}: {raw.shape[1]} channels, model {args.model} expects "
                                 f"{plan.input_shape[0]}")
            if len(plan.input_shape) != 3:
                raise UsageError(f"model {args.model} is a {len(plan.input_shape) - 1}D model; the segment command "
                                 "feeds 2D slices (use the Python API for volumes)")
            back = None
            if meta["kind"] in ("nifti", "dicom") and plan.meta.get("geometry"):  # the model's orientation, spacing
                from .geometry import as_image, to_model_geometry

                image = meta["image"] if meta["kind"] == "nifti" else as_image(raw, meta["affine"])
                meta["image"] = image
                raw, back, meta["geometry"] = to_model_geometry(image, plan.meta["geometry"])
            # every voxel is covered: windows of the model's input size over larger slices, padding for smaller
            win = plan_windows(raw.shape[2:], plan.input_shape[1:], args.overlap,  # type: ignore[arg-type]
                               downsampling(plan.ops))
            tiles = cut(raw, win)
            from tqdm import tqdm

            n_jobs = -(-len(tiles) // args.batch)
            # progress in windows (what the user waits for), advanced op by op inside each job: the ETA is the
            # remaining windows at the measured rate, not ops of very different cost
            bar = tqdm(total=len(tiles), disable=args.quiet, unit="window", smoothing=0.1,
                       bar_format="{l_bar}{bar}| {n:.1f}/{total} windows [{elapsed}<{remaining}]",
                       desc=f"secure inference ({len(raw)} slices, {win.count} windows each, {n_jobs} jobs)")
            done = [0.0]

            def progress(op: int, n: int) -> None:
                frac = size * op / max(n, 1)
                if frac > done[0]:
                    bar.update(frac - done[0])
                    done[0] = frac

            for i in range(0, len(tiles), args.batch):
                size = len(tiles[i:i + args.batch])
                done[0] = 0.0
                m, c = await client.segment(args.model, tiles[i:i + args.batch], progress, retries=args.retries)
                bar.update(size - done[0])
                masks.append(m)
                costs.append(c)
            bar.close()
        mask = stitch(np.concatenate(masks), win)
        shown, mid = raw[len(raw) // 2, 0], len(raw) // 2
        if back is not None:  # onto the scan's own voxel grid (x, y, z), slices along the last axis
            vol = back(mask)
            mask = np.moveaxis(vol, 2, 0)
            mid = len(mask) // 2
            shown = np.asarray(meta["image"].get_fdata(dtype=np.float32))[:, :, mid]
            mask = mask.copy()
        if "padding_mask" in meta:  # the scanner's PixelPaddingValue: outside the patient, never segmented
            mask[meta["padding_mask"]] = 0
        out: Path = args.out
        out.mkdir(parents=True, exist_ok=True)
        write_mask(out / ("mask.nii.gz" if meta["kind"] in ("nifti", "dicom") else "mask.npy"), mask, meta)
        names = plan.meta.get("class_names", [str(c) for c in range(plan.classes)])
        if meta["kind"] == "dicom" and len(meta["files"]) == len(mask):  # back into the PACS beside the series
            from .dicomseg import write_seg

            seg = write_seg(out / "mask.seg.dcm", mask, meta["files"], names, f"blindseg {args.model}")
            if args.pacs:
                from .dicomseg import store_to_pacs

                password = Path(args.pacs_password_file).read_text().strip() if args.pacs_password_file else None
                meta["pacs"] = {"url": args.pacs, "sop_instance_uid": store_to_pacs(args.pacs, seg, args.pacs_user,
                                                                                    password)}
        elif args.pacs:
            raise UsageError("--pacs stores a DICOM SEG, which needs a DICOM input series")
        shown_mask = mask[mid]
        if meta["kind"] == "nifti":  # NIfTI (x, y) slices, shown as radiologists view them
            shown, shown_mask = np.rot90(shown), np.rot90(shown_mask)
        write_overlay(out / "overlay.png", shown, shown_mask, names, f"blindseg {args.model}")
        report = {"model": args.model, "slices": len(raw), "jobs": len(costs), **win.describe(),
                  **({"geometry": meta["geometry"]} if back is not None else {}),
                  **({"pacs": meta["pacs"]} if "pacs" in meta else {}),
                  "voxels": int(mask.size), "voxels_segmented": int(mask.size),
                  "padding_voxels": int(np.sum(meta.get("padding_mask", 0))),
                  "online_seconds": sum(c["online_seconds"] for c in costs),
                  "rounds": sum(c["rounds"] for c in costs),
                  "online_bytes_per_server": max(sum(c["server_bytes"][i] for c in costs) for i in (0, 1)),
                  "offline_bytes_per_server": max(sum(c["offline_bytes"][i] for c in costs) for i in (0, 1)),
                  "offline_seconds": sum(c["offline_seconds"] for c in costs),
                  "layers": sum_layers([c["layers"] for c in costs])}
        (out / "report.json").write_text(json.dumps(report, indent=1))
        from blindseg.report import cost_chart

        cost_chart(report, out / "cost.png", f"blindseg {args.model}: per-layer cost ({len(raw)} slices)")
        print(json.dumps({k: v for k, v in report.items() if k != "layers"}), flush=True)

    return run_service(go())


sys.exit(main())
