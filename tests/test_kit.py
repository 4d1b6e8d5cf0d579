"""`blindseg init`: keys, configs and a Mosquitto with TLS, passwords and per-party ACLs that really hold."""

from __future__ import annotations

import asyncio
import shutil
import ssl
from pathlib import Path

import aiomqtt
import pytest

from blindseg.broker import Mosquitto, free_port
from blindseg.config import PartyConfig
from blindseg.errors import UsageError
from blindseg.kit import init, mosquitto_password
from blindseg.transport import MqttTransport

needs_mosquitto = pytest.mark.skipif(
    shutil.which("mosquitto") is None and not Path("/usr/sbin/mosquitto").exists(),
    reason="the mosquitto binary is not installed on this machine")


def test_kit_writes_configs_that_load(tmp_path):
    paths = init(tmp_path / "kit", "hosp-a", broker_host="broker.example.org", port=8883)
    for party, p in paths.items():
        cfg = PartyConfig.load(p, party)
        assert cfg.broker.tls and cfg.broker.host == "broker.example.org" and cfg.broker.password
        assert (tmp_path / "kit" / "keys" / f"{party}.key").stat().st_mode & 0o077 == 0
    assert "server1" in PartyConfig.load(paths["server0"]).peers
    assert "data_owner" not in PartyConfig.load(paths["dealer"]).peers  # the dealer never talks to the hospital
    acl = (tmp_path / "kit" / "broker" / "acl").read_text()
    assert "topic read blindseg/hosp-a/server0/#" in acl
    with pytest.raises(UsageError, match="already holds a deployment"):
        init(tmp_path / "kit")


def test_bad_configs_name_the_problem(tmp_path):
    paths = init(tmp_path / "kit", plain=True)
    with pytest.raises(UsageError, match="does not exist"):
        PartyConfig.load(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("party = [")
    with pytest.raises(UsageError, match="not valid TOML"):
        PartyConfig.load(bad)
    text = paths["server0"].read_text()
    bad.write_text(text.replace('party = "server0"', 'party = "mallory"'))
    with pytest.raises(UsageError, match="party must be one of"):
        PartyConfig.load(bad)
    with pytest.raises(UsageError, match="not of 'dealer'"):
        PartyConfig.load(paths["server0"], "dealer")
    bad.write_text(text.replace("../keys/server0.key", "../keys/missing.key"))
    with pytest.raises(UsageError, match="key file .* does not exist"):
        PartyConfig.load(bad)


def test_password_hash_format():
    h = mosquitto_password("secret", salt=b"\0" * 12)
    assert h.startswith("$7$101$AAAAAAAAAAAAAAAA$") and len(h.split("$")[-1]) == 88


@needs_mosquitto
async def test_tls_passwords_and_acls_hold_on_a_real_mosquitto(tmp_path):
    port = free_port()
    paths = init(tmp_path / "kit", "acl", broker_host="127.0.0.1", port=port, bind="127.0.0.1")
    conf = (tmp_path / "kit" / "broker" / "mosquitto.conf").read_text()
    with Mosquitto(tmp_path, port=port, config=conf, cwd=tmp_path / "kit" / "broker"):
        cfg = {p: PartyConfig.load(paths[p]) for p in ("server0", "server1", "data_owner")}
        s0 = MqttTransport("acl", "server0", cfg["server0"].key, cfg["server0"].peers, cfg["server0"].broker)
        s1 = MqttTransport("acl", "server1", cfg["server1"].key, cfg["server1"].peers, cfg["server1"].broker)
        async with s0, s1:
            # end to end over TLS with passwords: a frame arrives and opens
            await s0.endpoint("server1").send("hello", b"over tls")
            assert await s1.endpoint("server0").recv("hello", 10) == b"over tls"
            # the hospital's login may subscribe to server1's topics, but the broker delivers nothing
            do = cfg["data_owner"].broker
            ctx = ssl.create_default_context(cafile=do.ca_file)
            async with aiomqtt.Client(do.host, do.port, username=do.username, password=do.password,
                                      tls_context=ctx, protocol=aiomqtt.ProtocolVersion.V5) as spy:
                await spy.subscribe("blindseg/acl/server1/#")
                await spy.subscribe("#")
                await s0.endpoint("server1").send("secret-round", b"x" * 100)
                assert await s1.endpoint("server0").recv("secret-round", 10) == b"x" * 100
                got = []

                async def listen() -> None:
                    async for m in spy.messages:
                        got.append(m)

                with pytest.raises(TimeoutError):
                    await asyncio.wait_for(listen(), 1.0)
                assert got == []
            # a wrong password is refused by the broker
            with pytest.raises(aiomqtt.MqttError):
                async with aiomqtt.Client(do.host, do.port, username="server0", password="guess",
                                          tls_context=ctx, protocol=aiomqtt.ProtocolVersion.V5):
                    pass


def test_kit_from_public_keys_holds_no_private_key(tmp_path):
    from blindseg.kit import keygen

    pubs = tmp_path / "pubs"
    hosts = {}
    for p in ("dealer", "server0", "server1", "model_owner", "hospital-a"):
        keygen(p, tmp_path / "hosts" / p)  # on each party's own host
        hosts[p] = tmp_path / "hosts" / p
        pubs.mkdir(exist_ok=True)
        (pubs / f"{p}.pub").write_text((hosts[p] / f"{p}.pub").read_text())
        assert (hosts[p] / f"{p}.key").stat().st_mode & 0o077 == 0
    with pytest.raises(UsageError, match="keep private keys where each party runs"):
        (pubs / "server1.key").write_bytes(b"x" * 32)
        init(tmp_path / "bad", tenants=("hospital-a",), public_keys=pubs)
    (pubs / "server1.key").unlink()
    with pytest.raises(UsageError, match="no public key for hospital-b"):
        init(tmp_path / "bad2", tenants=("hospital-a", "hospital-b"), public_keys=pubs)
    paths = init(tmp_path / "kit", tenants=("hospital-a",), public_keys=pubs)
    assert not list((tmp_path / "kit" / "keys").glob("*.key"))
    with pytest.raises(UsageError, match="key file .* does not exist"):
        PartyConfig.load(paths["server0"])
    for p, h in hosts.items():  # each party puts its own key in place
        (tmp_path / "kit" / "keys" / f"{p}.key").write_bytes((h / f"{p}.key").read_bytes())
    cfg = PartyConfig.load(paths["hospital-a"])
    assert cfg.name == "hospital-a" and cfg.party == "data_owner"
    assert cfg.key.public_key().public_bytes_raw().hex() == (pubs / "hospital-a.pub").read_text().strip()
    assert "hospital-a" in PartyConfig.load(paths["server0"]).tenants
    assert "hospital-a" not in PartyConfig.load(paths["dealer"]).peers
    with pytest.raises(UsageError, match="exists"):
        keygen("server0", hosts["server0"])  # a key is never overwritten
    bad = paths["server0"].with_name("typo.toml")
    bad.write_text("round_timout = 5\n" + paths["server0"].read_text())
    with pytest.raises(UsageError, match=r"unknown field.*'round_timout' \(did you mean 'round_timeout'\?\)"):
        PartyConfig.load(bad)


@needs_mosquitto
async def test_rotating_one_partys_key_without_rebuilding_the_kit(tmp_path):
    """server1 gets a new key: `keygen` on its host, `rotate-key` in the kit, the changed configs handed
    out, the affected services restarted. Jobs work with the new key; the old key is refused."""
    import numpy as np
    import torch

    from blindseg.bench import test_image
    from blindseg.cli import main as cli
    from blindseg.demo import LocalDeployment
    from blindseg.kit import keygen
    from blindseg.models import load_named_model
    from data_owner.client import Client
    from model_owner.client import deploy

    model, _, _ = load_named_model("ref-unet", 32)
    x = test_image(1, 32, seed=5).astype(np.float32)
    with torch.no_grad():
        want = torch.argmax(model(torch.from_numpy(x)), 1).numpy()
    with Mosquitto(tmp_path) as broker:
        dep = LocalDeployment(tmp_path / "dep", broker.url, pool=1)
        try:
            await asyncio.to_thread(dep.start)
            await deploy(PartyConfig.load(dep.configs["model_owner"]), "ref-unet", "m", size=32, timeout=60)
            old = PartyConfig.load(dep.configs["server1"])
            keygen("server1", tmp_path / "server1-host")
            assert cli(["rotate-key", str(dep.root), "--party", "server1",
                        "--public-key", str(tmp_path / "server1-host" / "server1.pub")]) == 0
            (dep.root / "keys" / "server1.key").write_bytes((tmp_path / "server1-host" / "server1.key").read_bytes())
            for role in ("server1", "server0", "dealer"):  # the new key, and the peers that must know it
                await asyncio.to_thread(dep.restart, role)
            await deploy(PartyConfig.load(dep.configs["model_owner"]), "ref-unet", "m", size=32, timeout=60)
            async with Client(PartyConfig.load(dep.configs["data_owner"]), timeout=60) as c:
                mask, _ = await c.segment("m", x)
            assert (mask == want).mean() >= 0.99
            # whoever still has the old key cannot talk as server1
            t = MqttTransport("demo", "server1", old.key, {"server0": old.peers["server0"]}, old.broker)
            async with t:
                await t.endpoints["server0"].send_hello()
                await asyncio.sleep(1.0)
            assert "handshake failed authentication" in (dep.root / "logs" / "server0.log").read_text()
        finally:
            dep.stop()


@needs_mosquitto
async def test_a_wrong_password_or_ca_is_named_at_once(tmp_path):
    """Not "cannot reach the broker within 10 s": the broker's refusal or the certificate failure, at
    start, without retrying what cannot heal."""
    import dataclasses
    import time

    port = free_port()
    paths = init(tmp_path / "kit", "acl", broker_host="127.0.0.1", port=port, bind="127.0.0.1")
    other = init(tmp_path / "other", "acl", broker_host="127.0.0.1", port=port, bind="127.0.0.1")
    conf = (tmp_path / "kit" / "broker" / "mosquitto.conf").read_text()
    with Mosquitto(tmp_path, port=port, config=conf, cwd=tmp_path / "kit" / "broker"):
        cfg = PartyConfig.load(paths["data_owner"])
        bad_pw = dataclasses.replace(cfg.broker, password="guess")
        bad_ca = dataclasses.replace(cfg.broker, ca_file=PartyConfig.load(other["data_owner"]).broker.ca_file)
        for broker, what in ((bad_pw, "refused the login of user 'data_owner'"), (bad_ca, "does not verify")):
            t0 = time.monotonic()
            with pytest.raises(UsageError, match=what):
                await MqttTransport("acl", "data_owner", cfg.key, cfg.peers, broker).start()
            assert time.monotonic() - t0 < 5
        async with MqttTransport("acl", "data_owner", cfg.key, cfg.peers, cfg.broker):
            pass  # the right ones still work
