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
    args = ap.parse_args(argv)
    if args.cmd == "train":
        from .train import DEFAULT_OUT, train

        train(args.out or DEFAULT_OUT, args.steps, args.seed)
    return 0
