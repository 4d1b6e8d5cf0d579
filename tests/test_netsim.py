"""netsim: shaped links take the time the profile says; the cost model predicts shaped runs."""

from __future__ import annotations

import asyncio
import multiprocessing
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from blindseg.channel import MemoryLink
from blindseg.compiler import compile_model
from blindseg.errors import UsageError
from blindseg.models import build_model
from netsim import PROFILES, ShapedEndpoint, predict_online, profile


def test_profiles_and_parsing():
    assert PROFILES["lan"].latency == pytest.approx(1e-4) and PROFILES["lan"].bandwidth == 1e9
    assert PROFILES["wan"].latency == pytest.approx(0.02) and PROFILES["wan"].bandwidth == 1e8
    p = profile("5,200,1")
    assert (p.latency, p.bandwidth, p.jitter) == (pytest.approx(0.005), 2e8, pytest.approx(0.001))
    for bad in ("fast", "1", "-1,10", "1,2,3,4"):
        with pytest.raises(UsageError, match="network profile"):
            profile(bad)


async def test_shaped_transfer_time_matches_profile():
    link = MemoryLink()
    prof = profile("30,80")  # 30 ms one way, 80 Mbit/s
    a = ShapedEndpoint(link.a, prof)
    frames = [bytes(500_000)] * 4  # 4 x 50 ms of wire time, back to back
    t0 = time.perf_counter()
    for k, f in enumerate(frames):
        await a.send(f"f{k}", f)
    for k in range(len(frames)):
        await link.b.recv(f"f{k}", 5)
    took = time.perf_counter() - t0
    want = 4 * 500_000 * 8 / 80e6 + 0.030  # serialization is FIFO, latency overlaps
    assert want <= took < want * 1.15 + 0.01
    assert a.counters.bytes_sent == 2_000_000  # counted once, on the real frames


async def test_fifo_is_kept_under_jitter():
    link = MemoryLink()
    a = ShapedEndpoint(link.a, profile("1,1000,20"), seed=3)
    for k in range(20):
        await a.send(f"f{k}", bytes([k]))
    order = []
    for k in range(20):
        order.append((await link.b.recv(f"f{k}", 5))[0])
    assert order == list(range(20))
    assert [lab for lab, _ in link.a.counters.log] == [f"f{k}" for k in range(20)]


@pytest.mark.slow
def test_cost_model_predicts_a_shaped_run_within_15_percent():
    from blindseg.engine import run_compiled

    model = build_model("ref-unet", classes=2, seed=1)
    x = np.random.default_rng(0).normal(size=(1, 1, 32, 32)).astype(np.float32)
    comp = compile_model(model, (1, 32, 32), "mask", "auto", samples=x)
    prof = profile("10,100")  # 10 ms one way, 100 Mbit/s: the network dominates, as on a WAN
    # the unshaped time is the compute part of the prediction; on a shared machine it drifts, so run
    # unshaped and shaped in interleaved pairs and compare the medians of prediction and measurement
    preds, took = [], []
    for _ in range(3):
        base = asyncio.run(run_compiled(comp, x))
        shaped = asyncio.run(run_compiled(comp, x, net=prof))
        assert np.array_equal(base.mask, shaped.mask)
        preds.append(predict_online(base.stats["online_seconds"], base.stats["round_log"], prof,
                                    base.stats["io_frames"]))
        took.append(shaped.stats["online_seconds"])
    pred, measured = float(np.median(preds)), float(np.median(took))
    assert abs(pred - measured) <= 0.15 * measured, (preds, took)
    assert min(took) > base.stats["rounds"] * prof.latency * 0.9


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("mosquitto") is None and not Path("/usr/sbin/mosquitto").exists(),
                    reason="the mosquitto binary is not installed on this machine")
def test_broker_placement_prediction_matches_a_relayed_deployment() -> None:
    """The real service through real Mosquittos, each party behind a shaped relay (its access link):
    with the broker beside server0 a round crosses one slow link, at a third site two, with two bridged
    brokers (one beside each server) the bridge; the prediction is within 15% of every measurement."""
    from blindseg.bench import run_placement_bench

    r = asyncio.run(run_placement_bench("ref-unet", 32, "10,100", repeats=3))
    near, third, bridged = r["placements"]  # every job's mask agreed with the in-process run (the bench checks)
    for p in (near, third):
        assert abs(p["predicted_over_measured"] - 1) <= 0.15, p
    assert third["measured_online_seconds"] > near["measured_online_seconds"] + 0.9 * r["rounds"] * 0.010
    # two bridged brokers run correct jobs, shaped and not; their time is reported, not predicted within 15%:
    # a small message crosses Mosquitto 2.0.11's bridge in ~44 ms whatever the link (README, "Broker placement")
    assert bridged["placement"].startswith("two bridged brokers") and len(r["runs_online_seconds"][bridged["placement"]]) == 3


async def test_relay_delays_and_paces_bytes() -> None:
    from netsim.relay import ShapedRelay

    got = asyncio.get_running_loop().create_future()

    async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.readexactly(1_000_000)
        got.set_result((time.perf_counter(), len(data)))
        writer.close()

    server = await asyncio.start_server(sink, "127.0.0.1", 0)
    async with ShapedRelay(server.sockets[0].getsockname()[1], profile("30,80")) as relay:
        _, w = await asyncio.open_connection("127.0.0.1", relay.port)
        t0 = time.perf_counter()
        w.write(bytes(1_000_000))
        await w.drain()
        arrived, n = await asyncio.wait_for(got, 10)
        w.close()
    server.close()
    want = 1_000_000 * 8 / 80e6 + 0.030  # 100 ms of wire time, then 30 ms of latency
    assert n == 1_000_000 and want * 0.95 <= arrived - t0 < want * 1.2 + 0.01


def _placement_run(net: str) -> dict:
    from blindseg.bench import run_placement_bench

    return asyncio.run(run_placement_bench("ref-unet", 32, net, repeats=5, netns=True, bridged=False,
                                           estimator="min" if net == "lan" else "median"))


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("mosquitto") is None and not Path("/usr/sbin/mosquitto").exists(),
                    reason="the mosquitto binary is not installed on this machine")
@pytest.mark.parametrize("net", ["10,100", "lan"])
def test_placement_prediction_matches_servers_in_network_namespaces(net: str) -> None:
    """Each server in its own network namespace: its link a veth pair whose bandwidth the kernel's tbf
    shapes (queueing and all), the latency a relay on this side; the two-hop prediction is within 15%
    of the measurement for both one-broker placements, on a WAN-like and on the LAN profile."""
    from netsim.netns import unavailable

    why = unavailable()
    if why:
        pytest.skip(why)
    # five jobs per setup; on the LAN the fastest (the links add little to a noisy job), else the median
    lan = net == "lan"
    # in a fresh interpreter, whose event loop runs only the relays and the data owner. (Session 9 blamed
    # state left by earlier tests for shaped jobs 15-17% slower than predicted; session 10 found the cause:
    # the dealer's throughput-sized pool streamed a second bundle through server1's shaped link while the
    # next job ran, 0.2-0.7 s of queueing per job. The bench now keeps a fixed pool of one.)
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        r = pool.apply(_placement_run, (net,))
    assert r["links"].startswith("servers: namespaces")
    base = r["runs_online_seconds"]["unshaped"]
    # on the LAN the machine's own job-to-job spread (seen in the unshaped jobs of this run) can exceed
    # what the links add; it widens the bound there, and only there
    noise = (max(base) - min(base)) if lan else 0.0
    for p in r["placements"]:
        err = abs(p["predicted_online_seconds"] - p["measured_online_seconds"])
        assert err <= 0.15 * p["measured_online_seconds"] + noise, (p, r["runs_online_seconds"], r["runs_wait_seconds"])
