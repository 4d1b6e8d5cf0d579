"""The layout rules, checked on the source: the core imports no role, op-kind dispatch lives in the
registry, a server process loads no owner code, and a dealer/server disagreement fails loudly."""

from __future__ import annotations

import ast
import asyncio
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
ROLES = ("dealer", "server", "server0", "server1", "data_owner", "model_owner")
TOOLS = {"engine.py", "bench.py", "demo.py", "cli.py", "__main__.py"}  # drive whole deployments


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module.split(".")[0])
    return out


def test_core_imports_no_role() -> None:
    bad = {str(p.relative_to(ROOT)): sorted(_imports(p) & set(ROLES)) for p in (ROOT / "blindseg").rglob("*.py")
           if p.name not in TOOLS}
    assert not {k: v for k, v in bad.items() if v}


def test_kind_dispatch_only_in_few_files() -> None:
    """Comparisons of a ``.kind`` with an op kind's name (dtype and material kinds are other things)."""
    from blindseg.layers import REGISTRY

    def names(n: ast.AST) -> set[str]:
        return {c.value for c in ast.walk(n) if isinstance(c, ast.Constant) and isinstance(c.value, str)}

    files = set()
    for p in list((ROOT / "blindseg").rglob("*.py")) + [q for r in ROLES for q in (ROOT / r).glob("*.py")]:
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Compare) and any(isinstance(s, ast.Attribute) and s.attr == "kind"
                                                     for s in [node.left, *node.comparators]) \
                    and names(node) & set(REGISTRY):
                files.add(str(p.relative_to(ROOT)))
    assert len(files) <= 3, files


def test_version_is_the_package_version() -> None:
    import tomllib

    import blindseg

    meta = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert blindseg.__version__ == meta["project"]["version"]


def test_server_process_loads_no_owner_code() -> None:
    code = ("import sys, server.service, server0; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('data_owner', 'model_owner', 'dealer')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("source", ["local", "remote"])
def test_material_sources_give_the_same_correct_job(tmp_path: Path, source: str) -> None:
    """One suite for both dealer sources: bundles from each run a plan exactly as the reference does,
    and an announcement for another layout (other circuit arities) is refused by name."""
    from blindseg.channel import MemoryLink
    from blindseg.errors import ProtocolError
    from blindseg.layers import ModelShare
    from blindseg.plan import Op, Plan, reference
    from blindseg.ring import encode, signed
    from blindseg.sources import RemoteSource
    from dealer.core import Dealer
    from dealer.provider import LocalSource
    from dealer.service import stream_bundle
    from server.bundles import receive_bundle
    from server.core import ServerCore, drive
    from server.store import BundleStore

    from .conftest import split

    rng = np.random.default_rng(7)
    ops = (Op("input", (), (2, 6, 6)),
           Op("conv", (0,), (3, 6, 6), {"kernel": [3, 3], "padding": 1, "fw": 6}),
           Op("rescale", (1,), (3, 6, 6), {"shift": 6, "act": "relu"}),
           Op("maxpool", (2,), (3, 3, 3), {"kernel": 2, "stride": 2}),
           Op("output", (3,), (3, 3, 3)))
    plan = Plan(ops, 8, "logits")
    dealer = Dealer()
    s0, s1 = dealer.deploy("m@e1", plan)
    from blindseg.layout import model_mask_shares

    w = rng.integers(-64, 64, size=(3, 2, 3, 3)).astype(np.uint32)
    b = {1: model_mask_shares(plan, s0)[1] + model_mask_shares(plan, s1)[1]}
    cores = [ServerCore(i, plan) for i in (0, 1)]
    e = w - b[1]
    cores[0].model[1] = ModelShare(e, model_mask_shares(plan, s0)[1], None)
    cores[1].model[1] = ModelShare(e, model_mask_shares(plan, s1)[1] + e, None)
    stores = [BundleStore(tmp_path / f"s{i}") for i in (0, 1)]

    async def go() -> np.ndarray:
        if source == "local":
            srcs = LocalSource.pair(dealer, "m@e1", 1)
        else:
            links = [MemoryLink(), MemoryLink()]
            task = asyncio.ensure_future(stream_bundle(dealer, "m@e1", 1, links[0].a, links[1].a))
            from blindseg.messages import BundleAnnounce, expect

            anns = [expect(await links[i].b.recv("ctl:bundle"), BundleAnnounce) for i in (0, 1)]
            srcs = tuple(RemoteSource(anns[i], links[i].b) for i in (0, 1))
        ids = await asyncio.gather(*(receive_bundle(cores[i], stores[i], srcs[i]) for i in (0, 1)))
        if source == "remote":
            await task
        x = rng.normal(size=(1, 2, 6, 6))
        xq = encode(x, 8, "x")
        x0, x1 = split(signed(xq), rng)
        link = MemoryLink()
        preps = [cores[i].begin(stores[i], ids[i][0], "j") for i in (0, 1)]
        outs = await asyncio.gather(drive(cores[0].run(preps[0], x0), link.a, "j"),
                                    drive(cores[1].run(preps[1], x1), link.b, "j"))
        got = signed(outs[0] + outs[1])
        want = reference(plan, {1: (w, None)}, xq)[-1]
        assert np.all((got - want >= 0) & (got - want <= 1))
        # a dealer generating for another circuit: the server refuses the bundle before storing anything
        other = Dealer()
        other.deploy("m@e1", Plan(ops, 8, "logits", arities=(2, 2, 2)))
        bad = LocalSource.pair(other, "m@e1", 1)[0]
        with pytest.raises(ProtocolError, match="another layout"):
            await receive_bundle(cores[0], stores[0], bad)
        return got

    asyncio.run(go())
    for st in stores:
        st.close()


async def test_bundles_burnt_at_server0_do_not_stay_ready_at_server1(tmp_path) -> None:
    """A bundle server0 burns (its ack timed out) is never proposed again; server1 drops its copy at the
    next agreement instead of keeping it "ready" forever (state grew to 2.3 GB before)."""
    import asyncio

    from blindseg.channel import MemoryNetwork
    from blindseg.compiler import compile_model
    from blindseg.config import PARTIES
    from blindseg.models import build_model, test_image
    from blindseg.node import Node
    from data_owner.client import Client
    from dealer.service import DealerService
    from model_owner.client import deploy_compiled
    from server.service import ServerService

    comp = compile_model(build_model("ref-unet", classes=2, seed=0), (1, 32, 32), "mask", "auto",
                         samples=test_image(4, 32, seed=1))
    mem = MemoryNetwork(PARTIES)
    nodes = {p: Node(p, mem.transports[p]) for p in PARTIES}
    servers = [ServerService(i, nodes[f"server{i}"], tmp_path / f"s{i}") for i in (0, 1)]
    dealer = DealerService(nodes["dealer"], tmp_path / "dealer", pool=2)
    tasks = [asyncio.create_task(s.serve()) for s in (*servers, dealer)]
    try:
        dep = await deploy_compiled(nodes["model_owner"], comp, "m")
        key = f"m@{dep['epoch']}"
        for _ in range(600):
            if all(len(s.store.ready(key, 1)) >= 2 for s in servers):
                break
            await asyncio.sleep(0.05)
        victim = servers[0].store.ready(key, 1)[0]
        servers[0].pool._burn(victim, "lostack")  # as after an ack that never came
        assert servers[1].store.state(victim) == "ready"
        async with Client(nodes["data_owner"]) as c:
            await c.segment("m", test_image(1, 32, seed=2))
        assert servers[1].store.state(victim) == "consumed"
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
