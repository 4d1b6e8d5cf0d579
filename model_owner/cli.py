"""Model owner command line: ``train`` the demo model, ``deploy`` a model to a deployment."""

from __future__ import annotations

import argparse
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m model_owner")
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train the MNI152 demo model (fixed seed)")
    t.add_argument("--out", type=Path, default=None)
    t.add_argument("--steps", type=int, default=1500)
    t.add_argument("--seed", type=int, default=0)
    e = sub.add_parser("evaluate", help="secure vs plaintext on every bundled MNI152 test slice")
    e.add_argument("--batch", type=int, default=7)
    d = sub.add_parser("deploy", help="deploy a model to a running deployment")
    d.add_argument("--config", required=True, help="model_owner.toml from `blindseg init`")
    d.add_argument("--model", default="mni-unet",
                   help="your model: a torch.export program (.pt2) or package.module:factory (with --weights); "
                        "or a bundled one: mni-unet (trained), ref-unet, trustmis-unet")
    d.add_argument("--weights", default=None, help="state dict (.pt) for a package.module:factory model")
    d.add_argument("--calibration", default=None,
                   help="your calibration samples: .npy / .npz (N x C x H x W) or NIfTI (axial slices), in the "
                        "scanner's units (--preprocess is applied)")
    d.add_argument("--preprocess", default=None,
                   help="intensity preprocessing the model expects: none, mri-percentile, ct-window:<c>,<w> or JSON")
    d.add_argument("--classes", default=None, help="comma-separated class names")
    d.add_argument("--output", default="mask", choices=["mask", "logits"])
    d.add_argument("--geometry", default=None,
                   help="training geometry, e.g. RAS:2,2,2 or RAS:1,1,3:rot90=1 (orientation, mm spacing, slice "
                        "rotation): data owners reorient and resample their scans to it")
    d.add_argument("--clip-input", action="store_true",
                   help="let data owners clip inputs outside the calibrated range (counted and reported) "
                        "instead of refusing them")
    d.add_argument("--name", default=None, help="model id in the deployment (default: --model)")
    d.add_argument("--size", type=int, default=64, help="input side for the reference models")
    d.add_argument("--tenants", default="", help="comma-separated data-owner identities allowed to use the model "
                   "(default: every tenant the servers have a key for)")
    args = ap.parse_args(argv)
    if args.cmd == "deploy":
        import json

        from blindseg.config import PartyConfig
        from blindseg.errors import UsageError
        from blindseg.node import run_service

        from .client import deploy, deploy_own

        own = args.model.endswith(".pt2") or ":" in args.model

        async def go() -> None:
            tenants = [t.strip() for t in args.tenants.split(",") if t.strip()] or None
            cfg = PartyConfig.load(args.config, "model_owner")
            if own:
                from .own import compile_own, load_samples, parse_geometry, parse_preprocess

                if args.calibration is None:
                    raise UsageError("--calibration is required for your own model (samples like the scans it "
                                     "will see: every fixed-point bound is chosen on them)")
                pre = parse_preprocess(args.preprocess)
                names = [c.strip() for c in args.classes.split(",")] if args.classes else None
                comp = compile_own(args.model, load_samples(args.calibration, pre), args.weights, args.output,
                                   pre, names, args.clip_input, parse_geometry(args.geometry))
                info = await deploy_own(cfg, comp, args.name or Path(args.model.split(":")[-1]).stem, tenants)
            else:
                info = await deploy(cfg, args.model, args.name or args.model, size=args.size, tenants=tenants)
            print(json.dumps(info), flush=True)

        return run_service(go())
    if args.cmd == "evaluate":
        from .train import evaluate

        evaluate(args.batch)
        return 0
    if args.cmd == "train":
        from .train import DEFAULT_OUT, train

        train(args.out or DEFAULT_OUT, args.steps, args.seed)
    return 0
