"""Broker-side attacks on the running service (issue #10), each through the real components: the
services as OS processes, the real sealing and transport, a private Mosquitto. The hostile broker is
played by :mod:`tests.rogue` (it records every message and can deliver any of them, or crafted ones,
on any topic). Each attack must fail visibly (a logged reason) and change nothing."""

from __future__ import annotations

import asyncio
import json
import time

import numpy as np
import pytest
import torch

from blindseg.broker import Mosquitto
from blindseg.config import PartyConfig
from blindseg.demo import LocalDeployment
from blindseg.messages import Job
from blindseg.models import load_named_model
from blindseg.transport import CHUNK
from data_owner.client import Client
from model_owner.client import deploy

from .deployed import NEEDS_MOSQUITTO, SIZE, TIMEOUTS, reference_mask, role_log, segment_ok
from .rogue import Recorder, Rogue, deliver

pytestmark = NEEDS_MOSQUITTO


@pytest.fixture(scope="module")
def reference():
    return reference_mask()


_log, _ok = role_log, segment_ok




async def _until(pred, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.1)


@pytest.fixture
async def running(tmp_path):
    with Mosquitto(tmp_path) as broker:
        dep = LocalDeployment(tmp_path / "dep", broker.url, pool=1, settings=TIMEOUTS)
        try:
            await asyncio.to_thread(dep.start)
            async with Recorder(broker.port) as rec:
                await deploy(PartyConfig.load(dep.configs["model_owner"]), "ref-unet", "m", size=SIZE, timeout=60)
                await dep.wait_bundles()
                yield dep, broker, rec
        finally:
            dep.stop()


async def test_spliced_and_shortened_frames_are_refused(running, reference) -> None:
    dep, broker, _ = running
    cfg = PartyConfig.load(dep.configs["data_owner"])
    big = np.zeros((600, 1, SIZE, SIZE), np.uint32)  # 2.4 MiB: three 1 MiB chunks
    frames = [Job(f"{k}" * 32, "nosuch", "e1", 600, (big + k,)).encode() for k in range(6)]
    async with Rogue(broker.port, "demo", "data_owner", cfg.key, "server0", cfg.peers["server0"]) as r:
        # sealed in this order, as the real client would send them; the broker drops some and delivers the
        # rest in order (a broker cannot reorder one sealed stream: counters must increase)
        a, b, c, d, e, control = (r.chunks("ctl:job", f, CHUNK) for f in frames)
        assert len(a) == 3
        await r.send(a[0], a[1], b[2])  # A0 | A1 | B2: two hospitals' job shares mixed
        await r.send(c[0], d[1])  # C0 | D1: a shorter "frame" made of two
        await r.send(e[0], e[1])  # never completed: superseded by the next frame
        await r.send(*control)  # the same sealing, complete: accepted (and refused as a job for no model)
    await _until(lambda: "model 'nosuch' is not deployed" in _log(dep, "server0"))
    log0 = _log(dep, "server0")
    assert log0.count("does not belong to the frame being assembled") >= 2
    assert "dropped incomplete frame" in log0
    assert log0.count("model 'nosuch' is not deployed") == 1  # only the control frame ever reached the service
    assert "Traceback" not in log0
    await _ok(dep, reference)


async def test_replays_after_a_restart_and_across_runs_never_verify(running, reference) -> None:
    dep, broker, rec = running
    plan_topic = "blindseg/demo/dealer/model_owner"
    recorded_plan = rec.on(plan_topic)
    assert recorded_plan, "the deploy's plan to the dealer was recorded"
    seeds = json.loads((dep.root / "state" / "dealer" / "models.json").read_text())

    # (1) the dealer restarts; the broker replays the model owner's hello and plan
    await asyncio.to_thread(dep.restart, "dealer")
    await deliver(broker.port, [(plan_topic, p) for p in recorded_plan])
    await _until(lambda: "unknown session" in _log(dep, "dealer"))
    assert json.loads((dep.root / "state" / "dealer" / "models.json").read_text()) == seeds  # no new seeds drawn

    # (2) two data-owner runs; the first run's job is replayed to the servers after the second started
    await _ok(dep, reference)
    job_topic = "blindseg/demo/server0/data_owner"
    first_run = rec.on(job_topic)
    await _ok(dep, reference)
    jobs_before = _log(dep, "server0").count(": job ")
    await deliver(broker.port, [(job_topic, p) for p in first_run])
    await _until(lambda: "stale handshake" in _log(dep, "server0") and "unknown session" in _log(dep, "server0"))
    await asyncio.sleep(1.0)
    assert _log(dep, "server0").count(": job ") == jobs_before  # no job ran from the replay
    # (3) the same run's frames replayed: counters
    await deliver(broker.port, [(job_topic, p) for p in rec.on(job_topic)[len(first_run):] if p[:4] == b"BSE2"])
    await _until(lambda: "replayed or reordered" in _log(dep, "server0"))
    await _ok(dep, reference)
    for role in ("dealer", "server0", "server1"):
        assert "Traceback" not in _log(dep, role)


async def test_tenants_are_isolated_on_a_real_mosquitto(tmp_path, reference) -> None:
    """Two hospitals on the kit's TLS + password + ACL broker: neither can subscribe to the other's
    results, each has its own key (the other's frames never open), and a server refuses a job from a
    tenant the model owner did not allow."""
    import ssl

    import aiomqtt

    from blindseg.broker import free_port
    from blindseg.crypto import SecureLink

    port = free_port()
    dep = LocalDeployment(tmp_path / "dep", None, pool=1, settings=TIMEOUTS, tenants=("hospital-a", "hospital-b"),
                          tls_port=port)
    with Mosquitto(tmp_path, port=port, config=dep.broker_config(), cwd=dep.root / "broker"):
        try:
            await asyncio.to_thread(dep.start)
            await deploy(PartyConfig.load(dep.configs["model_owner"]), "ref-unet", "m", size=SIZE, timeout=60,
                         tenants=["hospital-a"])
            await dep.wait_bundles()
            a, b = PartyConfig.load(dep.configs["hospital-a"]), PartyConfig.load(dep.configs["hospital-b"])
            assert a.name == "hospital-a" and a.key.public_key() != b.key.public_key()
            ctx = ssl.create_default_context(cafile=b.broker.ca_file)
            got: list[str] = []
            async with aiomqtt.Client("127.0.0.1", port, username=b.broker.username, password=b.broker.password,
                                      tls_context=ctx, protocol=aiomqtt.ProtocolVersion.V5) as spy:
                for t in ("blindseg/demo/hospital-a/#", "blindseg/demo/+/+", "#"):
                    await spy.subscribe(t, qos=1)

                async def listen() -> None:
                    async for m in spy.messages:
                        got.append(str(m.topic))

                listener = asyncio.get_running_loop().create_task(listen())
                x, want = reference
                async with Client(a, timeout=60) as ca:
                    mask, _ = await ca.segment("m", x)
                assert (mask == want).mean() >= 0.99
                async with Client(b, timeout=30) as cb:
                    with pytest.raises(Exception, match="hospital-b is not an allowed tenant of model 'm'"):
                        await cb.segment("m", x)
                await asyncio.sleep(0.5)
                listener.cancel()
            # b's login saw only what is addressed to b (the refusal, presence sealed for b), never a's traffic
            assert got and all(t.startswith("blindseg/demo/hospital-b/") or
                               (t.startswith("blindseg/demo/status/") and t.endswith("/hospital-b")) for t in got)
            assert not any("hospital-a" in t for t in got)
            # b's status view: the servers up, no model it may not use, nothing of a's
            import json

            from blindseg.status import collect

            view = await collect(b, 3.0)
            assert {p: view[p]["state"] for p in view} == {"server0": "up", "server1": "up"}
            assert view["server0"]["models"] == {} and view["server0"]["pool"] == {}
            assert "hospital-a" not in json.dumps(view)
            assert any("not an allowed tenant" in f["error"] for f in view["server0"]["recent_failures"])
            # b cannot speak as a either: the ACL drops b's publish on a's topic before any server sees it (and
            # b's key could not make a's hello: test_hostile::test_handshake_is_authenticated_by_the_static_keys)
            forged = SecureLink(b.key, a.peers["server0"], b.key, "demo", "hospital-a", "server0")
            before = _log(dep, "server0").count("dropped message from hospital-a")
            await deliver_tls(port, b, "blindseg/demo/server0/hospital-a", forged.hello("blindseg/demo/server0/hospital-a"))
            await asyncio.sleep(1.0)
            assert _log(dep, "server0").count("dropped message from hospital-a") == before
            assert "Traceback" not in _log(dep, "server0")
        finally:
            dep.stop()


async def deliver_tls(port: int, cfg: PartyConfig, topic: str, payload: bytes) -> None:
    """Publish as ``cfg``'s broker login; the ACL only lets a party write on topics that end in its name."""
    import ssl

    import aiomqtt

    ctx = ssl.create_default_context(cafile=cfg.broker.ca_file)
    async with aiomqtt.Client("127.0.0.1", port, username=cfg.broker.username, password=cfg.broker.password,
                              tls_context=ctx, protocol=aiomqtt.ProtocolVersion.V5) as c:
        await c.publish(topic, payload, qos=1)


async def test_a_redeploy_never_serves_old_masks_and_old_epochs_are_refused(running, reference) -> None:
    """Redeploying under the same name: the old pool is purged, the next job uses the new weights (its
    mask matches the new model, not the old), a client holding the old plan is told and re-fetches, and
    a bundle announcement for the old epoch is refused."""
    from blindseg.compiler import compile_model
    from blindseg.messages import BundleAnnounce
    from blindseg.node import Node
    from model_owner.client import deploy_compiled

    dep, broker, rec = running
    x, old_want = reference
    models = dep.root / "state" / "server0" / "models"
    old_epoch = (models / "m.current").read_text()
    async with Client(PartyConfig.load(dep.configs["data_owner"]), timeout=60) as client:
        await client.plan("m")  # cached: epoch 1
        new_model, samples, _ = load_named_model("ref-unet", SIZE)  # the upgrade: the head's classes swapped
        head = [m for m in new_model.modules() if isinstance(m, torch.nn.Conv2d)][-1]
        with torch.no_grad():
            head.weight.neg_()
            head.bias.neg_()
        comp = compile_model(new_model, (1, SIZE, SIZE), "mask", "auto", samples=samples)
        node = await Node.from_config(PartyConfig.load(dep.configs["model_owner"])).start()
        try:
            res = await deploy_compiled(node, comp, "m", timeout=60)
        finally:
            await node.close()
        assert res["epoch"] != old_epoch and (models / "m.current").read_text() == res["epoch"]
        assert not list(models.glob(f"m@{old_epoch}*"))  # the old deployment is gone from disk
        with torch.no_grad():
            new_want = torch.argmax(new_model(torch.from_numpy(x)), 1).numpy()
        assert (new_want != old_want).mean() > 0.05  # the two models really differ on this image
        mask, _ = await client.segment("m", x)  # stale plan: refused by the servers, re-fetched, then run
        assert client.epochs["m"] == res["epoch"]
        assert (mask == new_want).mean() >= 0.99
    assert "was redeployed" in _log(dep, "server0")
    # an announcement for the old epoch (what a stale dealer or a replaying broker would bring) is refused
    cfg = PartyConfig.load(dep.configs["dealer"])
    await asyncio.to_thread(dep.procs["dealer"].terminate)
    dep.procs["dealer"].wait(10)
    async with Rogue(broker.port, "demo", "dealer", cfg.key, "server0", cfg.peers["server0"]) as r:
        stale = BundleAnnounce("f" * 32, "m", old_epoch, 1, 0, b"s" * 32, "x")
        await r.send(*r.chunks("ctl:bundle", stale.encode(), CHUNK))
    await _until(lambda: f"was made for m@{old_epoch}, which this server neither serves" in _log(dep, "server0"))
