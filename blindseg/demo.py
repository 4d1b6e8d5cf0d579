"""``blindseg demo``: the whole service on one machine, five roles as five OS processes.

1. start a broker (embedded amqtt in this process, or ``--broker URL``);
2. ``blindseg init`` a loopback deployment kit in a temporary directory;
3. start ``python -m dealer``, ``python -m server0``, ``python -m server1``;
4. run ``python -m model_owner deploy`` (the bundled MNI152 U-Net) and
   ``python -m data_owner segment`` (a bundled real test slice);
5. compare the secure mask with the plaintext model and with the label.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from .broker import EmbeddedBroker
from .config import module_of, server_name
from .errors import BlindsegError, UsageError
from .kit import init


class LocalDeployment:
    """A kit plus the three services as child processes (demo, tests, benchmarks)."""

    def __init__(self, root: str | Path, broker_url: str | None, net: str = "none", pool: int = 2,
                 settings: dict[str, float] | None = None, tenants: tuple[str, ...] = ("data_owner",),
                 tls_port: int | None = None, metrics: bool = False, pairs: int = 1,
                 max_pool: int | None = None) -> None:
        """``max_pool``: the dealer's cap on its throughput-sized pool (``pool``: a fixed pool, as benchmarks
        use, so no further bundle streams through a server's link while a measured job runs).
        ``tls_port``: a kit with TLS, passwords and ACLs for a broker on 127.0.0.1:<port> (start it with
        :meth:`broker_config`); otherwise a plain kit for the broker at ``broker_url``. ``metrics``: each
        service's probes on a free loopback port (``self.metrics``: role -> host:port). ``pairs``: server
        pairs (``self.services``: the dealer, then every server)."""
        from .broker import free_port
        from .kit import pair_names

        self.root = Path(root)
        if tls_port is not None:
            self.configs = init(self.root, "demo", broker_host="127.0.0.1", port=tls_port, bind="127.0.0.1", net=net,
                                settings=settings, tenants=tenants, metrics=False, pairs=pairs)
        else:
            self.configs = init(self.root, "demo", plain=True, broker_url=broker_url, net=net, settings=settings,
                                tenants=tenants, metrics=False, pairs=pairs)
        self.services = ("dealer", *(server_name(i, p) for p in pair_names(pairs) for i in (0, 1)))
        self.metrics: dict[str, str] = {}
        for role in self.services if metrics else ():
            self.metrics[role] = f"127.0.0.1:{free_port()}"
            text = self.configs[role].read_text()
            self.configs[role].write_text(text.replace("\n[peers]", f'\nmetrics_address = "{self.metrics[role]}"\n[peers]', 1))
        self.pool, self.max_pool = pool, max_pool
        self.wrap: dict[str, list[str]] = {}  # role -> command prefix (e.g. ip netns exec NS: netsim.netns)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        (self.root / "logs").mkdir(exist_ok=True)

    def broker_config(self) -> str:
        return (self.root / "broker" / "mosquitto.conf").read_text()

    def env(self) -> dict[str, str]:
        return {**os.environ, "PYTHONUNBUFFERED": "1"}

    def start_role(self, role: str) -> None:
        args = [*self.wrap.get(role, []), sys.executable, "-m", module_of(role), "--config", str(self.configs[role])]
        if role == "dealer":
            args += ["--pool", str(self.pool)] + (["--max-pool", str(self.max_pool)] if self.max_pool else [])
        log = open(self.root / "logs" / f"{role}.log", "ab")  # noqa: SIM115 - owned by the child
        self.procs[role] = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=self.env())

    def start(self, timeout: float = 60.0) -> LocalDeployment:
        """Start the services and wait until each is connected and subscribed (blocking: call it
        through ``asyncio.to_thread`` when the broker runs on your event loop)."""
        for role in self.services:
            self.start_role(role)
        self.wait_serving(self.services, timeout)
        return self

    def restart(self, role: str, timeout: float = 60.0) -> None:
        """Start ``role`` again (after it was killed) and wait until it serves."""
        p = self.procs.get(role)
        if p is not None and p.poll() is None:
            p.kill()
            p.wait()
        log = self.root / "logs" / f"{role}.log"
        seen = log.read_bytes().count(b" serving deployment ")
        self.start_role(role)
        self.wait_serving((role,), timeout, seen)

    def wait_serving(self, roles: tuple[str, ...], timeout: float = 60.0, seen: int = 0) -> None:
        deadline = time.monotonic() + timeout
        for role in roles:
            log = self.root / "logs" / f"{role}.log"
            while log.read_bytes().count(b" serving deployment ") <= seen:
                self.check_alive()
                if time.monotonic() > deadline:
                    raise BlindsegError(f"{role} did not come up within {timeout:.0f} s; see {log}")
                time.sleep(0.05)

    async def wait_bundles(self, timeout: float = 120.0, count: int = 1) -> None:
        """Wait until both servers have expanded ``count`` bundles so far (so online time excludes offline work)."""
        logs = [self.root / "logs" / f"server{i}.log" for i in (0, 1)]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not all(p.read_bytes().count(b" ready and expanded") >= count for p in logs):
            self.check_alive()
            if loop.time() > deadline:
                raise BlindsegError(f"no preprocessing bundle reached the servers within {timeout:.0f} s")
            await asyncio.sleep(0.1)

    async def wait_stored(self, n: int, timeout: float = 300.0) -> None:
        """Wait until every server (of every pair) holds at least ``n`` bundles on disk."""
        dirs = [self.root / "state" / s / "bundles" / "bundles" for s in self.services if s != "dealer"]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not all(d.is_dir() and len(list(d.glob("*.bin"))) >= n for d in dirs):
            self.check_alive()
            if loop.time() > deadline:
                raise BlindsegError(f"the servers did not receive {n} bundles within {timeout:.0f} s")
            await asyncio.sleep(0.1)

    def check_alive(self) -> None:
        for role, p in self.procs.items():
            if p.poll() is not None:
                raise BlindsegError(f"{role} exited with code {p.returncode}; see {self.root}/logs/{role}.log")

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.terminate()
        for p in self.procs.values():
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()

    async def client(self, role: str, *args: str, timeout: float = 600.0) -> dict[str, Any]:
        """Run a client role to completion; its last stdout line is a JSON object."""
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", role, *args, "--config", str(self.configs[role]),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=self.env())
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout)
        except TimeoutError:
            proc.kill()
            raise BlindsegError(f"{role} {args[0]} did not finish within {timeout:.0f} s") from None
        lines = out.decode().strip().splitlines()
        if proc.returncode != 0 or not lines:
            msg = [ln for ln in lines if ln.startswith("error: ")] or (out.decode() + err.decode()).strip().splitlines()
            raise BlindsegError(f"{role} {args[0]} failed: {msg[-1] if msg else proc.returncode}")
        return json.loads(lines[-1])  # type: ignore[no-any-return]


async def run_demo(net: str = "none", broker_url: str | None = None, out_dir: Path | None = None,
                   model: str = "mni-unet") -> dict[str, Any]:
    import torch

    from . import intensity
    from .mni import dice
    from .models import demo_slices, load_named_model

    broker = None if broker_url else await EmbeddedBroker().start()
    url = broker_url or (broker.url if broker else "")
    with tempfile.TemporaryDirectory(prefix="blindseg-demo-") as tmp:
        out = out_dir or Path(tmp) / "out"
        # pool 1: on one 2-core machine a second bundle in flight would compete with the measured job
        dep = LocalDeployment(Path(tmp) / "deploy", url, net, pool=1, max_pool=1)
        try:
            await asyncio.to_thread(dep.start)  # the embedded broker runs on this event loop
            t0 = time.perf_counter()
            deployed = await dep.client("model_owner", "deploy", "--model", model, "--name", "mni")
            await dep.wait_bundles()
            seg = await dep.client("data_owner", "segment", "--model", "mni", "--input", "demo", "--out", str(out),
                                   "--quiet")
            total = time.perf_counter() - t0
        except BlindsegError as e:
            logs = "\n".join(f"--- {r}\n" + (dep.root / "logs" / f"{r}.log").read_text()[-1500:]
                             for r in dep.procs)
            raise BlindsegError(f"demo failed: {e}\nservice logs:\n{logs}") from None
        finally:
            dep.stop()
            if broker is not None:
                await broker.stop()
        mask = np.load(out / "mask.npy").astype(np.int64)
        d = demo_slices()
        k = len(d["test_image"]) // 2
        raw = d["test_image"][k:k + 1].astype(np.float32)  # what `segment --input demo` reads (no copy on disk)
        net_model, _, meta = load_named_model(model)
        with torch.no_grad():
            plain = torch.argmax(net_model(torch.from_numpy(intensity.apply(meta["preprocess"], raw))), 1).numpy()
        label = d["test_label"][k:k + 1]
        names = meta["class_names"]
        report = {
            **{k2: seg[k2] for k2 in ("online_seconds", "offline_seconds", "online_bytes_per_server",
                                      "offline_bytes_per_server", "rounds")},
            "pixel_agreement": float((mask == plain).mean()),
            "dice": dict(zip(names, dice(mask, label, len(names)), strict=True)),
            "dice_plaintext": dict(zip(names, dice(plain, label, len(names)), strict=True)),
            "net": net, "broker": "embedded amqtt" if broker_url is None else broker_url,
            "deploy_seconds": deployed["deploy_seconds"], "wall_seconds": total, "frac_bits": deployed["frac_bits"],
            "slice_z_2mm": int(d["test_z"][k]),
        }
        if out_dir is not None:
            seg_report = json.loads((out / "report.json").read_text())
            (out_dir / "report.json").write_text(json.dumps({**report, "layers": seg_report["layers"]}, indent=1))
        return report


def format_demo(r: dict[str, Any]) -> str:
    lines = [
        f"blindseg demo: MNI152 axial slice z={r['slice_z_2mm']} (2 mm), 4 classes, net={r['net']}, "
        f"broker={r['broker']}",
        f"  online   {r['online_seconds']:.2f} s   {r['online_bytes_per_server'] / 1e6:.1f} MB/server   "
        f"{r['rounds']} rounds",
        f"  offline  {r['offline_seconds']:.2f} s   {r['offline_bytes_per_server'] / 1e6:.1f} MB/server (bundle)",
        f"  pixel agreement with plaintext {100 * r['pixel_agreement']:.3f}%",
        "  dice vs label (secure / plaintext): " + ", ".join(
            f"{k} {v:.3f}/{r['dice_plaintext'][k]:.3f}" for k, v in r["dice"].items() if k != "background"),
    ]
    return "\n".join(lines)


def main_demo(net: str, broker: str | None, out: Path | None, as_json: bool) -> int:
    from netsim import profile

    profile(net)  # validate early
    if out is not None:
        with contextlib.suppress(FileExistsError):
            out.mkdir(parents=True)
        if not out.is_dir():
            raise UsageError(f"--out {out} is not a directory")
    r = asyncio.run(run_demo(net, broker, out))
    print(json.dumps(r) if as_json else format_demo(r), flush=True)
    return 0
