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
    b.add_argument("--broker", default="mosquitto", choices=["mosquitto", "embedded"],
                   help="with --transport mqtt: a private Mosquitto, or the embedded amqtt broker (the demo's)")
    b.add_argument("--net", default="none", help="netsim profile for --transport mqtt: none | lan | wan | 'ms,Mbit/s'")
    b.add_argument("--jobs", type=int, default=1, help="with --transport mqtt: this many concurrent jobs (load test)")
    b.add_argument("--zoo", action="store_true",
                   help="issue #11's table: MONAI U-Nets and layer mixes (compiles?, agreement, logit error, cost)")
    b.add_argument("--placement", action="store_true",
                   help="issue #13: the service behind shaped relays per party, broker at server0 / a third site, "
                        "measured vs predicted (--net profile, default wan)")
    b.add_argument("--netns", action="store_true",
                   help="with --placement: each server in its own network namespace, bandwidth by the kernel (veth + "
                        "tbf), latency by a relay (root only)")
    b.add_argument("--threads", action="store_true",
                   help="issue #13: one server's online compute with 1 and 2 kernel threads (speed-up)")
    b.add_argument("--norm", action="store_true",
                   help="issue #11: the secure instance / group norm alone: rounds, bytes, error against torch")
    b.add_argument("--cold-start", action="store_true",
                   help="issue #14: deploy, first job, first job of a new batch size (private Mosquitto)")
    b.add_argument("--pairs", action="store_true",
                   help="issue #14: jobs per minute with 1 and 2 server pairs (--jobs concurrent jobs, default 8; "
                        "--net profile, default wan; private Mosquitto)")
    b.add_argument("--scan", default=None, metavar="SLICES,SIDE",
                   help="issue #12: a synthetic SLICES x SIDE^2 NIfTI through `python -m data_owner segment` "
                        "(windows of --size)")
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
    i.add_argument("--pairs", type=int, default=1,
                   help="server pairs (server0/server1, server0-2/server1-2, ...): jobs spread over them by the broker")
    i.add_argument("--tenants", default="data_owner",
                   help="comma-separated data-owner identities (hospitals), each with its own key, topic and ACL")
    i.add_argument("--public-keys", type=Path, default=None,
                   help="directory of <identity>.pub files from `blindseg keygen`: the kit then holds no private key")
    k = sub.add_parser("keygen", help="make this party's key pair here (private key 0600; print the public key)")
    k.add_argument("--party", required=True, help="the identity: dealer, server0, server1 (server0-2, ... for "
                   "further pairs), model_owner or a tenant")
    k.add_argument("--out", type=Path, default=Path("keys"))
    rk = sub.add_parser("rotate-key", help="replace one party's public key in every config of a kit")
    rk.add_argument("dir", type=Path)
    rk.add_argument("--party", required=True)
    rk.add_argument("--public-key", required=True, help="hex, or a .pub file from `blindseg keygen`")
    c = sub.add_parser("chart", help="per-layer cost chart (PNG) from a bench or segment report (JSON)")
    c.add_argument("report", type=Path)
    c.add_argument("--out", type=Path, default=Path("cost.png"))
    st = sub.add_parser("status", help="every service's health, pool and recent failures (from their presence)")
    st.add_argument("--config", required=True, type=Path, help="any party's config (its broker login is used)")
    st.add_argument("--listen", type=float, default=3.0, help="seconds to listen for fresh presence documents")
    st.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "status":
            import asyncio

            from .config import PartyConfig
            from .status import collect, render

            cfg = PartyConfig.load(args.config)
            services = asyncio.run(collect(cfg, args.listen))
            print(json.dumps({"deployment": cfg.deployment, "services": services}) if args.json
                  else render(cfg.deployment, services))
            return 0 if all(d["state"] == "up" for d in services.values()) else 1
        if args.cmd == "chart":
            from .report import cost_chart, load_report

            print(cost_chart(load_report(args.report), args.out))
            return 0
        if args.cmd == "demo":
            from .demo import main_demo

            return main_demo(args.net, args.broker, args.out, args.json)
        if args.cmd == "keygen":
            from .kit import keygen

            pub = keygen(args.party, args.out)
            print(f"private key: {args.out / (args.party + '.key')} (0600; never copy it off this host)")
            print(f"public key:  {args.out / (args.party + '.pub')}  {pub}")
            return 0
        if args.cmd == "rotate-key":
            from .kit import rotate_key

            for changed in rotate_key(args.dir, args.party, args.public_key):
                print(f"updated {changed}: hand it to its party and restart that service")
            return 0
        if args.cmd == "init":
            from .kit import init

            tenants = tuple(t.strip() for t in args.tenants.split(",") if t.strip())
            paths = init(args.dir, args.deployment, args.broker_host, args.port, args.plain, tenants=tenants,
                         public_keys=args.public_keys, pairs=args.pairs)
            if args.public_keys is None:
                print("DEMO KIT: every private key was generated here (see keys/README); for production use "
                      "`blindseg keygen` on each host and --public-keys")
            print(f"deployment kit written to {args.dir}:")
            for party, cfg_path in paths.items():
                print(f"  {party:12s} {cfg_path}")
            print(f"  broker       {args.dir / 'broker' / 'mosquitto.conf'}")
            return 0
        if args.cmd == "bench" and args.zoo:
            try:
                import monai  # noqa: F401
            except ImportError:
                raise BlindsegError("bench --zoo needs monai (pip install monai)") from None
            from .bench import format_model_table, run_model_table

            rows = run_model_table(args.size if args.size != 128 else 64)
            print(json.dumps(rows) if args.json else format_model_table(rows))
            return 0
        if args.cmd == "bench" and args.placement:
            import asyncio

            from netsim.netns import unavailable

            from .bench import run_placement_bench

            if args.netns and (why := unavailable()):
                raise BlindsegError(f"--netns: {why}")
            r = asyncio.run(run_placement_bench(args.model, args.size,
                                                args.net if args.net != "none" else "wan", netns=args.netns))
            print(json.dumps(r, indent=None if args.json else 1))
            return 0
        if args.cmd == "bench" and args.threads:
            from .bench import run_threads_bench

            print(json.dumps(run_threads_bench(args.model, args.size), indent=None if args.json else 1))
            return 0
        if args.cmd == "bench" and args.norm:
            from .bench import run_norm_cost

            print(json.dumps(run_norm_cost(), indent=None if args.json else 1))
            return 0
        if args.cmd == "bench" and (args.cold_start or args.scan or args.pairs):
            import asyncio

            from netsim import profile

            from .bench import run_cold_start, run_pairs_bench, run_scan_bench

            if args.pairs:
                net = args.net if args.net != "none" else "wan"
                profile(net)
                r = asyncio.run(run_pairs_bench(args.model, args.size, args.jobs if args.jobs > 1 else 8, net))
            elif args.scan:
                try:
                    slices, side = (int(v) for v in args.scan.split(","))
                except ValueError:
                    raise BlindsegError(f"--scan takes SLICES,SIDE (e.g. 16,256), not {args.scan!r}") from None
                r = asyncio.run(run_scan_bench(slices, side, args.model, args.size))
            else:
                r = asyncio.run(run_cold_start(args.model, args.size))
            print(json.dumps(r, indent=None if args.json else 1))
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
                    r = asyncio.run(run_mqtt_bench(args.model, args.size, args.net, broker=args.broker))
            else:
                r = run_bench(args.model, args.size, args.batch, args.classes)
            print(json.dumps(r) if args.json else format_report(r))
    except BlindsegError as exc:
        print(f"blindseg: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
