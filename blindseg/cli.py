"""Command line: ``blindseg bench``. User errors print one line and exit 2, no traceback."""

from __future__ import annotations

import argparse
import json
import sys

from .errors import BlindsegError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="blindseg", description="Secure U-Net segmentation on secret shares")
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("bench", help="secure vs plaintext figures for a reference model (in-process)")
    b.add_argument("--model", default="ref-unet", help="ref-unet or trustmis-unet")
    b.add_argument("--size", type=int, default=128, help="image side in pixels")
    b.add_argument("--batch", type=int, default=1)
    b.add_argument("--classes", type=int, default=2)
    b.add_argument("--transport", default="memory", choices=["memory"], help="mqtt arrives with issue #3")
    b.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "bench":
            if args.size < 16 or args.size % 16:
                raise BlindsegError(f"--size must be a multiple of 16 (four 2x2 poolings), got {args.size}")
            from .bench import format_report, run_bench

            r = run_bench(args.model, args.size, args.batch, args.classes)
            print(json.dumps(r) if args.json else format_report(r))
    except BlindsegError as exc:
        print(f"blindseg: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
