"""``blindseg bench``: secure vs plaintext figures for a reference model, measured in one run."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import resource
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np

from .compiler import compile_model
from .engine import run_compiled
from .layout import Layout
from .models import build_model, test_image

__all__ = ["run_bench", "run_load_bench", "run_mqtt_bench", "test_image"]


def plaintext_seconds(model: Any, x: np.ndarray, repeats: int = 5) -> float:
    """Median float32 forward time of the same model on the same input (torch, this machine's threads)."""
    import torch

    xt = torch.tensor(x, dtype=torch.float32)
    times = []
    with torch.no_grad():
        model(xt)
        for _ in range(repeats):
            t = time.perf_counter()
            model(xt)
            times.append(time.perf_counter() - t)
    return float(np.median(times))


def run_bench(model_name: str, size: int, batch: int = 1, classes: int = 2, seed: int = 0) -> dict[str, Any]:
    """Compile, deploy and run one secure job; return the figures (JSON-ready)."""
    import torch

    model = build_model(model_name, classes=classes, seed=seed)
    x = test_image(batch, size, seed)
    t_plain = plaintext_seconds(model, x)
    comp = compile_model(model, tuple(x.shape[1:]), "mask", "auto", samples=x)  # type: ignore[arg-type]
    # two jobs on one deployment, the second measured: the first loads (in a new venv: compiles) the kernels
    res = asyncio.run(run_compiled(comp, x, jobs=2))
    with torch.no_grad():
        ref = torch.argmax(model(torch.tensor(x, dtype=torch.float32)), 1).numpy()
    st = res.stats
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # before the offline figures below
    big = Layout.of(comp.plan, batch).material_bytes() > 1 << 30  # one bundle, no warm-up: kernels are warm
    off = offline_compute(comp, batch, repeats=1 if big else 3, warm_up=not big)
    return {
        "model": model_name, "size": size, "batch": batch, "transport": "memory", "net": "none",
        "online_seconds": st["online_seconds"], "offline_seconds": st["offline_seconds"],
        "dealer_seconds": st["dealer_seconds"],
        "online_bytes_per_server": st["online_bytes_per_server"],
        "offline_bytes_per_server": st["offline_bytes_per_server"],
        "deploy_bytes_per_server": max(st["deploy_bytes"]),
        "rounds": st["rounds"], "plaintext_seconds": t_plain,
        "online_over_plaintext": st["online_seconds"] / t_plain,
        "first_job_online_seconds": st["jobs_online_seconds"][0],
        "offline_compute": off,
        "offline_compute_over_online": (off["dealer_seconds"] + max(off["ingest_seconds"])) / st["online_seconds"],
        "peak_rss_bytes": peak_rss,
        "pixel_agreement": float(np.mean(res.mask == ref)), "frac_bits": st["frac_bits"],
        "layers": st["layers"],
    }


class _Pair:
    """A dealer and two server cores in memory, deployed, with bundle stores in a temporary directory:
    each role's compute measured alone (no service, no transport, no other role on the cores)."""

    def __init__(self, comp: Any, batch: int, tmp: str) -> None:
        from dealer.core import Dealer
        from model_owner import share_weights
        from server.core import ServerCore
        from server.store import BundleStore

        from .layout import model_mask_shares

        self.plan, self.key, self.batch = comp.plan, "bench@e1", batch
        self.dealer = Dealer()
        seeds = self.dealer.deploy(self.key, self.plan)
        self.cores = [ServerCore(i, self.plan) for i in (0, 1)]
        shares = share_weights(comp)
        _lockstep(*[self.cores[i].deploy(shares[i], model_mask_shares(self.plan, seeds[i])) for i in (0, 1)])
        self.layout = self.cores[0].layout(batch)
        self.stores = [BundleStore(Path(tmp) / f"server{i}") for i in (0, 1)]

    def bundle(self, took: dict[str, float]) -> list[Any]:
        """One bundle dealt and ingested by both servers, op by op as the service streams it (one op's
        corrections in memory at a time), each role's seconds into ``took``; the two stored bundles."""
        from blindseg.preprocessing import corrections_of

        b0, b1 = self.dealer.new_bundle(self.key, self.batch)
        bundles = (b0, b1)
        gen = self.dealer.corrections(b0, b1)
        writers = [store.writer(b.bundle_id, self.key, self.batch, b.party, b.seed)
                   for store, b in zip(self.stores, bundles, strict=True)]
        took.update(dealer=0.0, server0=0.0, server1=0.0)
        for i, specs in enumerate(self.layout.specs):
            corr: list[np.ndarray] = []
            if corrections_of(specs, 1):
                t = time.perf_counter()
                msg = next(gen)
                took["dealer"] += time.perf_counter() - t
                corr = list(msg.arrays)
            for core, b, writer in zip(self.cores, bundles, writers, strict=True):
                mine = corr if core.party == 1 else []
                if mine or self.plan.ops[i].layer.offline_items:
                    t = time.perf_counter()
                    core.ingest_op(writer, self.layout, b.seed, i, mine)
                    took[f"server{core.party}"] += time.perf_counter() - t
            del corr
        out = []
        for store, b, writer in zip(self.stores, bundles, writers, strict=True):
            t = time.perf_counter()
            writer.commit()
            took[f"server{b.party}"] += time.perf_counter() - t
            out.append(store.consume(b.bundle_id, f"bench{b.bundle_id[:8]}"))
        return out

    def online(self, stored: list[Any], x: np.ndarray) -> tuple[list[float], list[np.ndarray]]:
        """Both servers' online steps, run one after the other per round (material expanded before the
        job if it fits in 1 GB, as the service does, else op by op): each server's compute seconds and
        its output share."""
        from data_owner import share_image
        from server.core import Prepared

        preps = [Prepared(self.layout, i, stored[i]) for i in (0, 1)]
        for p in preps:
            p.preload(1 << 30)
        shares = share_image(self.plan, x)
        busy = [0.0, 0.0]
        outs = _lockstep(*[self.cores[i].run(preps[i], shares[i]) for i in (0, 1)], busy=busy)
        for i in (0, 1):
            self.stores[i].discard(stored[i].bundle_id)
        return busy, outs

    def close(self) -> None:
        for store in self.stores:
            store.close()


def offline_compute(comp: Any, batch: int = 1, repeats: int = 3, warm_up: bool = True) -> dict[str, Any]:
    """Each offline role's compute for one job's bundle, alone on this machine as on its own host
    (in-process the three share two cores, so the service's wall time mixes them): the dealer making
    server 1's corrections, then each server's ingest of its bundle (check, expand, F_i precompute,
    durable store). Medians over ``repeats`` bundles (after one warm-up bundle if ``warm_up``)."""
    import tempfile

    times: dict[str, list[float]] = {"dealer": [], "server0": [], "server1": []}
    with tempfile.TemporaryDirectory(prefix="blindseg-offline-") as tmp:
        pair = _Pair(comp, batch, tmp)
        for rep in range(repeats + int(warm_up)):
            took: dict[str, float] = {}
            for i, b in enumerate(pair.bundle(took)):
                pair.stores[i].discard(b.bundle_id)
            for k, v in took.items():
                if rep or not warm_up:
                    times[k].append(v)
        pair.close()
    med = {k: float(np.median(v)) for k, v in times.items()}
    return {"dealer_seconds": med["dealer"], "ingest_seconds": [med["server0"], med["server1"]]}


def thread_scaling(comp: Any, x: np.ndarray, threads: tuple[int, ...] = (1, 2), repeats: int = 3) -> dict[str, Any]:
    """One server's online compute (its protocol steps, no transport) with 1 and 2 kernel threads:
    medians of ``repeats`` jobs each, thread counts interleaved. Speed-up = seconds(1) / seconds(n).

    Switches numba's thread count in this process (restored after): run it in a process of its own
    (``blindseg bench --threads``); timing-sensitive work later in the same process was seen ~17% slower."""
    import tempfile

    import numba

    before = numba.get_num_threads()
    usable = [t for t in threads if t <= numba.config.NUMBA_NUM_THREADS]  # type: ignore[attr-defined]
    secs: dict[int, list[float]] = {t: [] for t in usable}
    try:
        with tempfile.TemporaryDirectory(prefix="blindseg-threads-") as tmp:
            pair = _Pair(comp, x.shape[0], tmp)
            for rep in range(repeats + 1):
                for t in usable:
                    numba.set_num_threads(t)
                    busy, _ = pair.online(pair.bundle({}), x)
                    if rep:
                        secs[t].append(float(np.mean(busy)))
            pair.close()
    finally:
        numba.set_num_threads(before)
    med = {t: float(np.median(v)) for t, v in secs.items()}
    return {"server_online_compute_seconds": {str(t): v for t, v in med.items()},
            "speedup": {str(t): med[usable[0]] / v for t, v in med.items()}}


def run_threads_bench(model_name: str, size: int, seed: int = 0) -> dict[str, Any]:
    """``blindseg bench --threads``: :func:`thread_scaling` for a reference model."""
    model = build_model(model_name, seed=seed)
    x = test_image(1, size, seed)
    comp = compile_model(model, tuple(x.shape[1:]), "mask", "auto", samples=x)  # type: ignore[arg-type]
    return {"model": model_name, "size": size, **thread_scaling(comp, x)}


def _lockstep(*gens: Any, busy: list[float] | None = None) -> list[Any]:
    """Run two servers' step generators against each other in memory until both finish (each one's
    seconds inside its steps added to ``busy``); their return values."""
    ys = [next(g) for g in gens]
    results: list[Any] = [None] * len(gens)
    while ys:
        mine = [[a.copy() for a in y[1].arith + y[1].boolean] for y in ys]
        nxt = []
        for k, g in enumerate(gens):
            t = time.perf_counter()
            try:
                nxt.append(g.send(ys[k][1].combine(mine[1 - k])))
            except StopIteration as stop:
                results[k] = stop.value
            if busy is not None:
                busy[k] += time.perf_counter() - t
        if len(nxt) not in (0, len(gens)):
            raise RuntimeError("the two servers' steps ran out of step")
        ys = nxt
    return results


def _server_peak_rss(dep: Any) -> int:
    """Peak resident memory (VmHWM) of the service processes, bytes (the largest one)."""
    return max(_role_peak_rss(dep).values(), default=0)


@contextlib.asynccontextmanager
async def _service(model_name: str, size: int, net: str = "none", pool: int = 1, pairs: int = 1,
                   settings: dict[str, float] | None = None, sized_pool: bool = False,
                   broker_kind: str = "mosquitto") -> AsyncIterator[Any]:
    """A private Mosquitto (``broker_kind="embedded"``: the embedded amqtt broker, on this event loop, as
    the demo runs it), the services (dealer, ``pairs`` server pairs) as processes, ``model_name``
    deployed as "bench". The dealer keeps a fixed pool of ``pool`` bundles (no refill beyond it streams
    through the servers' links while a measured job runs) unless ``sized_pool`` (the product's
    throughput-sized pool, e.g. for a scan's stream of slices)."""
    import tempfile
    from pathlib import Path

    from model_owner.client import deploy

    from .broker import EmbeddedBroker, Mosquitto
    from .config import PartyConfig
    from .demo import LocalDeployment
    from .errors import UsageError

    if broker_kind not in ("mosquitto", "embedded"):
        raise UsageError(f"broker {broker_kind!r}: use mosquitto or embedded")
    with tempfile.TemporaryDirectory(prefix="blindseg-bench-") as tmp, contextlib.ExitStack() as stack:
        embedded = await EmbeddedBroker().start() if broker_kind == "embedded" else None
        url = embedded.url if embedded is not None else stack.enter_context(Mosquitto(tmp)).url
        dep = LocalDeployment(Path(tmp) / "dep", url, net, pool=pool, pairs=pairs, settings=settings,
                              max_pool=None if sized_pool else max(pool, 1))
        try:
            await asyncio.to_thread(dep.start)
            await deploy(PartyConfig.load(dep.configs["model_owner"]), model_name, "bench", size=size)
            yield dep
        finally:
            dep.stop()
            if embedded is not None:
                await embedded.stop()


async def run_load_bench(model_name: str, size: int, jobs: int = 8) -> dict[str, Any]:
    """``jobs`` concurrent jobs (of one data-owner process) through a private Mosquitto: throughput and memory."""
    import torch

    from data_owner.client import Client

    from .config import PartyConfig
    from .models import load_named_model

    model, _, _ = load_named_model(model_name, size)
    xs = [test_image(1, size, seed=100 + k).astype(np.float32) for k in range(jobs)]
    with torch.no_grad():
        refs = [torch.argmax(model(torch.from_numpy(x)), 1).numpy() for x in xs]
    async with _service(model_name, size, pool=jobs) as dep:
        await dep.wait_bundles()
        await dep.wait_stored(jobs)  # the whole pool at the servers: we measure serving, not the dealer
        cfg = PartyConfig.load(dep.configs["data_owner"])

        async with Client(cfg) as c:  # one process per party identity; its jobs run concurrently
            await c.plan("bench")
            t0 = time.perf_counter()
            masks = [m for m, _ in await asyncio.gather(*(c.segment("bench", x) for x in xs))]
            wall = time.perf_counter() - t0
        rss = _server_peak_rss(dep)
    agree = [float(np.mean(m == r)) for m, r in zip(masks, refs, strict=True)]
    return {"model": model_name, "size": size, "transport": "mqtt", "broker": "mosquitto", "concurrent_jobs": jobs,
            "wall_seconds": wall, "jobs_per_minute": jobs / wall * 60, "min_pixel_agreement": min(agree),
            "server_peak_rss_bytes": rss}


async def run_pairs_bench(model_name: str = "ref-unet", size: int = 128, jobs: int = 8, net: str = "wan"
                          ) -> dict[str, Any]:
    """Issue #14's throughput figure: ``jobs`` concurrent jobs of one data owner through a private
    Mosquitto, with 1 and then 2 server pairs (each its own processes, links shaped by netsim ``net``);
    every pair's pool is filled first, so serving is measured, not the dealer. With one pair the jobs go
    to it directly; with two they are offered and the broker's shared subscription spreads them."""
    import torch

    from data_owner.client import Client

    from .config import PartyConfig
    from .models import load_named_model

    model, _, _ = load_named_model(model_name, size)
    xs = [test_image(1, size, seed=200 + k).astype(np.float32) for k in range(jobs)]
    with torch.no_grad():
        refs = [torch.argmax(model(torch.from_numpy(x)), 1).numpy() for x in xs]
    rows: list[dict[str, Any]] = []
    for pairs in (1, 2):
        pool = -(-jobs // pairs)
        async with _service(model_name, size, net, pool=pool, pairs=pairs, settings={"max_jobs": jobs}) as dep:
            await dep.wait_stored(pool)
            async with Client(PartyConfig.load(dep.configs["data_owner"])) as c:
                await c.plan("bench")
                t0 = time.perf_counter()
                got = await asyncio.gather(*(c.segment("bench", x) for x in xs))
                wall = time.perf_counter() - t0
        agree = [float(np.mean(m == r)) for (m, _), r in zip(got, refs, strict=True)]
        rows.append({"pairs": pairs, "wall_seconds": wall, "jobs_per_minute": jobs / wall * 60,
                     "jobs_per_pair": {p: [cost["pair"] for _, cost in got].count(p) for p in
                                       sorted({cost["pair"] for _, cost in got})},
                     "min_pixel_agreement": min(agree)})
    return {"model": model_name, "size": size, "net": net, "concurrent_jobs": jobs, "broker": "mosquitto",
            "rows": rows, "speedup_2_vs_1": rows[1]["jobs_per_minute"] / rows[0]["jobs_per_minute"]}


def _role_peak_rss(dep: Any) -> dict[str, int]:
    """Peak resident memory (VmHWM) of each service process, bytes."""
    out = {}
    for role, p in dep.procs.items():
        try:
            for line in open(f"/proc/{p.pid}/status"):
                if line.startswith("VmHWM:"):
                    out[role] = int(line.split()[1]) * 1024
        except OSError:
            pass
    return out


async def run_cold_start(model_name: str = "ref-unet", size: int = 128, batch: int = 4) -> dict[str, Any]:
    """Issue #14's cold-start figures through a private Mosquitto: the deploy, the first job right after
    it, the first job of a new batch size, and the next one of that size (each: seconds, of them
    waiting for a bundle)."""
    from data_owner.client import Client

    from .config import PartyConfig

    out: dict[str, Any] = {"model": model_name, "size": size}
    t = time.perf_counter()
    async with _service(model_name, size, pool=2) as dep:
        out["start_and_deploy_seconds"] = time.perf_counter() - t
        async with Client(PartyConfig.load(dep.configs["data_owner"])) as c:
            for name, n in (("first_job", 1), (f"first_job_of_batch_{batch}", batch), (f"next_job_of_batch_{batch}", batch)):
                t = time.perf_counter()
                _, cost = await c.segment("bench", test_image(n, size, seed=n).astype(np.float32))
                out[name] = {"seconds": time.perf_counter() - t, "waiting_for_bundle_seconds": cost["wait_seconds"]}
    out["note"] = "seconds: the data owner's job time; waiting_for_bundle_seconds: the part before the first round"
    return out


async def run_scan_bench(slices: int, side: int, model_name: str = "ref-unet", size: int = 128) -> dict[str, Any]:
    """Issue #12's scan figure on a synthetic NIfTI volume (``slices`` x ``side``²): ``python -m data_owner
    segment`` through the real service (private Mosquitto); wall, coverage, waiting, bytes, RSS per role."""
    import tempfile
    from pathlib import Path

    import nibabel as nib

    vol = np.stack([test_image(1, side, seed=k)[0, 0] for k in range(slices)], axis=2).astype(np.float32)
    with tempfile.TemporaryDirectory(prefix="blindseg-scan-") as tmp:
        nib.save(nib.Nifti1Image(vol, np.diag([0.7, 0.7, 2.5, 1.0])), Path(tmp) / "scan.nii.gz")
        async with _service(model_name, size, pool=2, sized_pool=True) as dep:
            t0 = time.perf_counter()
            rep = await dep.client("data_owner", "segment", "--model", "bench", "--input", str(Path(tmp) / "scan.nii.gz"),
                                   "--out", str(Path(tmp) / "out"), "--quiet", timeout=86400)
            wall = time.perf_counter() - t0
            rss = _role_peak_rss(dep)
    keep = ("slices", "jobs", "windows_per_job", "windows_per_slice", "voxels", "voxels_segmented", "online_seconds",
            "wait_seconds", "offline_seconds", "online_bytes_per_server", "offline_bytes_per_server")
    return {"model": model_name, "window": size, "image": [slices, side, side], **{k: rep[k] for k in keep},
            "wall_seconds": wall, "waiting_fraction": rep["wait_seconds"] / max(rep["wall_seconds"], 1e-9),
            "peak_rss_bytes": rss}


async def run_mqtt_bench(model_name: str, size: int, net: str = "none", repeats: int = 3,
                         broker: str = "mosquitto") -> dict[str, Any]:
    """The same job through the real service: dealer and servers as processes, a private Mosquitto (or
    the embedded amqtt broker), sealed MQTT frames, netsim on every party's links; the in-process run of
    the same plan alongside.
    Each side runs ``repeats`` jobs (a fresh bundle each, expanded before the job); medians reported."""
    import torch

    from data_owner.client import Client

    from .config import PartyConfig
    from .models import load_named_model

    x = test_image(1, size)
    model, samples, _ = load_named_model(model_name, size)
    comp = compile_model(model, tuple(x.shape[1:]), "mask", "auto", samples=samples)  # type: ignore[arg-type]
    locals_ = [await run_compiled(comp, x) for _ in range(repeats)]
    local = sorted(locals_, key=lambda r: r.stats["online_seconds"])[repeats // 2]
    costs = []
    async with _service(model_name, size, net, broker_kind=broker) as dep, \
            Client(PartyConfig.load(dep.configs["data_owner"])) as client:
        await client.plan("bench")
        for k in range(repeats):
            await dep.wait_bundles(count=k + 1)  # offline is measured apart
            mask, c = await client.segment("bench", x.astype(np.float32))
            costs.append(c)
    with torch.no_grad():
        ref = torch.argmax(model(torch.tensor(x, dtype=torch.float32)), 1).numpy()
    cost = sorted(costs, key=lambda c: c["online_seconds"])[repeats // 2]
    return {
        "model": model_name, "size": size, "batch": 1, "transport": "mqtt", "broker": broker, "net": net,
        "repeats": repeats, "online_seconds_runs": [c["online_seconds"] for c in costs],
        "inprocess_online_seconds_runs": [r.stats["online_seconds"] for r in locals_],
        "online_seconds": cost["online_seconds"], "offline_seconds": cost["offline_seconds"],
        "online_bytes_per_server": max(cost["server_bytes"]), "offline_bytes_per_server": max(cost["offline_bytes"]),
        "rounds": cost["rounds"], "inprocess_rounds": local.stats["rounds"],
        "inprocess_online_seconds": local.stats["online_seconds"],
        "mqtt_over_inprocess": cost["online_seconds"] / local.stats["online_seconds"],
        "inprocess_online_bytes_per_server": local.stats["online_bytes_per_server"],
        "pixel_agreement": float(np.mean(mask == ref)), "agreement_with_inprocess": float(np.mean(mask == local.mask)),
        # where a server's online time goes: its own protocol steps, the rest waiting on its peer and the link
        "server_run_seconds": cost["server_run_seconds"], "server_compute_seconds": cost["server_compute_seconds"],
    }


def format_report(r: dict[str, Any]) -> str:
    """Human-readable table of a bench result."""
    mb = 1e6
    if "concurrent_jobs" in r:
        return (f"{r['concurrent_jobs']} concurrent jobs, {r['model']} {r['size']}x{r['size']} over MQTT (Mosquitto)\n"
                f"wall {r['wall_seconds']:.2f} s   {r['jobs_per_minute']:.1f} jobs/min   min agreement "
                f"{100 * r['min_pixel_agreement']:.2f}%   server peak RSS {r['server_peak_rss_bytes'] / 2**20:.0f} MiB")
    if r.get("transport") == "mqtt":
        return (f"model {r['model']} {r['size']}x{r['size']} over MQTT ({r['broker']}), net={r['net']}\n"
                f"online   {r['online_seconds']:.3f} s   {r['online_bytes_per_server'] / mb:.2f} MB/server (sealed)   "
                f"{r['rounds']} rounds\n"
                f"offline  {r['offline_seconds']:.3f} s   {r['offline_bytes_per_server'] / mb:.2f} MB/server\n"
                f"in-process online {r['inprocess_online_seconds']:.3f} s   MQTT/in-process "
                f"{r['mqtt_over_inprocess']:.2f}x   (medians of {r['repeats']} jobs each)\n"
                f"servers (0 / 1): rounds {' / '.join(f'{v:.3f}' for v in r['server_run_seconds'])} s, of which "
                f"computing {' / '.join(f'{v:.3f}' for v in r['server_compute_seconds'])} s\n"
                f"pixel agreement with float {100 * r['pixel_agreement']:.3f}%")
    lines = [f"{'op':>4} {'kind':8} {'name':26} {'online s':>9} {'online MB':>10} {'rounds':>6} {'offline MB':>10}"]
    for L in r["layers"]:
        lines.append(f"{L['op']:>4} {L['kind']:8} {L['name'][:26]:26} {L['online_seconds']:9.4f} "
                     f"{L['online_bytes'] / mb:10.3f} {L['rounds']:6d} {L['offline_bytes'] / mb:10.3f}")
    lines += [
        "(an op's seconds run from the previous opening to its own last one: a conv's ring product is computed",
        " after its opening, so it shows under the op that follows it, e.g. a conv's rescale)",
        "",
        f"model {r['model']} {r['size']}x{r['size']} batch {r['batch']}  (f = {r['frac_bits']})",
        f"online   {r['online_seconds']:.3f} s   {r['online_bytes_per_server'] / mb:.2f} MB/server   {r['rounds']} rounds",
        f"offline  {r['offline_seconds']:.3f} s   {r['offline_bytes_per_server'] / mb:.2f} MB/server (dealer {r['dealer_seconds']:.3f} s)",
        f"offline compute, each role alone: dealer {r['offline_compute']['dealer_seconds']:.3f} s, ingest "
        f"{' / '.join(f'{v:.3f}' for v in r['offline_compute']['ingest_seconds'])} s (server0 / server1); "
        f"dealer + ingest = {r['offline_compute_over_online']:.2f}x online",
        f"plaintext float32 {r['plaintext_seconds'] * 1e3:.1f} ms   secure/plaintext {r['online_over_plaintext']:.1f}x"
        f"   (second of two jobs; the first {r['first_job_online_seconds']:.3f} s)",
        f"pixel agreement with float {100 * r['pixel_agreement']:.3f}%   peak RSS {r['peak_rss_bytes'] / 2**30:.2f} GiB",
    ]
    return "\n".join(lines)


def _zoo(size: int) -> list[tuple[str, Any, tuple[int, ...]]]:
    """The real U-Nets people use (MONAI) and layer mixes from issue #11, with their input shapes."""
    import torch.nn as nn
    from monai.networks.nets import AttentionUnet, BasicUNet, UNet

    class UpLeakyGroup(nn.Module):
        def __init__(self, norm: str) -> None:
            super().__init__()

            def block(i: int, o: int) -> nn.Module:
                return nn.Sequential(nn.Conv2d(i, o, 3, padding=1),
                                     nn.GroupNorm(4, o) if norm == "group" else nn.BatchNorm2d(o), nn.LeakyReLU(0.1))

            self.e1, self.e2, self.pool = block(1, 16), block(16, 32), nn.MaxPool2d(2)
            self.up = nn.Upsample(scale_factor=2, mode="nearest")
            self.d1, self.head = block(48, 16), nn.Conv2d(16, 3, 1)

        def forward(self, x: Any) -> Any:
            import torch

            a = self.e1(x)
            return self.head(self.d1(torch.cat([a, self.up(self.e2(self.pool(a)))], 1)))

    class SigmoidBinary(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = UNet(2, 1, 1, (16, 32, 64), (2, 2), num_res_units=1, norm="batch", act="relu")

        def forward(self, x: Any) -> Any:
            import torch

            return torch.sigmoid(self.net(x))

    s2 = (1, size, size)
    return [
        ("MONAI UNet defaults (instance norm, PReLU), 2 residual units",
         UNet(2, 1, 3, (16, 32, 64, 128), (2, 2, 2), num_res_units=2), s2),
        ("MONAI UNet BATCH/RELU, 2 residual units",
         UNet(2, 1, 3, (16, 32, 64, 128), (2, 2, 2), num_res_units=2, norm="batch", act="relu"), s2),
        ("MONAI UNet BATCH/PRELU, 2 residual units",
         UNet(2, 1, 3, (16, 32, 64, 128), (2, 2, 2), num_res_units=2, norm="batch", act="prelu"), s2),
        ("MONAI BasicUNet defaults", BasicUNet(2, 1, 3, features=(16, 16, 32, 64, 128, 16)), s2),
        ("MONAI BasicUNet BATCH/RELU (compiled via torch.export)",
         BasicUNet(2, 1, 3, features=(16, 16, 32, 64, 128, 16), norm="batch", act="relu"), s2),
        ("MONAI AttentionUnet (sigmoid gates x * psi)", AttentionUnet(2, 1, 3, (16, 32, 64), (2, 2)), s2),
        ("U-Net: Upsample + LeakyReLU + GroupNorm", UpLeakyGroup("group"), s2),
        ("U-Net: Upsample + LeakyReLU + BatchNorm", UpLeakyGroup("batch"), s2),
        ("Sigmoid-head binary U-Net (MONAI UNet + sigmoid)", SigmoidBinary(), s2),
        ("MONAI UNet 3D (1x1x64x64x64)", UNet(3, 1, 2, (8, 16, 32), (2, 2), num_res_units=1, norm="batch"),
         (1, 64, 64, 64)),
    ]


def test_volume(batch: int, size: int, seed: int = 0) -> np.ndarray:
    """Synthetic 3D scans (smooth balls + noise), N x 1 x size^3."""
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.mgrid[0:size, 0:size, 0:size] / size
    out = []
    for _ in range(batch):
        v = np.zeros((size, size, size))
        for _ in range(6):
            c, r = rng.uniform(0.2, 0.8, 3), rng.uniform(0.08, 0.25)
            v += rng.uniform(0.5, 1.5) * (np.sqrt((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2) < r)
        out.append(v + 0.1 * rng.normal(size=v.shape))
    return np.stack(out)[:, None]


def _train(net: Any, x: np.ndarray, steps: int) -> Any:
    """A short, seeded training on synthetic scans (intensity bands), so predictions are decisive."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    xt = torch.tensor(x, dtype=torch.float32)
    y = torch.bucketize(xt[:, 0], torch.tensor([0.5, 1.2]))
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    net.train()
    for _ in range(steps):
        opt.zero_grad()
        out = net(xt)
        if out.shape[1] == 1:
            loss = F.binary_cross_entropy(out[:, 0].clamp(1e-6, 1 - 1e-6), (y > 0).float())
        else:
            loss = F.cross_entropy(out, y.clamp(max=out.shape[1] - 1))
        loss.backward()
        opt.step()
    return net.eval()


def run_model_table(size: int = 64, steps: int = 60) -> list[dict[str, Any]]:
    """Issue #11's figures: for each model, does it compile (or why not), pixel agreement with the float
    model (mask output), max logit error (logits output), online seconds / MB / rounds, offline MB."""
    import torch

    from .errors import BlindsegError

    rows = []
    for name, net, shape in _zoo(size):
        row: dict[str, Any] = {"model": name, "input": list(shape)}
        images = test_image if len(shape) == 3 else test_volume
        n_train = 16 if len(shape) == 3 else 4
        cal = images(n_train, shape[-1], seed=6)
        x = images(1, shape[-1], seed=5)
        try:
            net = _train(net, images(n_train, shape[-1], seed=11), steps)
            comp = compile_model(net, shape, "mask", "auto", samples=cal)
        except BlindsegError as e:
            row.update(compiles=False, reason=str(e)[:200])
            rows.append(row)
            continue
        res = asyncio.run(run_compiled(comp, x))
        comp_l = compile_model(net, shape, "logits", "auto", samples=cal)
        res_l = asyncio.run(run_compiled(comp_l, x))
        with torch.no_grad():
            out = net(torch.tensor(x, dtype=torch.float32)).numpy().astype(np.float64)
        want = (out[:, 0] > 0.5).astype(np.int64) if out.shape[1] == 1 else np.argmax(out, 1)
        st = res.stats
        row.update(compiles=True, pixel_agreement=float(np.mean(res.mask == want)),
                   max_logit_error=float(np.max(np.abs(res_l.logits - out))),
                   online_seconds=st["online_seconds"], online_mb_per_server=st["online_bytes_per_server"] / 1e6,
                   rounds=st["rounds"], offline_mb_per_server=st["offline_bytes_per_server"] / 1e6,
                   frac_bits=comp.plan.frac_bits, ops=len(comp.plan.ops))
        rows.append(row)
    return rows


def format_model_table(rows: list[dict[str, Any]]) -> str:
    head = "| model | compiles | agreement | max logit error | online s | MB/server | rounds | offline MB |"
    out = [head, "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if not r["compiles"]:
            out.append(f"| {r['model']} | refused: {r['reason']} | | | | | | |")
        else:
            out.append(f"| {r['model']} | yes | {100 * r['pixel_agreement']:.3f}% | {r['max_logit_error']:.4f} | "
                       f"{r['online_seconds']:.2f} | {r['online_mb_per_server']:.1f} | {r['rounds']} | "
                       f"{r['offline_mb_per_server']:.1f} |")
    return "\n".join(out)


def run_norm_cost(seed: int = 0) -> list[dict[str, Any]]:
    """Issue #11: the secure group norm alone (a torch InstanceNorm / GroupNorm compiled as a model with
    logits output, run through the in-process services): rounds, online and offline bytes per element
    and per group, and its error against torch on the same input (in LSB of the output's scale)."""
    import torch
    import torch.nn as nn

    rng = np.random.default_rng(seed)
    rows = []
    for name, mod, shape in (("InstanceNorm2d, 16 x 128^2", nn.InstanceNorm2d(16), (16, 128, 128)),
                             ("GroupNorm(4 groups), 16 x 128^2", nn.GroupNorm(4, 16, affine=False), (16, 128, 128)),
                             ("InstanceNorm3d, 8 x 32^3", nn.InstanceNorm3d(8), (8, 32, 32, 32))):
        spread = rng.uniform(0.1, 2.0, size=(1, shape[0]) + (1,) * (len(shape) - 1))
        offset = rng.uniform(-1, 1, size=spread.shape)
        cal = rng.normal(size=(4, *shape)) * spread + offset
        x = rng.normal(size=(1, *shape)) * spread + offset
        comp = compile_model(mod, shape, "logits", "auto", samples=cal)
        res = asyncio.run(run_compiled(comp, x))
        f, fo = comp.plan.frac_bits, comp.plan.output_scale
        xq = np.rint(x * 2**f) / 2**f
        with torch.no_grad():
            want_q = mod(torch.as_tensor(xq)).numpy()
            want = mod(torch.as_tensor(x)).numpy()
        layer = next(L for L in res.stats["layers"] if L["kind"] == "norm")
        groups = int(comp.plan.ops[1].params.groups)
        elems = int(np.prod(shape))
        rows.append({"layer": name, "input_frac_bits": f, "output_frac_bits": fo, "rounds": layer["rounds"],
                     "online_bytes_per_server": layer["online_bytes"],
                     "online_bytes_per_element": layer["online_bytes"] / elems,
                     "offline_bytes_per_server": layer["offline_bytes"],
                     "offline_bytes_per_element": layer["offline_bytes"] / elems, "groups": groups,
                     "max_error_lsb_vs_torch_same_input": float(np.max(np.abs(res.logits - want_q)) * 2**fo),
                     "mean_error_lsb_vs_torch_same_input": float(np.mean(np.abs(res.logits - want_q)) * 2**fo),
                     "max_error_vs_float_input": float(np.max(np.abs(res.logits - want))),
                     "online_seconds": layer["online_seconds"]})
    return rows


async def run_placement_bench(model_name: str = "ref-unet", size: int = 32, net: str = "wan",
                              repeats: int = 3, netns: bool = False, estimator: str = "median",
                              bridged: bool = True) -> dict[str, Any]:
    """Issue #13: the real service through real Mosquittos for each broker placement: beside server0, at a
    third site (one broker, every party behind its own shaped relay: its access link, ``netsim.relay``), and
    two bridged brokers (server1 beside a broker of its own, bridged to server0's over the link). For each,
    the measured online time beside netsim's prediction (:func:`netsim.predict_placed`: the same
    deployment's jobs with the links unshaped, plus one two-hop message per round). ``repeats`` jobs per
    setup, setups interleaved; every job's mask must agree with the in-process one. ``bridged``: also the
    two-broker layout (a second deployment).

    ``netns``: each server runs in its own network namespace (:mod:`netsim.netns`, root only), its link
    a veth pair whose bandwidth the kernel's tbf shapes (queueing included); the relay on this side of
    the veth adds only the latency (server1's broker and the bridge's far end are in server1's
    namespace). The data owner (this process) keeps its user-space relay.
    ``estimator``: "median" of the jobs per setup, or "min" (robust to the one-sided slowdowns of a
    shared machine, for links whose cost is small beside that noise, e.g. the LAN)."""
    if estimator not in ("median", "min"):
        raise ValueError(f"estimator must be 'median' or 'min', not {estimator!r}")
    import tempfile

    from netsim import PLACEMENTS, Placement, placement, predict_placed, profile
    from netsim.netns import NamespaceLink

    from .broker import Mosquitto, free_port, mosquitto_config
    from .errors import UsageError
    from .models import load_named_model

    def stat(v: list[float]) -> float:
        return float(np.median(v) if estimator == "median" else np.min(v))

    x = test_image(1, size)
    model, samples, _ = load_named_model(model_name, size)
    comp = compile_model(model, tuple(x.shape[1:]), "mask", "auto", samples=samples)  # type: ignore[arg-type]
    local = await run_compiled(comp, x)
    logs, io = local.stats["round_log"], local.stats["io_frames"]
    if local.mask is None:
        raise UsageError(f"placement bench: model {model_name!r} gives no mask to check the jobs against")
    local_op = {int(r["op"]): float(r["online_seconds"]) for r in local.stats["layers"]}
    prof = profile(net)
    out: dict[str, Any] = {"model": model_name, "size": size, "net": prof.name, "repeats": repeats, "estimator": estimator,
                           "rounds": local.stats["rounds"], "placements": [], "runs_online_seconds": {},
                           "runs_wait_seconds": {}}
    links = {role: NamespaceLink(k + 1) for k, role in enumerate(("server0", "server1"))} if netns else {}
    with tempfile.TemporaryDirectory(prefix="blindseg-placement-") as tmp:
        try:
            for ln in links.values():
                ln.up()
            one = [placement(where, prof) for where in PLACEMENTS if where != "bridged"]
            with Mosquitto(Path(tmp) / "one") as broker:
                phases = [("unshaped", one, await _placement_jobs(Path(tmp) / "dep1", broker.port, None, one, links,
                                                                  x, local.mask, model_name, size, repeats))]
            if bridged:
                # server1's own broker, in its namespace (reachable from here on the veth's far end) or on
                # loopback, its bridge to server0's broker through a relay on this side of server1's link
                host1 = links["server1"].ns_ip if links else "127.0.0.1"
                bridge_from = links["server1"].host_ip if links else "127.0.0.1"

                def far(relay_port: int) -> Mosquitto:
                    port1 = free_port()
                    return Mosquitto(Path(tmp) / "b", port1, mosquitto_config(port1, host1) + _bridge_config(
                        bridge_from, relay_port), wrap=links["server1"].prefix() if links else (), host=host1)

                two = [placement("bridged", prof)]
                with Mosquitto(Path(tmp) / "a") as near:
                    phases.append(("unshaped, bridged brokers", two, await _placement_jobs(
                        Path(tmp) / "dep2", near.port, far, two, links, x, local.mask, model_name, size, repeats)))
        finally:
            for ln in links.values():
                ln.down()
    for unshaped, setups, (runs, waits, per_op) in phases:
        base = stat(runs[0])
        # what each op spent moving its bytes through the real brokers, beyond its in-process time
        overlap = {op: max(0.0, float(np.median(v)) - local_op.get(op, 0.0)) for op, v in per_op[0].items()}
        for k, pl in enumerate([None, *setups]):
            key = unshaped if pl is None else pl.name
            out["runs_online_seconds"][key] = [round(v, 4) for v in runs[k]]
            out["runs_wait_seconds"][key] = [round(v, 4) for v in waits[k]]
            if pl is None:
                continue
            if links:  # the kernel's token bucket lets a frame up to its depth through unpaced
                pl = Placement(pl.name, tuple((r, dataclasses.replace(p, burst=NamespaceLink.burst(p.bandwidth)))
                                              if r in links else (r, p) for r, p in pl.links))
            measured = stat(runs[k])
            predicted = predict_placed(base, logs, pl, io, overlap)
            out["placements"].append({"placement": pl.name, "unshaped_online_seconds": base,
                                      "measured_online_seconds": measured, "predicted_online_seconds": predicted,
                                      "predicted_over_measured": predicted / measured,
                                      "op_seconds": {op: float(np.median(v)) for op, v in per_op[k].items()}})
    out["unshaped_online_seconds"] = out["placements"][0]["unshaped_online_seconds"]
    out["links"] = "servers: namespaces, veth + tbf, relay latency" if netns else "every party: user-space relay"
    return out


def _bridge_config(host: str, port: int) -> str:
    """Mosquitto bridge stanza: every topic both ways at QoS 1 to the broker reached at host:port."""
    return "\n".join(["connection blindseg-bridge", f"address {host}:{port}", "topic # both 1", "try_private true",
                      "cleansession true", "notifications false", "bridge_protocol_version mqttv311", ""])


async def _placement_jobs(root: Path, port: int, bridge: Any, setups: list[Any], links: dict[str, Any],
                          x: np.ndarray, want: np.ndarray, model_name: str, size: int, repeats: int
                          ) -> tuple[dict[int, list[float]], dict[int, list[float]], dict[int, dict[int, list[float]]]]:
    """One deployment on the broker at ``port``; every party behind its own relay (its access link), or,
    with ``bridge`` (relay port -> server1's broker, not started, bridged to that port), server1 on its own
    broker whose bridge to ``port`` crosses the link (the bridge's relay). Runs a warm-up job, then
    ``repeats`` rounds of one job per setup (None first: unshaped); a mask that disagrees with ``want`` on
    over 1% of pixels raises. Returns per setup index: online seconds, job-start waits, per-op seconds."""
    import re

    from data_owner.client import Client
    from model_owner.client import deploy
    from netsim import PROFILES, Placement, Profile
    from netsim.relay import ShapedRelay

    from .config import PartyConfig
    from .demo import LocalDeployment
    from .errors import BlindsegError

    # a fixed pool of one: a refill of the throughput-sized pool still streaming through server1's link
    # when the next job starts queues its rounds behind megabytes of bundle (0.2-0.7 s per job measured)
    dep = LocalDeployment(root, f"mqtt://127.0.0.1:{port}", "none", pool=1, max_pool=1)
    relays = {role: ShapedRelay(port, listen=links[role].host_ip if role in links else None)
              for role in dep.configs if not (bridge is not None and role == "server1")}
    if bridge is not None:  # the bridge's far end connects from server1's side of the link
        relays["bridge"] = ShapedRelay(port, listen=links["server1"].host_ip if links else None)
    far = None
    for role in links:
        dep.wrap[role] = links[role].prefix()
    setups_ = [None, *setups]
    runs: dict[int, list[float]] = {k: [] for k in range(len(setups_))}
    waits: dict[int, list[float]] = {k: [] for k in range(len(setups_))}  # job in -> first round, servers
    per_op: dict[int, dict[int, list[float]]] = {k: {} for k in range(len(setups_))}

    def point(role: str, url: str) -> None:  # the role's config names the broker it connects to
        path = dep.configs[role]
        path.write_text(re.sub(r'^broker = ".*"$', f'broker = "{url}"', path.read_text(), flags=re.M))

    def shape(pl: Placement | None) -> None:
        for role, relay in relays.items():
            who = "server1" if role == "bridge" else role  # the bridge carries what server1's access link would
            link = pl.link(who) if pl is not None and role != "dealer" else PROFILES["none"]
            if who in links:  # the kernel plays the bandwidth, the relay only the latency
                links[who].shape(link.bandwidth)
                link = Profile(link.name, link.latency, 0.0, link.jitter)
            relay.profile = link

    try:
        for role, relay in relays.items():
            await relay.start()
            if role in dep.configs:
                point(role, f"mqtt://{relay.host}:{relay.port}")
        if bridge is not None:
            far = bridge(relays["bridge"].port).start()
            point("server1", far.url)
        await asyncio.to_thread(dep.start)
        await deploy(PartyConfig.load(dep.configs["model_owner"]), model_name, "bench", size=size)
        async with Client(PartyConfig.load(dep.configs["data_owner"])) as client:
            await client.plan("bench")
            await dep.wait_bundles(count=1)  # one job first: its first-touch costs would bias the baseline
            await client.segment("bench", x.astype(np.float32))
            done = 1
            for _ in range(repeats):  # interleaved, so a drift of the machine's speed hits every setup alike
                for k, pl in enumerate(setups_):
                    shape(pl)
                    await dep.wait_bundles(count=done + 1)
                    mask, cost = await client.segment("bench", x.astype(np.float32))
                    agree = float((np.asarray(mask).reshape(want.shape) == want).mean())
                    if agree < 0.99:  # the truncations' random rounding may flip a boundary pixel, never more
                        raise BlindsegError(f"placement bench: a job's mask agrees with the in-process one on only "
                                            f"{agree:.2%} of pixels (setup {k})")
                    done += 1
                    runs[k].append(cost["online_seconds"])
                    waits[k].append(cost["wait_seconds"])
                    for row in cost["layers"]:
                        per_op[k].setdefault(int(row["op"]), []).append(float(row["online_seconds"]))
            shape(None)
    finally:
        dep.stop()
        if far is not None:
            far.stop()
        for relay in relays.values():
            await relay.close()
    return runs, waits, per_op
