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
    d.add_argument("--model", default="mni-unet", help="mni-unet (bundled, trained), ref-unet or trustmis-unet")
    d.add_argument("--name", default=None, help="model id in the deployment (default: --model)")
    d.add_argument("--size", type=int, default=64, help="input side for the reference models")
    d.add_argument("--tenants", default="", help="comma-separated data-owner identities allowed to use the model "
                   "(default: every tenant the servers have a key for)")
    args = ap.parse_args(argv)
    if args.cmd == "deploy":
        import json

        from blindseg.config import PartyConfig
        from blindseg.node import run_service

        from .client import deploy

        async def go() -> None:
            tenants = [t.strip() for t in args.tenants.split(",") if t.strip()] or None
            info = await deploy(PartyConfig.load(args.config, "model_owner"), args.model, args.name or args.model,
                                size=args.size, tenants=tenants)
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
