"""In-process secure inference: the five roles as asyncio tasks over in-memory links.

``secure_segment`` compiles the model (model owner), deploys masks (dealer),
opens E (servers), generates and ships one bundle (offline), then shares the
image, walks the plan and reconstructs (online). Every byte between roles is
a serialized frame on a :class:`~blindseg.channel.MemoryLink`, so the counts
are those the networked service sends (before transport encryption).
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from data_owner import reconstruct, share_image, validate_image
from dealer import Dealer
from dealer.core import model_mask_shares, stream_bundle
from model_owner import share_weights, weights_frame
from netsim import PROFILES, Profile, wrap
from netsim import close as close_links

from .channel import MemoryLink
from .errors import UsageError
from .plan import Compiled, Plan, compile_model
from .preprocessing import DEFAULT_ARITIES
from .report import layer_rows
from .server import Prepared, RunStats, ServerCore, drive, receive_bundle
from .store import BundleStore
from .wire import decode_frame, encode_frame


@dataclass
class SegmentResult:
    """What the data owner gets back, plus the run's measured costs."""

    mask: np.ndarray | None
    logits: np.ndarray | None
    stats: dict[str, Any]
    plan: Plan


def parse_weights(frame: bytes | memoryview) -> dict[int, tuple[np.ndarray, np.ndarray | None]]:
    header, arrays = decode_frame(frame)
    out: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}
    k = 0
    for i, hb in zip(header["ops"], header["bias"], strict=True):
        w = arrays[k]
        k += 1
        b = arrays[k] if hb else None
        k += 1 if hb else 0
        out[int(i)] = (w, b)
    return out


def secure_segment(model: Any, image: Any, frac_bits: int | str = "auto", output: str = "mask",
                   calibration: Any = None, arities: tuple[int, ...] = DEFAULT_ARITIES) -> SegmentResult:
    """Segment ``image`` (N x C x H x W float) with ``model`` on secret shares, in-process.

    ``calibration``: the model owner's sample inputs for ``frac_bits="auto"``
    (defaults to the image itself, which is fine for a single-process run).
    """
    return asyncio.run(secure_segment_async(model, image, frac_bits, output, calibration, arities))


async def secure_segment_async(model: Any, image: Any, frac_bits: int | str = "auto", output: str = "mask",
                               calibration: Any = None, arities: tuple[int, ...] = DEFAULT_ARITIES) -> SegmentResult:
    """Async form of :func:`secure_segment`."""
    arr = np.asarray(image.detach().cpu().numpy() if hasattr(image, "detach") else image)
    if arr.ndim != 4:
        raise UsageError(f"image must be N x C x H x W, got shape {arr.shape}")
    comp = compile_model(model, tuple(arr.shape[1:]), output, frac_bits,  # type: ignore[arg-type]
                         samples=np.asarray(calibration) if calibration is not None else _finite(arr))
    return await run_compiled(comp, arr, arities)


def _finite(arr: np.ndarray) -> np.ndarray:
    if arr.dtype.kind not in "fiu" or not np.all(np.isfinite(arr)):
        raise UsageError("image contains NaN or infinite values" if arr.dtype.kind in "fiu"
                         else f"image must be numeric, got dtype {arr.dtype}")
    return arr


def _per_op_bytes(log: list[tuple[str, int]]) -> dict[int, int]:
    out: dict[int, int] = {}
    for label, n in log:
        parts = label.split(":")
        if len(parts) == 3 and parts[0] == "bundle":
            out[int(parts[2])] = out.get(int(parts[2]), 0) + n
    return out


async def run_compiled(comp: Compiled, image: Any, arities: tuple[int, ...] = DEFAULT_ARITIES,
                       state_dir: str | Path | None = None, preload_bytes: int = 1 << 30,
                       net: Profile = PROFILES["none"]) -> SegmentResult:
    """Deploy a compiled model and run one job through all five roles.

    Each server keeps its bundle in a :class:`~blindseg.store.BundleStore` under
    ``state_dir/server<i>`` (a temporary directory, removed afterwards, if None).
    ``net`` shapes the online links (server <-> server, data owner <-> servers).
    A job whose material fits in ``preload_bytes`` per server is expanded before
    the image arrives; a bigger one is expanded op by op while it runs.
    """
    with tempfile.TemporaryDirectory(prefix="blindseg-") as tmp:
        root = Path(state_dir) if state_dir is not None else Path(tmp)
        stores = [BundleStore(root / "server0"), BundleStore(root / "server1")]
        try:
            return await _run(comp, image, arities, stores, preload_bytes, net)
        finally:
            for st in stores:
                st.close()


async def _run(comp: Compiled, image: Any, arities: tuple[int, ...], stores: list[BundleStore],
               preload_bytes: int, net: Profile) -> SegmentResult:
    plan = comp.plan
    x = validate_image(plan, image)
    batch = x.shape[0]
    model_id = "model"
    srv = [ServerCore(0, plan, arities), ServerCore(1, plan, arities)]
    mo = [MemoryLink(), MemoryLink()]  # model owner <-> server i
    de = [MemoryLink(), MemoryLink()]  # dealer <-> server i
    do = [MemoryLink(), MemoryLink()]  # data owner <-> server i
    ss = MemoryLink()  # server0 <-> server1
    peer = [ss.a, ss.b]
    net_peer = [wrap(ss.a, net), wrap(ss.b, net)]  # netsim shapes the online links, never the protocols
    net_do = [(wrap(do[i].a, net), wrap(do[i].b, net)) for i in (0, 1)]

    # ---- deploy (once per model)
    t_dep = time.perf_counter()
    dealer = Dealer(arities)
    w_shares = share_weights(comp)
    mask_seeds = dealer.deploy(model_id, plan)
    for i in (0, 1):
        await mo[i].a.send("deploy:weights", weights_frame(model_id, w_shares[i]))
        await de[i].a.send("deploy:masks", encode_frame({"t": "masks", "model": model_id, "seed": mask_seeds[i]}))

    async def deploy_server(i: int) -> None:
        w = parse_weights(await mo[i].b.recv("deploy:weights"))
        mh, _ = decode_frame(await de[i].b.recv("deploy:masks"))
        masks = model_mask_shares(plan, mh["seed"])
        await drive(srv[i].deploy(w, masks), i, peer[i], "deploy")

    await asyncio.gather(deploy_server(0), deploy_server(1))
    deploy_seconds = time.perf_counter() - t_dep
    deploy_bytes = [peer[i].counters.bytes_sent + mo[i].a.counters.bytes_sent for i in (0, 1)]
    for ep in peer:
        ep.counters.reset()

    # ---- offline (before the image exists): streamed op by op into each server's store
    t_off = time.perf_counter()

    async def offline_server(i: int) -> Prepared:
        frame = await de[i].b.recv(f"bundle:{bid}")
        await receive_bundle(srv[i], stores[i], frame, de[i].b)
        prep = srv[i].begin(stores[i], bid, "job")
        await asyncio.to_thread(prep.preload, preload_bytes)
        return prep

    bid = dealer.new_bundle_id()
    dealer_task = asyncio.ensure_future(stream_bundle(dealer, model_id, batch, de[0].a, de[1].a, bid))
    preps = await asyncio.gather(offline_server(0), offline_server(1))
    _, dealer_seconds = await dealer_task
    offline_seconds = time.perf_counter() - t_off
    offline_bytes = [de[i].a.counters.bytes_sent - de[i].a.counters.log[0][1] for i in (0, 1)]
    offline_per_op = _per_op_bytes(de[1].a.counters.log)

    # ---- online
    t_on = time.perf_counter()
    x0, x1 = share_image(plan, x)
    for i, xs in enumerate((x0, x1)):
        await net_do[i][0].send("job:input", encode_frame({"t": "input"}, [xs]))
    stats = [RunStats(), RunStats()]

    async def online_server(i: int) -> None:
        _, (xs,) = decode_frame(await net_do[i][1].recv("job:input"))
        try:
            out = await drive(srv[i].run(preps[i], xs), i, net_peer[i], "job", stats[i])
        finally:
            stores[i].discard(bid)
        await net_do[i][1].send("job:output", encode_frame({"t": "output"}, [np.ascontiguousarray(out)]))

    await asyncio.gather(online_server(0), online_server(1))
    outs = [decode_frame(await do[i].a.recv("job:output"))[1][0] for i in (0, 1)]
    await close_links([*net_peer, *(e for pair in net_do for e in pair)])
    result = reconstruct(plan, outs[0], outs[1])
    online_seconds = time.perf_counter() - t_on

    online_bytes = [peer[i].counters.bytes_sent + do[i].b.counters.bytes_sent for i in (0, 1)]
    layers = layer_rows(plan, [{j: (s.seconds, s.bytes_sent, s.rounds) for j, s in st.per_op.items()} for st in stats],
                        offline_per_op)
    st: dict[str, Any] = {
        "online_seconds": online_seconds,
        "offline_seconds": offline_seconds,
        "dealer_seconds": dealer_seconds,
        "deploy_seconds": deploy_seconds,
        "online_bytes": online_bytes,
        "offline_bytes": offline_bytes,
        "deploy_bytes": deploy_bytes,
        "online_bytes_per_server": max(online_bytes),
        "offline_bytes_per_server": max(offline_bytes),
        "rounds": stats[0].rounds,
        "frac_bits": plan.frac_bits,
        "batch": batch,
        "layers": layers,
        "net": net.name,
        "round_log": [list(peer[i].counters.log) for i in (0, 1)],
        "io_frames": [do[0].a.counters.log[0][1], do[0].b.counters.log[-1][1]],
    }
    if plan.output == "mask":
        return SegmentResult(result, None, st, plan)
    return SegmentResult(None, result, st, plan)
