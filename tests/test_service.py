"""The whole service: dealer and both servers as OS processes, owners as clients, through real brokers."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import aiomqtt
import numpy as np
import pytest
import torch

from blindseg.broker import EmbeddedBroker, Mosquitto
from blindseg.compiler import compile_model
from blindseg.config import PartyConfig
from blindseg.crypto import HELLO, MAGIC, OVERHEAD, PRESENCE, session_id, session_key
from blindseg.demo import LocalDeployment
from blindseg.engine import run_compiled
from blindseg.models import load_named_model
from blindseg.transport import CHUNK_HEAD, BrokerAddress
from data_owner.client import Client
from model_owner.client import deploy

pytestmark = pytest.mark.slow


def _image() -> np.ndarray:
    rng = np.random.default_rng(7)
    x = rng.normal(size=(1, 1, 64, 64)).astype(np.float32)
    x[:, :, 20:40, 16:48] += 2.0  # some structure
    return x


async def _eavesdrop(addr: BrokerAddress, sink: list[tuple[str, bytes]], ready: asyncio.Event) -> None:
    async with aiomqtt.Client(addr.host, addr.port, protocol=aiomqtt.ProtocolVersion.V5 if addr.mqtt5
                              else aiomqtt.ProtocolVersion.V311) as c:
        await c.subscribe("#")
        ready.set()
        async for m in c.messages:
            sink.append((str(m.topic), bytes(m.payload)))  # type: ignore[arg-type]


async def _full_job(tmp: Path, url: str) -> None:
    dep = LocalDeployment(tmp / "dep", url, pool=1)
    captured: list[tuple[str, bytes]] = []
    ready = asyncio.Event()
    spy = asyncio.get_running_loop().create_task(_eavesdrop(BrokerAddress.parse(url), captured, ready))
    try:
        await asyncio.to_thread(dep.start)
        await asyncio.wait_for(ready.wait(), 10)
        await deploy(PartyConfig.load(dep.configs["model_owner"]), "ref-unet", "m1", timeout=120)
        dep.check_alive()
        x = _image()
        async with Client(PartyConfig.load(dep.configs["data_owner"]), timeout=120) as client:
            mask, cost = await client.segment("m1", x)
        await asyncio.sleep(0.3)
    finally:
        spy.cancel()
        dep.stop()

    # the same model, in-process: same mask, same payload accounting
    model, samples, _ = load_named_model("ref-unet")
    comp = compile_model(model, (1, 64, 64), "mask", "auto", samples=samples)
    local = await run_compiled(comp, x)
    with torch.no_grad():
        plain = torch.argmax(model(torch.from_numpy(x)), 1).numpy()
    assert (mask == local.mask).mean() >= 0.999 and (mask == plain).mean() >= 0.999
    assert cost["rounds"] == local.stats["rounds"]
    # the same frames in the same order through the same service code: each sealed frame is the in-process
    # frame plus, per chunk, the AEAD overhead and the chunk header (label, frame id, index, count, length)
    for i in (0, 1):
        local_log, mqtt_log = local.stats["round_log"][i], cost["round_log"][i]
        assert [lab.split(":")[1:] for lab, _ in local_log] == [lab.split(":")[1:] for lab, _ in mqtt_log]
        assert not [n for _, n in local_log if n > (1 << 20)]  # 64x64 rounds fit one chunk
        for (lab, n), (mlab, m) in zip(local_log, mqtt_log, strict=True):
            assert len(lab) == len(mlab) and m == n + OVERHEAD + CHUNK_HEAD + len(mlab)
        rounds = [(lab, n) for lab, n in mqtt_log if len(lab.split(":")) == 3 and lab.split(":")[1].isdigit()]
        assert cost["server_bytes"][i] == sum(n for _, n in rounds) and len(rounds) == cost["rounds"]

    # the broker saw only hellos and sealed frames: no known plaintext inside, uniform bytes
    assert captured and all(p[:4] in (MAGIC, HELLO, PRESENCE) for _, p in captured)
    assert any(p[:4] == PRESENCE for _, p in captured)  # presence documents too are sealed
    assert not any(b'"party"' in p or b"server0" in p[4:] for _, p in captured)  # nothing readable
    secrets = [np.ascontiguousarray(x).tobytes()[:64], mask.astype(np.int64).tobytes()[:64]]
    blob = b"".join(p for _, p in captured)
    assert not any(s in blob for s in secrets)
    body = np.frombuffer(b"".join(p[28:] for _, p in captured if len(p) > 1000), dtype=np.uint8)
    counts = np.bincount(body, minlength=256)
    chi2 = float(((counts - body.size / 256) ** 2 / (body.size / 256)).sum())
    assert chi2 < 400  # 255 dof: p ~ 1e-8

    # forward secrecy: an attacker who later steals BOTH servers' static keys and recorded everything has
    # the ephemeral public keys (hellos) and every DH value except ee = DH(e0, e1); the best key it can
    # derive does not open a recorded frame (test_hostile checks that the same formula with ee opens one)
    s0, s1 = PartyConfig.load(dep.configs["server0"]), PartyConfig.load(dep.configs["server1"])
    hello = {t: p for t, p in captured if p[:4] == HELLO}
    e1 = hello["blindseg/demo/server0/server1"][4:36]  # server1's ephemeral (its hello to server0)
    e0 = hello["blindseg/demo/server1/server0"][4:36]
    topic, frame = next((t, p) for t, p in captured
                        if t == "blindseg/demo/server0/server1" and p[:4] == MAGIC and p[4:20] == session_id(e1, e0))
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    es = s1.key.exchange(X25519PublicKey.from_public_bytes(e0))
    se = s0.key.exchange(X25519PublicKey.from_public_bytes(e1))
    ss = s0.key.exchange(s1.key.public_key())
    for guess in (ss, bytes(32), es, se):
        k = session_key(guess, es, se, e1, e0, "demo", "server1", "server0")
        with pytest.raises(InvalidTag):
            AESGCM(k).decrypt(b"\0\0\0\0" + frame[20:28], frame[28:], frame[:28] + topic.encode())


@pytest.mark.skipif(shutil.which("mosquitto") is None and not Path("/usr/sbin/mosquitto").exists(),
                    reason="the mosquitto binary is not installed on this machine")
async def test_full_service_through_mosquitto(tmp_path):
    with Mosquitto(tmp_path) as broker:
        await _full_job(tmp_path, broker.url)


async def test_full_service_through_embedded_amqtt(tmp_path):
    broker = await EmbeddedBroker().start()
    try:
        await _full_job(tmp_path, broker.url)
    finally:
        await broker.stop()


async def test_the_demo_runs_end_to_end(tmp_path):
    """The README's main job (`blindseg demo`, embedded broker) as a user runs it: real MRI slice, every
    role a process; the secure mask agrees with plaintext and keeps its dice against the label."""
    from blindseg.demo import run_demo

    r = await run_demo(out_dir=tmp_path)
    assert r["pixel_agreement"] >= 0.999
    for name in ("grey matter", "white matter"):
        assert r["dice"][name] >= r["dice_plaintext"][name] - 0.01 and r["dice"][name] > 0.85
    assert (tmp_path / "overlay.png").exists() and (tmp_path / "report.json").exists()
