"""Several server pairs: a kit for N pairs, jobs spread by the broker's shared subscription, every mask
right, each pair with its own weight split, masks and pool; offers that do not authenticate are dropped."""

from __future__ import annotations

import asyncio
import time

import msgpack
import numpy as np
import pytest
import torch

from blindseg.broker import Mosquitto, free_port
from blindseg.config import PartyConfig
from blindseg.demo import LocalDeployment
from blindseg.errors import UsageError
from blindseg.kit import init
from blindseg.messages import Offer, expect
from blindseg.transport import MqttTransport, offer_topic
from data_owner.client import Client
from model_owner.client import deploy

from .deployed import NEEDS_MOSQUITTO, reference_mask

PAIR_SERVERS = ("server0", "server1", "server0-2", "server1-2")


def test_a_kit_for_two_pairs_keeps_each_pair_apart(tmp_path):
    paths = init(tmp_path / "kit", "multi", broker_host="127.0.0.1", port=8883, tenants=("hosp-a", "hosp-b"),
                 pairs=2)
    assert set(PAIR_SERVERS) <= set(paths)
    s02 = PartyConfig.load(paths["server0-2"], "server0")
    assert s02.name == "server0-2" and s02.party == "server0"
    assert sorted(s02.peers) == ["dealer", "hosp-a", "hosp-b", "model_owner", "server1-2"]  # not pair 1's servers
    assert s02.tenants == ["hosp-a", "hosp-b"] and s02.state_dir.name == "server0-2"
    for who in ("dealer", "model_owner", "hosp-a"):
        assert set(PAIR_SERVERS) <= set(PartyConfig.load(paths[who]).peers)
        assert PartyConfig.load(paths[who]).pairs == ["", "2"]
    acl = (tmp_path / "kit" / "broker" / "acl").read_text()
    assert "user server0-2\ntopic read blindseg/multi/server0-2/#" in acl
    for who, rule in (("server0-2", "topic read blindseg/multi/offers/+"),
                      ("hosp-a", "topic write blindseg/multi/offers/hosp-a")):
        assert rule in acl.split(f"user {who}\n")[1].split("\n\n")[0]
    assert "offers" not in acl.split("user server1-2\n")[1].split("\n\n")[0]  # only server0s take offers
    units = {p.name for p in (tmp_path / "kit" / "systemd").glob("blindseg-server*.service")}
    assert units == {f"blindseg-{s}.service" for s in PAIR_SERVERS}
    unit = (tmp_path / "kit" / "systemd" / "blindseg-server1-2.service").read_text()
    assert "-m server1 --config /opt/blindseg/configs/server1-2.toml" in unit and "state/server1-2" in unit
    ports = [PartyConfig.load(paths[s]).metrics_address for s in PAIR_SERVERS]
    assert len(set(ports)) == 4
    for bad in ("server0-2", "offers"):
        with pytest.raises(UsageError, match="role's name|reserved"):
            init(tmp_path / bad, tenants=(bad,), pairs=2)
    text = paths["hosp-a"].read_text()
    (tmp_path / "kit" / "configs" / "bad.toml").write_text(text.replace('tenant = "hosp-a"', 'tenant = "hosp-a"\npair = "2"'))
    with pytest.raises(UsageError, match="only a server belongs to a server pair"):
        PartyConfig.load(tmp_path / "kit" / "configs" / "bad.toml")


def test_an_offer_opens_only_at_its_server0_and_only_from_its_tenant(tmp_path):
    paths = init(tmp_path / "kit", "multi", plain=True, tenants=("hosp-a", "hosp-b"), pairs=2)
    cfg = {p: PartyConfig.load(paths[p]) for p in ("hosp-a", "hosp-b", "server0-2", "server1-2")}

    def transport(p: str) -> MqttTransport:
        c = cfg[p]
        return MqttTransport("multi", c.name, c.key, c.peers, c.broker)

    a, b, s02, s12 = (transport(p) for p in ("hosp-a", "hosp-b", "server0-2", "server1-2"))
    offer = Offer("j1", "m", "e1", 1, time.time()).encode()
    topic = offer_topic("multi", "hosp-a")
    sealed = msgpack.packb({"server0-2": a._offer_seal("hosp-a", "server0-2").seal(topic, offer)})
    s02._on_offer(topic, sealed)
    assert s02.control.get_nowait() == ("hosp-a", "ctl:offer", offer)
    forged = msgpack.packb({"server0-2": b._offer_seal("hosp-b", "server0-2").seal(topic, offer)})
    s02._on_offer(topic, forged)  # hosp-b's offer replayed on hosp-a's topic (a broker that splices)
    s02._on_offer(offer_topic("multi", "hosp-b"), sealed)  # hosp-a's offer moved to hosp-b's topic
    s12._on_offer(topic, sealed)  # a copy for another server is no copy for this one
    assert s02.control.empty() and s12.control.empty()
    assert len(s02.rejected) == 2 and "does not authenticate" in s02.rejected[0]
    assert "no copy for this server" in s12.rejected[0]


async def test_two_pairs_in_memory_spread_jobs_with_their_own_shares_and_masks(tmp_path):
    from blindseg.channel import MemoryNetwork
    from blindseg.compiler import compile_model
    from blindseg.models import build_model, test_image
    from blindseg.node import Node
    from dealer.service import DealerService
    from model_owner.client import deploy_compiled
    from server.service import ServerService

    model = build_model("ref-unet", classes=2, seed=0)
    comp = compile_model(model, (1, 32, 32), "mask", "auto", samples=test_image(4, 32, seed=1))
    parties = ("dealer", "model_owner", "data_owner", *PAIR_SERVERS)
    mem = MemoryNetwork(parties)
    nodes = {p: Node(p, mem.transports[p]) for p in parties}
    servers = {s: ServerService(int(s[6]), nodes[s], tmp_path / s) for s in PAIR_SERVERS}
    dealer = DealerService(nodes["dealer"], tmp_path / "dealer", pool=1)
    assert dealer.pairs == ["", "2"]
    tasks = [asyncio.create_task(s.serve()) for s in (*servers.values(), dealer)]
    try:
        dep = await deploy_compiled(nodes["model_owner"], comp, "m")
        assert all(s.epochs["m"] == dep["epoch"] for s in servers.values())
        # each pair has its own split of the weights and its own masks: no cross-pair pair of shares opens
        first = comp.plan.weighted_ops()[0]
        opened = {s: servers[s].models["m"].model[first].e for s in ("server0", "server0-2")}
        assert not np.array_equal(opened["server0"], opened["server0-2"])  # E = W - B, B drawn per pair
        seeds = {p: dealer.dealers[p].models()[f"m@{dep['epoch']}"][1:] for p in ("", "2")}
        assert seeds[""] != seeds["2"]
        x = test_image(6, 32, seed=2)
        with torch.no_grad():
            want = model(torch.from_numpy(x.astype(np.float32))).numpy().argmax(1)
        async with Client(nodes["data_owner"]) as c:
            results = await asyncio.gather(*(c.segment("m", x[i:i + 1]) for i in range(6)))
        for i, (mask, _) in enumerate(results):
            assert (mask == want[i:i + 1]).mean() >= 0.99
        pairs = [cost["pair"] for _, cost in results]
        assert set(pairs) == {"1", "2"} and c.taken == {"1": pairs.count("1"), "2": pairs.count("2")}
        key = f"m@{dep['epoch']}"
        for _ in range(400):  # each pair's pool is refilled by its own server0's requests, to both its servers
            if all(servers[s].store.ready(key, 1) for s in PAIR_SERVERS):
                break
            await asyncio.sleep(0.05)
        assert all(servers[s].store.ready(key, 1) for s in PAIR_SERVERS), "a pair's pool was not refilled"
        for p in ("", "2"):  # a bundle is dealt to both servers of one pair, never to another pair
            s0, s1 = (set(servers[f"server{i}" + (f"-{p}" if p else "")].store.ready(key, 1)) for i in (0, 1))
            assert s0 & s1
        assert not set(servers["server0"].store.ready(key, 1)) & set(servers["server0-2"].store.ready(key, 1))
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@NEEDS_MOSQUITTO[0]
@NEEDS_MOSQUITTO[1]
async def test_the_kits_mosquitto_hands_each_offer_to_exactly_one_server0(tmp_path):
    """Through the kit's TLS listener and ACLs: every offer reaches one pair's server0, never both; a
    server1 and another tenant that subscribe to the offers (not knowing the server0s' group) receive
    none and swallow none (Mosquitto would count them in the rotation and then deny the delivery)."""
    port = free_port()
    paths = init(tmp_path / "kit", "multi", broker_host="127.0.0.1", port=port, bind="127.0.0.1",
                 tenants=("hosp-a", "hosp-b"), pairs=2)
    cfg = {p: PartyConfig.load(paths[p]) for p in ("hosp-a", "hosp-b", "server0", "server0-2", "server1")}
    conf = (tmp_path / "kit" / "broker" / "mosquitto.conf").read_text()

    def transport(p: str, group: str) -> MqttTransport:
        c = cfg[p]
        return MqttTransport("multi", c.name, c.key, c.peers, c.broker, offer_group=group)

    secret = cfg["server0"].offer_group
    assert secret == cfg["server0-2"].offer_group and secret not in paths["hosp-a"].read_text()
    with Mosquitto(tmp_path, port=port, config=conf, cwd=tmp_path / "kit" / "broker"):
        # hosp-b and server1 try to join the offers, with the default group name and a guessed one
        a, b = transport("hosp-a", ""), transport("hosp-b", "multi-pairs")
        s0, s02, s1 = transport("server0", secret), transport("server0-2", secret), transport("server1", "pairs")
        async with a, b, s0, s02, s1:
            await asyncio.sleep(0.3)
            for k in range(10):
                await a.offer(Offer(f"job{k}", "m", "e1", 1, time.time()).encode(), ["server0", "server0-2"])
            got: dict[str, list[str]] = {"server0": [], "server0-2": []}
            for _ in range(100):
                for name, t in (("server0", s0), ("server0-2", s02)):
                    while not t.control.empty():
                        sender, label, frame = t.control.get_nowait()
                        assert (sender, label) == ("hosp-a", "ctl:offer")
                        got[name].append(expect(frame, Offer).job)
                if sum(map(len, got.values())) >= 10:
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.3)  # nothing more arrives
            assert sum(map(len, got.values())) == 10 and s0.control.empty() and s02.control.empty()
            assert got["server0"] and got["server0-2"]  # spread, and no offer twice
            assert len(set(got["server0"]) | set(got["server0-2"])) == 10
            assert s1.control.empty() and b.control.empty()  # the ACL gives them nothing


@NEEDS_MOSQUITTO[0]
@NEEDS_MOSQUITTO[1]
async def test_two_pairs_on_a_real_mosquitto_spread_concurrent_tenants_jobs(tmp_path):
    """The kit's own TLS Mosquitto with its ACLs, four server processes, two tenants sending jobs at once:
    the broker's shared subscription spreads them over both pairs and every mask is right."""
    port = free_port()
    dep = LocalDeployment(tmp_path / "dep", None, pool=1, tls_port=port, tenants=("hosp-a", "hosp-b"), pairs=2,
                          settings={"round_timeout": 20, "bundle_wait": 60, "job_timeout": 120})
    x, want = reference_mask()
    with Mosquitto(tmp_path, port=port, config=dep.broker_config(), cwd=dep.root / "broker"):
        try:
            await asyncio.to_thread(dep.start)
            await deploy(PartyConfig.load(dep.configs["model_owner"]), "ref-unet", "m", size=32, timeout=120)

            async def tenant(name: str) -> list[str]:
                async with Client(PartyConfig.load(dep.configs[name]), timeout=120) as c:
                    got = await asyncio.gather(*(c.segment("m", x) for _ in range(3)))
                for mask, _ in got:
                    assert (mask == want).mean() >= 0.99
                return [cost["pair"] for _, cost in got]

            pairs = sum(await asyncio.gather(tenant("hosp-a"), tenant("hosp-b")), [])
            assert sorted(set(pairs)) == ["1", "2"], pairs
            for s in ("server0", "server0-2"):  # the job really ran at that pair (its own log says so)
                log = (dep.root / "logs" / f"{s}.log").read_text()
                assert log.count(" for ") and " rounds" in log
        finally:
            dep.stop()
