"""In-process secure inference: the real role services over in-memory links.

``secure_segment`` compiles the model (model owner) and hands it to :func:`run_compiled`, which
starts the dealer and both servers as the same services a deployment runs (``server.service``,
``dealer.service``), joined by a :class:`~blindseg.channel.MemoryNetwork` instead of MQTT: the same
messages, labels, bundle store, agreement and round driver. The model owner deploys through its
own client code, the dealer streams one bundle (offline, measured apart), and the data owner's
client shares the image, waits for the output shares and reconstructs (online). Costs are what the
servers report to the data owner, exactly as over MQTT (in-memory frames carry no sealing).
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from data_owner import validate_image
from data_owner.client import Client
from dealer.service import DealerService
from model_owner.client import deploy_compiled
from netsim import PROFILES, Profile
from server.service import ServerService, ServerSettings

from . import ids
from .channel import MemoryNetwork
from .compiler import compile_model
from .config import PARTIES
from .errors import BlindsegError, UsageError
from .node import Node
from .plan import DEFAULT_ARITIES, Compiled, Plan

MODEL_ID = "model"
SHAPED = ("server0", "server1", "data_owner")  # the online links netsim shapes


@dataclass
class SegmentResult:
    """What the data owner gets back, plus the run's measured costs."""

    mask: np.ndarray | None
    logits: np.ndarray | None
    stats: dict[str, Any]
    plan: Plan


def secure_segment(model: Any, image: Any, frac_bits: int | str = "auto", output: str = "mask",
                   calibration: Any = None, arities: tuple[int, ...] = DEFAULT_ARITIES) -> SegmentResult:
    """Segment ``image`` ((N, C, *spatial) float) with ``model`` on secret shares, in-process.

    ``calibration``: the model owner's sample inputs for ``frac_bits="auto"``; without them the image
    itself is used, with a warning. An image outside the calibrated range is refused (never run).
    """
    return asyncio.run(secure_segment_async(model, image, frac_bits, output, calibration, arities))


async def secure_segment_async(model: Any, image: Any, frac_bits: int | str = "auto", output: str = "mask",
                               calibration: Any = None, arities: tuple[int, ...] = DEFAULT_ARITIES) -> SegmentResult:
    """Async form of :func:`secure_segment`."""
    arr = np.asarray(image.detach().cpu().numpy() if hasattr(image, "detach") else image)
    if arr.ndim < 3:
        raise UsageError(f"image must be N x C x H x W (2D) or N x C x D x H x W (3D), got shape {arr.shape}")
    if calibration is None:
        warnings.warn("secure_segment without calibration samples calibrates on the image itself: fine for "
                      "this one image, but the fixed-point scale then fits only it; pass calibration= (the model "
                      "owner's samples) for a plan that serves other images", UserWarning, stacklevel=3)
    comp = compile_model(model, tuple(arr.shape[1:]), output, frac_bits,
                         samples=np.asarray(calibration) if calibration is not None else _finite(arr), arities=arities)
    return await run_compiled(comp, arr)


def _finite(arr: np.ndarray) -> np.ndarray:
    if arr.dtype.kind not in "fiu" or not np.all(np.isfinite(arr)):
        raise UsageError("image contains NaN or infinite values" if arr.dtype.kind in "fiu"
                         else f"image must be numeric, got dtype {arr.dtype}")
    return arr


async def run_compiled(comp: Compiled, image: Any, state_dir: str | Path | None = None,
                       preload_bytes: int = 1 << 30, net: Profile = PROFILES["none"],
                       timeout: float = 600.0, jobs: int = 1) -> SegmentResult:
    """Deploy a compiled model on in-process services and run ``jobs`` jobs (one after another, each on
    its own bundle) through all five roles; the result and costs are the last job's (``stats`` also
    holds every job's online seconds).

    Each server keeps its state (models, bundle store) under ``state_dir/server<i>`` (a temporary
    directory, removed afterwards, if None). ``net`` shapes the online links (server <-> server,
    data owner <-> servers). A job whose material fits in ``preload_bytes`` per server is expanded
    before the image arrives; a bigger one is expanded op by op while it runs.
    """
    x = validate_image(comp.plan, image)  # the data owner checks before anything is shared
    with tempfile.TemporaryDirectory(prefix="blindseg-") as tmp:
        root = Path(state_dir) if state_dir is not None else Path(tmp)
        mem = MemoryNetwork(PARTIES)
        nodes = {p: Node(p, mem.transports[p], net if p in SHAPED else None) for p in PARTIES}
        servers = [ServerService(i, nodes[f"server{i}"], root / f"server{i}", ServerSettings(preload_bytes=preload_bytes))
                   for i in (0, 1)]
        dealer = DealerService(nodes["dealer"], root / "dealer", pool=0)
        services: list[Any] = [*servers, dealer]
        tasks = [asyncio.create_task(s.serve()) for s in services]
        try:
            return await _job(comp, x, servers, dealer, nodes, net, timeout, tasks, jobs)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await nodes["model_owner"].close()


async def _job(comp: Compiled, x: np.ndarray, servers: list[ServerService], dealer: DealerService,
               nodes: dict[str, Node], net: Profile, timeout: float, tasks: list[asyncio.Task[None]],
               jobs: int = 1) -> SegmentResult:
    mo = await nodes["model_owner"].start()
    dep = await deploy_compiled(mo, comp, MODEL_ID, timeout)
    deploy_bytes = [servers[i].node.link(f"server{1 - i}").counters.bytes_sent + mo.link(f"server{i}").counters.bytes_sent
                    for i in (0, 1)]
    times: list[float] = []
    async with Client(nodes["data_owner"], timeout) as client:
        await client.plan(MODEL_ID)
        for _ in range(jobs):
            res = await _one_job(comp, x, servers, dealer, client, net, timeout, tasks, dep, deploy_bytes)
            times.append(res.stats["online_seconds"])
    res.stats["jobs_online_seconds"] = times
    return res


async def _one_job(comp: Compiled, x: np.ndarray, servers: list[ServerService], dealer: DealerService,
                   client: Client, net: Profile, timeout: float, tasks: list[asyncio.Task[None]],
                   dep: dict[str, Any], deploy_bytes: list[int]) -> SegmentResult:
    plan, batch = comp.plan, x.shape[0]
    key = ids.key(MODEL_ID, dep["epoch"])
    t_off = time.perf_counter()
    dealt = dealer.dealer_seconds
    dealer.request(key, batch)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not all(s.pool.settled(key, batch) for s in servers):  # offline is measured apart from online
        for t in tasks:
            if t.done():
                with contextlib.suppress(asyncio.CancelledError):
                    t.result()
                raise BlindsegError("a service stopped before the bundle arrived")
        if loop.time() > deadline:
            raise BlindsegError(f"no bundle reached both servers within {timeout:.0f} s")
        await asyncio.sleep(0.005)
    offline_seconds = time.perf_counter() - t_off

    result, cost = await client.segment(MODEL_ID, x)
    online_bytes = [cost["server_bytes"][i] + cost["output_bytes"][i] for i in (0, 1)]
    st: dict[str, Any] = {
        "online_seconds": cost["online_seconds"],
        "offline_seconds": offline_seconds,
        "dealer_seconds": dealer.dealer_seconds - dealt,
        "deploy_seconds": dep["deploy_seconds"],
        "online_bytes": online_bytes,
        "offline_bytes": cost["offline_bytes"],
        "deploy_bytes": deploy_bytes,
        "online_bytes_per_server": max(online_bytes),
        "offline_bytes_per_server": max(cost["offline_bytes"]),
        "rounds": cost["rounds"],
        "frac_bits": plan.frac_bits,
        "batch": batch,
        "layers": cost["layers"],
        "net": net.name,
        "round_log": cost["round_log"],
        "io_frames": cost["io_frames"],
        "server_run_seconds": cost["server_run_seconds"],
        "server_compute_seconds": cost["server_compute_seconds"],
    }
    if plan.output == "mask":
        return SegmentResult(result, None, st, plan)
    return SegmentResult(None, result, st, plan)
