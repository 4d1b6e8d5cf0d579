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
    with Mosquitto(tmp_path, port=port, config=conf):
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
