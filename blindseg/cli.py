"""Command line: ``blindseg bench``. User errors print one line and exit 2, no traceback."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import BlindsegError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="blindseg", description="Secure U-Net segmentation on secret shares")
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("bench", help="secure vs plaintext figures for a reference model (in-process)")
    b.add_argument("--model", default="ref-unet", help="ref-unet or trustmis-unet")
    b.add_argument("--size", type=int, default=128, help="image side in pixels")
    b.add_argument("--batch", type=int, default=1)
    b.add_argument("--classes", type=int, default=2)
    b.add_argument("--transport", default="memory", choices=["memory", "mqtt"],
                   help="memory: five roles in one process; mqtt: services as processes through a private Mosquitto")
    b.add_argument("--net", default="none", help="netsim profile for --transport mqtt: none | lan | wan | 'ms,Mbit/s'")
    b.add_argument("--jobs", type=int, default=1, help="with --transport mqtt: this many concurrent jobs (load test)")
    b.add_argument("--json", action="store_true", help="print one JSON object")
    d = sub.add_parser("demo", help="the five roles as processes on loopback: deploy, segment a real slice")
    d.add_argument("--net", default="none", help="none | lan | wan | '<latency ms>,<Mbit/s>'")
    d.add_argument("--broker", default=None, help="use a running broker (mqtt://host:port) instead of the embedded one")
    d.add_argument("--out", type=Path, default=None, help="write mask, overlay.png and report.json here")
    d.add_argument("--json", action="store_true", help="print one JSON object")
    i = sub.add_parser("init", help="write a deployment kit (keys, configs, broker TLS/passwords/ACLs)")
    i.add_argument("dir", type=Path)
    i.add_argument("--deployment", default="blindseg")
    i.add_argument("--broker-host", default="127.0.0.1", help="broker host name or IP (TLS certificate)")
    i.add_argument("--port", type=int, default=8883)
    i.add_argument("--plain", action="store_true", help="no TLS/passwords (loopback or embedded broker only)")
    c = sub.add_parser("chart", help="per-layer cost chart (PNG) from a bench or segment report (JSON)")
    c.add_argument("report", type=Path)
    c.add_argument("--out", type=Path, default=Path("cost.png"))
    args = parser.parse_args(argv)
    try:
        if args.cmd == "chart":
            from .report import cost_chart, load_report

            print(cost_chart(load_report(args.report), args.out))
            return 0
        if args.cmd == "demo":
            from .demo import main_demo

            return main_demo(args.net, args.broker, args.out, args.json)
        if args.cmd == "init":
            from .kit import init

            paths = init(args.dir, args.deployment, args.broker_host, args.port, args.plain)
            print(f"deployment kit written to {args.dir}:")
            for party, cfg_path in paths.items():
                print(f"  {party:12s} {cfg_path}")
            print(f"  broker       {args.dir / 'broker' / 'mosquitto.conf'}")
            return 0
        if args.cmd == "bench":
            if args.size < 16 or args.size % 16:
                raise BlindsegError(f"--size must be a multiple of 16 (four 2x2 poolings), got {args.size}")
            from .bench import format_report, run_bench

            if args.transport == "mqtt":
                import asyncio

                from netsim import profile

                from .bench import run_mqtt_bench

                profile(args.net)
                if args.jobs > 1:
                    from .bench import run_load_bench

                    r = asyncio.run(run_load_bench(args.model, args.size, args.jobs))
                else:
                    r = asyncio.run(run_mqtt_bench(args.model, args.size, args.net))
            else:
                r = run_bench(args.model, args.size, args.batch, args.classes)
            print(json.dumps(r) if args.json else format_report(r))
    except BlindsegError as exc:
        print(f"blindseg: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
