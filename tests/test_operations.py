"""Operating a deployment: `blindseg status` from the services' own (sealed) presence documents,
Prometheus metrics and probes scraped from running services, a clean stop (SIGTERM) and a SIGKILL seen,
pool expiry and pre-warming, the kit's relocatable broker folder and systemd units."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from blindseg.broker import Mosquitto, free_port
from blindseg.config import PartyConfig
from blindseg.demo import LocalDeployment
from blindseg.kit import init
from data_owner.client import Client
from model_owner.client import deploy

from .deployed import NEEDS_MOSQUITTO, SIZE, reference_mask

ROOT = Path(__file__).resolve().parents[1]


def _status(cfg: Path, listen: float = 3.0) -> tuple[int, dict]:
    out = subprocess.run([sys.executable, "-m", "blindseg", "status", "--config", str(cfg), "--json", "--listen",
                          str(listen)], capture_output=True, text=True, timeout=60, cwd=ROOT)
    return out.returncode, json.loads(out.stdout.strip().splitlines()[-1])


def _get(address: str, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://{address}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text format (a reader of the format, not of our code)."""
    from prometheus_client.parser import text_string_to_metric_families

    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    raise AssertionError(f"no sample {name}{labels} in the scrape")


@NEEDS_MOSQUITTO[0]
@NEEDS_MOSQUITTO[1]
async def test_status_metrics_probes_and_presence_of_a_running_deployment(tmp_path):
    """Through a private Mosquitto: status shows every service up with its epoch, the pool and the
    dealer's bundles; a failed request appears with its reason; /metrics counts the job, its rounds and
    the pool; /healthz and /readyz answer; a SIGTERM'd server says goodbye ("stopped") and a SIGKILL'd
    one is reported as not heard within seconds."""
    with Mosquitto(tmp_path) as broker:
        dep = LocalDeployment(tmp_path / "dep", broker.url, pool=2, metrics=True)
        try:
            await asyncio.to_thread(dep.start)
            info = await deploy(PartyConfig.load(dep.configs["model_owner"]), "ref-unet", "m", size=SIZE, timeout=120)
            x, want = reference_mask()
            async with Client(PartyConfig.load(dep.configs["data_owner"]), timeout=60) as c:
                mask, _ = await c.segment("m", x)
                assert (mask == want).mean() >= 0.99
                with pytest.raises(Exception, match="not deployed"):
                    await c.plan("nosuchmodel", timeout=10)
            for _ in range(40):  # the dealer refills after the job; wait for it to show
                rc, st = await asyncio.to_thread(_status, dep.configs["model_owner"])  # the full view
                pools = st["services"]["server0"].get("pool", {}).get(f"m@{info['epoch']}", {})
                if rc == 0 and pools.get("1", 0) >= 2:
                    break
                await asyncio.sleep(0.5)
            s = st["services"]
            assert rc == 0 and {p: s[p]["state"] for p in ("dealer", "server0", "server1")} == dict.fromkeys(
                ("dealer", "server0", "server1"), "up")
            assert s["server0"]["models"] == {"m": info["epoch"]} == s["server1"]["models"] == s["dealer"]["models"]
            assert s["server0"]["ready"] == "yes" and s["server0"]["store_bytes"] > 0
            assert s["dealer"]["bundles_made"] >= 3  # two at commit, one after the job
            assert any(f["what"] == "getplan" and "nosuchmodel" in f["error"] and f["reason"] == "usage"
                       for f in s["server0"]["recent_failures"])
            # a hospital sees the servers (it holds no dealer key) and its own failures
            rc, mine = await asyncio.to_thread(_status, dep.configs["data_owner"])
            assert rc == 0 and sorted(mine["services"]) == ["server0", "server1"]
            assert [f["from"] for f in mine["services"]["server0"]["recent_failures"]] == ["data_owner"]
            # the human view says the same
            text = subprocess.run([sys.executable, "-m", "blindseg", "status", "--config",
                                   str(dep.configs["model_owner"])], capture_output=True, text=True, timeout=60,
                                  cwd=ROOT).stdout
            assert "server0  up" in text and f"m@{info['epoch']}" in text and "nosuchmodel" in text
            # metrics and probes
            code, body = _get(dep.metrics["server0"], "/metrics")
            assert code == 200
            assert _metric(body, "blindseg_jobs_total", outcome="ok") == 1
            assert _metric(body, "blindseg_rounds_total") > 10
            assert _metric(body, "blindseg_online_bytes_total") > 0
            assert _metric(body, "blindseg_job_seconds_count", phase="online") == 1
            assert _metric(body, "blindseg_errors_total", reason="usage") >= 1
            assert _metric(body, "blindseg_pool_bundles", model=f"m@{info['epoch']}", batch="1") >= 1
            code, body = _get(dep.metrics["dealer"], "/metrics")
            assert code == 200 and _metric(body, "blindseg_bundles_generated_total") >= 3
            assert _get(dep.metrics["server1"], "/healthz") == (200, "ok\n")
            assert _get(dep.metrics["server1"], "/readyz") == (200, "ready\n")
            assert _get(dep.metrics["server1"], "/nope")[0] == 404
            # a clean stop says goodbye; a SIGKILL is reported by the broker's will
            dep.procs["server0"].send_signal(signal.SIGTERM)
            dep.procs["server0"].wait(20)
            t0 = time.monotonic()
            dep.procs["server1"].kill()
            dep.procs["server1"].wait(10)
            rc, st = await asyncio.to_thread(_status, dep.configs["model_owner"], 1.0)
            s = st["services"]
            assert rc == 1 and s["server0"]["state"] == "down" and s["server0"]["reason"] == "stopped"
            assert s["server1"]["state"] == "not heard" and "killed, hung or cut off" in s["server1"]["reason"]
            assert time.monotonic() - t0 < 15 and s["dealer"]["state"] == "up"
        finally:
            dep.stop()


async def test_unused_pools_expire_and_the_dealer_prewarms_the_sizes_in_use(tmp_path) -> None:
    """Bundles of a batch size no job used for ``pool_expiry`` are dropped at both servers (kept for the
    size in use); after a redeploy the dealer fills the new epoch's pool for the batch sizes in use,
    before any job asks."""
    from blindseg.channel import MemoryNetwork
    from blindseg.compiler import compile_model
    from blindseg.config import PARTIES
    from blindseg.models import build_model, test_image
    from blindseg.node import Node
    from dealer.service import DealerService
    from model_owner.client import deploy_compiled
    from server.service import ServerService, ServerSettings

    comp = compile_model(build_model("ref-unet", classes=2, seed=0), (1, 32, 32), "mask", "auto",
                         samples=test_image(4, 32, seed=1))
    mem = MemoryNetwork(PARTIES)
    nodes = {p: Node(p, mem.transports[p]) for p in PARTIES}
    servers = [ServerService(i, nodes[f"server{i}"], tmp_path / f"s{i}", ServerSettings(pool_expiry=100.0))
               for i in (0, 1)]
    dealer = DealerService(nodes["dealer"], tmp_path / "dealer", pool=2)
    tasks = [asyncio.create_task(s.serve()) for s in (*servers, dealer)]

    async def until(cond, what: str) -> None:
        for _ in range(1200):
            if cond():
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}")

    try:
        key = f"m@{(await deploy_compiled(nodes['model_owner'], comp, 'm'))['epoch']}"
        async with Client(nodes["data_owner"]) as c:
            await c.segment("m", test_image(2, 32, seed=2))  # batch 2: server0 asks the dealer for its pool
        await until(lambda: all(len(s.store.ready(key, 2)) >= 2 and len(s.store.ready(key, 1)) >= 2
                                for s in servers), "pools of batch 1 and 2")
        for s in servers:
            s._last_used[(key, 2)] = s._started + 149.0  # batch 2 ran 1 s before "now"; batch 1 never ran
            assert s.expire_unused(now=s._started + 150.0) >= 2
            assert s.store.ready(key, 1) == [] and len(s.store.ready(key, 2)) >= 2
        assert dealer.batches_in_use("m") == [2]
        key2 = f"m@{(await deploy_compiled(nodes['model_owner'], comp, 'm'))['epoch']}"  # a redeploy
        await until(lambda: all(len(s.store.ready(key2, 2)) >= 2 for s in servers), "the new epoch's batch-2 pool")
        assert all(s.store.ready(key, 2) == [] for s in servers)  # the old epoch's bundles are purged
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def test_the_broker_folder_is_relocatable_and_systemd_units_are_hardened(tmp_path):
    """The kit's broker config names no absolute path (``broker/`` is copied to the broker host as is and
    started with its run.sh); each service gets a systemd unit that restarts it, stops it with SIGTERM
    and can write only its own state dir."""
    port = free_port()
    init(tmp_path / "kit", "ops", broker_host="127.0.0.1", port=port, bind="127.0.0.1", install_dir="/srv/bs",
         python="/srv/bs/venv/bin/python")
    conf = (tmp_path / "kit" / "broker" / "mosquitto.conf").read_text()
    assert str(tmp_path) not in conf and "cafile ca.crt" in conf and "acl_file acl" in conf
    assert "cd \"$(dirname \"$0\")\"" in (tmp_path / "kit" / "broker" / "run.sh").read_text()
    for role in ("dealer", "server0", "server1"):
        unit = (tmp_path / "kit" / "systemd" / f"blindseg-{role}.service").read_text()
        assert f"ExecStart=/srv/bs/venv/bin/python -m {role} --config /srv/bs/configs/{role}.toml" in unit
        for line in ("Restart=on-failure", "KillSignal=SIGTERM", "NoNewPrivileges=yes", "ProtectSystem=strict",
                     f"ReadWritePaths=/srv/bs/state/{role}", "PrivateTmp=yes",
                     f"Environment=NUMBA_CACHE_DIR=/srv/bs/state/{role}/numba-cache"):  # compiled kernels kept
            assert line in unit.splitlines(), line
        cfg = PartyConfig.load(tmp_path / "kit" / "configs" / f"{role}.toml")
        assert cfg.metrics_address.startswith("127.0.0.1:")  # loopback by default
    if shutil.which("systemd-analyze"):
        out = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "kit" / "systemd" / "blindseg-server0.service")],
                             capture_output=True, text=True)
        assert "Unknown key" not in out.stderr and "Invalid" not in out.stderr, out.stderr
    if shutil.which("mosquitto") or Path("/usr/sbin/mosquitto").exists():
        moved = tmp_path / "elsewhere" / "broker"
        shutil.copytree(tmp_path / "kit" / "broker", moved)
        shutil.rmtree(tmp_path / "kit" / "broker")  # nothing may still point into the kit
        with Mosquitto(tmp_path, port=port, config=(moved / "mosquitto.conf").read_text(), cwd=moved):
            import ssl

            ctx = ssl.create_default_context(cafile=str(moved / "ca.crt"))
            with __import__("socket").create_connection(("127.0.0.1", port), timeout=5) as sock, \
                    ctx.wrap_socket(sock, server_hostname="127.0.0.1") as tls:
                assert tls.version() is not None  # the TLS listener runs from the copied folder


def test_config_metrics_address_and_reserved_names_are_checked(tmp_path):
    from blindseg.errors import UsageError

    paths = init(tmp_path / "kit", "ops", plain=True, broker_url="mqtt://127.0.0.1:1")
    text = paths["server0"].read_text()
    bad = paths["server0"].with_name("bad.toml")
    bad.write_text(text.replace('metrics_address = "127.0.0.1:9461"', 'metrics_address = "9461"'))
    with pytest.raises(UsageError, match="metrics_address' must be host:port"):
        PartyConfig.load(bad)
    with pytest.raises(UsageError, match="reserved"):
        init(tmp_path / "kit2", "ops", plain=True, broker_url="mqtt://127.0.0.1:1", tenants=("status",))
    assert np.isfinite(PartyConfig.load(paths["server0"]).pool_expiry)


@NEEDS_MOSQUITTO[0]
@NEEDS_MOSQUITTO[1]
async def test_a_killed_server_fails_the_job_in_seconds_and_a_restart_heals_within_30_s(tmp_path):
    """With the default 120 s round timeout: server1 SIGKILLed mid-job fails the data owner's job within
    seconds, naming server1 (its presence fell silent); SIGKILL + immediate restart mid-job ends in a
    correct mask within 30 s (the restart fails the old run's waits at once, the retry takes a new
    bundle)."""
    import os

    import torch

    from blindseg.errors import ConnectionLost, ProtocolError
    from blindseg.models import load_named_model, test_image

    size, batch = 64, 8
    model, _, _ = load_named_model("ref-unet", size)
    x = test_image(batch, size, seed=7).astype(np.float32)
    with torch.no_grad():
        want = torch.argmax(model(torch.from_numpy(x)), 1).numpy()
    with Mosquitto(tmp_path) as broker:
        dep = LocalDeployment(tmp_path / "dep", broker.url, pool=1)  # default timeouts
        try:
            await asyncio.to_thread(dep.start)
            await deploy(PartyConfig.load(dep.configs["model_owner"]), "ref-unet", "m", size=size, timeout=180)
            async with Client(PartyConfig.load(dep.configs["data_owner"])) as c:
                await c.segment("m", x[:1])  # warm: every handshake done, presence heard
                for restart in (False, True):
                    online = asyncio.Event()
                    job = asyncio.ensure_future(c.segment(
                        "m", x, lambda op, n, phase, ev=online: phase == "online" and op >= 2 and ev.set(),
                        retries=1 if restart else 0))
                    await asyncio.wait_for(online.wait(), 120)
                    os.kill(dep.procs["server1"].pid, signal.SIGKILL)
                    t0 = time.monotonic()
                    if restart:
                        await asyncio.to_thread(dep.restart, "server1")
                        mask, _ = await asyncio.wait_for(job, 60)
                        took = time.monotonic() - t0
                        print(f"SIGKILL + restart of server1 mid-job -> correct mask in {took:.1f} s")  # -s shows it
                        assert took < 30 and (mask == want).mean() >= 0.99, took
                    else:
                        with pytest.raises((ConnectionLost, ProtocolError), match="server1"):
                            await asyncio.wait_for(job, 60)
                        took = time.monotonic() - t0
                        print(f"SIGKILL of server1 mid-job -> the data owner's error in {took:.1f} s")
                        assert took < 15, took  # presence: 3 intervals of 2 s + 2 s, not the 120 s round timeout
                        await asyncio.to_thread(dep.restart, "server1")
        finally:
            dep.stop()


async def _services(tmp_path, pool: int, **settings):
    from blindseg.channel import MemoryNetwork
    from blindseg.compiler import compile_model
    from blindseg.config import PARTIES
    from blindseg.models import build_model, test_image
    from blindseg.node import Node
    from dealer.service import DealerService
    from model_owner.client import deploy_compiled
    from server.service import ServerService, ServerSettings

    comp = compile_model(build_model("ref-unet", classes=2, seed=0), (1, 32, 32), "mask", "auto",
                         samples=test_image(4, 32, seed=1))
    mem = MemoryNetwork(PARTIES)
    nodes = {p: Node(p, mem.transports[p]) for p in PARTIES}
    servers = [ServerService(i, nodes[f"server{i}"], tmp_path / f"s{i}", ServerSettings(**settings)) for i in (0, 1)]
    dealer = DealerService(nodes["dealer"], tmp_path / "dealer", pool=pool)
    dealer.full_backoff = 0.5
    tasks = [asyncio.create_task(s.serve()) for s in (*servers, dealer)]
    return nodes, servers, dealer, tasks, comp, deploy_compiled


async def _until(cond, what: str, timeout: float = 60.0) -> None:
    for _ in range(int(timeout / 0.05)):
        if cond():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


async def _consistent(store) -> None:
    """No partial file and no half-received row left behind: once the bundles in transfer have arrived
    (or failed and been removed), every bundle file belongs to a ready bundle."""
    def rows() -> dict:
        return dict(store._db.execute("SELECT id, state FROM bundles").fetchall())

    await _until(lambda: "receiving" not in rows().values(), "the bundles in transfer to settle", 30)
    files = {f.stem for f in (store.root / "bundles").iterdir()}
    assert files <= {b for b, st in rows().items() if st == "ready"}, files


async def test_a_store_over_its_budget_refuses_bundles_cleanly_and_refills_when_space_returns(tmp_path) -> None:
    """A store that may hold about two bundles: the dealer's further bundles are refused (StoreFull, the
    dealer told and backing off), nothing partial stays; a job consumes one and the pool refills by
    itself; the service kept serving throughout."""
    from blindseg.models import test_image

    nodes, servers, dealer, tasks, comp, deploy_compiled = await _services(tmp_path, pool=4)
    try:
        s1 = servers[1]
        s1.store.budget = 1  # nothing fits until we know a bundle's size
        key = f"m@{(await deploy_compiled(nodes['model_owner'], comp, 'm'))['epoch']}"
        await _until(lambda: any(f["reason"] == "usage" or "budget" in f["error"] for f in s1.health.failures),
                     "the first refusal")
        assert any("does not fit the store budget" in f["error"] for f in s1.health.failures)
        await _consistent(s1.store)
        s1.store.budget = 0
        await _until(lambda: len(s1.store.ready(key, 1)) >= 1, "a bundle once the budget is lifted")
        size = s1.store.size_hint(key, 1)
        s1.store.budget = int(2.5 * size) + s1.store.disk_bytes() - size  # room for about one more
        await _until(lambda: len(s1.store.ready(key, 1)) == 2 and dealer.bundles_made >= 4, "the store filled")
        await asyncio.sleep(1.0)  # the dealer keeps trying and is refused: still 2, still consistent
        assert len(s1.store.ready(key, 1)) == 2
        await _consistent(s1.store)
        async with Client(nodes["data_owner"]) as c:  # the service serves from what it holds
            mask, _ = await c.segment("m", test_image(1, 32, seed=3))
        await _until(lambda: len(s1.store.ready(key, 1)) == 2, "the refill after the job freed space")
        await _consistent(s1.store)
        assert s1.store.disk_bytes() <= s1.store.budget
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def test_a_full_disk_mid_bundle_leaves_nothing_partial_and_heals(tmp_path) -> None:
    """A real full disk (a small tmpfs under server1's bundle store, root only): a write that hits
    ENOSPC aborts the bundle, removes its file and row, tells the dealer; once space returns (a job
    consumed bundles) new bundles arrive without a restart."""
    import os

    from blindseg.models import test_image

    mnt = tmp_path / "s1" / "bundles"
    mnt.mkdir(parents=True)
    os.chmod(tmp_path / "s1", 0o700)
    probe = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m,mode=0700", "tmpfs", str(mnt)],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {probe.stderr.strip()}")
    try:
        from server.store import BundleStore

        BundleStore.MIN_FREE, saved = 0, BundleStore.MIN_FREE  # let the disk itself run out
        try:
            nodes, servers, dealer, tasks, comp, deploy_compiled = await _services(tmp_path, pool=6)
            s1 = servers[1]
            key = f"m@{(await deploy_compiled(nodes['model_owner'], comp, 'm'))['epoch']}"
            await _until(lambda: any("cannot" in f["error"] or "full" in f["error"] for f in s1.health.failures),
                         "the disk to fill")
            await asyncio.sleep(1.0)
            held = len(s1.store.ready(key, 1))
            assert 1 <= held < 6
            await _consistent(s1.store)
            async with Client(nodes["data_owner"]) as c:
                for k in range(2):
                    await c.segment("m", test_image(1, 32, seed=k))
            await _until(lambda: dealer.bundles_made >= held + 3, "bundles after space returned")
            await _consistent(s1.store)
        finally:
            BundleStore.MIN_FREE = saved
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_logs_are_utc_one_line_and_optionally_json(capsys) -> None:
    import logging

    from blindseg.node import _UtcFormatter

    rec = logging.LogRecord("blindseg.server", logging.WARNING, __file__, 1, "server0: %s", ("disk full",), None)
    rec.created = 0.0  # 1970-01-01T00:00:00 UTC whatever this host's zone
    assert _UtcFormatter(False).format(rec) == "1970-01-01T00:00:00+0000 blindseg.server WARNING server0: disk full"
    doc = json.loads(_UtcFormatter(True).format(rec))
    assert doc == {"time": "1970-01-01T00:00:00+0000", "level": "WARNING", "logger": "blindseg.server",
                   "message": "server0: disk full"}


def test_pool_target_follows_the_measured_throughput() -> None:
    from dealer.service import pool_target

    assert pool_target(2, 8, None, 1.0) == 2 and pool_target(2, 8, 3.0, None) == 2  # not measured yet
    assert pool_target(2, 8, 0.5, 1.0) == 2  # the dealer keeps up: the configured pool
    assert pool_target(2, 8, 3.0, 1.0) == 4  # three bundles in the making while jobs use them, plus one
    assert pool_target(2, 8, 30.0, 1.0) == 8 and pool_target(0, 0, 3.0, 1.0) == 0  # capped; no pool stays none


async def test_the_pool_grows_when_jobs_use_bundles_faster_than_they_are_made(tmp_path) -> None:
    """server0 reports used bundles every 20 ms (a stream of slices), far faster than the dealer makes
    one: the dealer's target for that deployment grows past the configured pool of 1 and that many
    bundles reach the servers' stores, so the next jobs find theirs ready."""
    from blindseg.messages import PoolRequest

    nodes, servers, dealer, tasks, comp, deploy_compiled = await _services(tmp_path, pool=1)
    try:
        epoch = (await deploy_compiled(nodes["model_owner"], comp, "m"))["epoch"]
        key = ("", f"m@{epoch}", 1)
        await _until(lambda: dealer.bundles_made >= 1, "the first bundle")
        assert dealer.target(key) == 1
        for _ in range(4):
            await nodes["server0"].tell("dealer", PoolRequest("m", epoch, 1, ready=0))
            await asyncio.sleep(0.02)
        await _until(lambda: dealer.target(key) > 1, "a larger pool target")
        want = dealer.target(key)
        assert want <= dealer.max_pool
        await _until(lambda: min(len(s.store.ready(key[1], 1)) for s in servers) >= want, f"{want} ready bundles")
        # the target follows the measured bundle time, which moves as these bundles are made: compare
        # the health report with the target of the same moment
        assert dealer.health.info("test")["pool_targets"][f"{key[1]} batch 1"] == dealer.target(key) > 1
        dealer.max_pool_bytes = 2 * dealer._bundle_bytes[key[1:]]  # room for two bundles at server1
        assert want > 2 and dealer.target(key) == 2
        dealer.max_pool = 1  # what `python -m dealer --max-pool 1` sets: a fixed pool, whatever the rate
        assert dealer.target(key) == 1
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def test_max_pool_below_the_pool_is_refused(tmp_path) -> None:
    from blindseg.errors import UsageError
    from blindseg.node import Node
    from dealer.service import DealerService

    node = Node.__new__(Node)  # never started: the settings are checked before the node is touched
    with pytest.raises(UsageError, match="max_pool"):
        DealerService(node, tmp_path / "d", pool=2, max_pool=1)
    with pytest.raises(UsageError, match="max_pool"):
        DealerService(node, tmp_path / "d", pool=-1)

