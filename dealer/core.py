"""Dealer logic: model masks and bundle generation, streamed op by op (the pool is in ``service.py``)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from blindseg import circuit as cc
from blindseg.bits import unslice
from blindseg.channel import Endpoint
from blindseg.errors import UsageError
from blindseg.plan import Plan
from blindseg.preprocessing import DEFAULT_ARITIES, Layout, MatSpec, draw
from blindseg.prg import Prg, new_seed
from blindseg.protocols import apply_linear
from blindseg.server import bundle_header
from blindseg.wire import encode_frame


@dataclass
class Bundle:
    """One server's share of a job's preprocessing: its seed (server 1's corrections stream separately)."""

    bundle_id: str
    model_id: str
    batch: int
    party: int
    seed: bytes


def model_mask_shares(plan: Plan, seed: bytes) -> dict[int, np.ndarray]:
    """A server's share B_i of the model-share masks, expanded from its mask seed."""
    out = {}
    for i in plan.linear_ops():
        op = plan.ops[i]
        cin = plan.ops[op.inputs[0]].shape[0]
        kh, kw = op.p("kernel")
        shape = (op.shape[0], cin, kh, kw) if op.kind == "conv" else (cin, op.shape[0], kh, kw)
        out[i] = Prg(seed, stream=i).uint32(shape)
    return out


def _derive(ms: MatSpec, rand: dict[str, np.ndarray], plan: Plan, op_index: int, masks: dict[int, np.ndarray],
            circ: cc.Circuit) -> dict[str, np.ndarray]:
    """Plain values of the derived items from the plain values of the random ones."""
    if ms.kind == "beaver":
        return {"C": apply_linear(plan.ops[op_index], rand["A"], masks[op_index])}
    s = ms.shift
    if ms.kind == "trunc":
        r = rand["r"]
    else:
        r = unslice(rand["rbits"], ms.n)
    u = np.uint32(0) - ((r & np.uint32(0x7FFFFFFF)) >> np.uint32(s))
    msb = r >> np.uint32(31)  # v's items carry msb(r) mod 2^(s+1); the server shifts by 31 - s
    if ms.kind == "trunc":
        return {"u": u, "v": msb}
    rb = rand["rbits"]
    out = {"rpairs": rb[0:30:2] & rb[1:30:2]}
    for k, level in enumerate(circ.levels):
        out[f"prod{k}"] = cc.mask_products(level, rand[f"mask{k}"])
    rho = unslice(rand["rho"], ms.n)
    out.update(r=r, u=u, v=msb, rho_a=rho, rho_u=rho * u, rho_v=rho * msb)
    return out


class Dealer:
    """Generates model masks and job bundles. Sees no image, weight or output."""

    def __init__(self, arities: tuple[int, ...] = DEFAULT_ARITIES) -> None:
        self.arities = arities
        self._models: dict[str, tuple[Plan, bytes, bytes, dict[int, np.ndarray]]] = {}

    def deploy(self, model_id: str, plan: Plan) -> tuple[bytes, bytes]:
        """New model: returns the two mask seeds (one per server)."""
        s0, s1 = new_seed(), new_seed()
        self.restore(model_id, plan, s0, s1)
        return s0, s1

    def restore(self, model_id: str, plan: Plan, s0: bytes, s1: bytes) -> None:
        """Re-adopt a model deployed earlier (after a dealer restart)."""
        b0, b1 = model_mask_shares(plan, s0), model_mask_shares(plan, s1)
        self._models[model_id] = (plan, s0, s1, {i: b0[i] + b1[i] for i in b0})

    @staticmethod
    def new_bundle_id() -> str:
        return uuid.uuid4().hex

    def new_bundle(self, model_id: str, batch: int, bundle_id: str | None = None) -> tuple[Bundle, Bundle]:
        """Fresh seeds and id for one job's bundles; corrections come from :meth:`corrections`."""
        if model_id not in self._models:
            raise UsageError(f"unknown model {model_id!r}")
        bid = bundle_id or self.new_bundle_id()
        return Bundle(bid, model_id, batch, 0, new_seed()), Bundle(bid, model_id, batch, 1, new_seed())

    def corrections(self, b0: Bundle, b1: Bundle) -> Iterator[tuple[int, list[np.ndarray]]]:
        """Server 1's corrections, op by op (ops with none are skipped); one op in memory at a time."""
        plan, _, _, masks = self._models[b0.model_id]
        layout = Layout.of(plan, b0.batch, self.arities)
        for i, specs in enumerate(layout.specs):
            prg0, prg1 = Prg(b0.seed, stream=i), Prg(b1.seed, stream=i)
            op_corr: list[np.ndarray] = []
            for ms in specs:
                rand: dict[str, np.ndarray] = {}
                for it in ms.items:
                    if not it.derived:
                        a0, a1 = draw(prg0, it), draw(prg1, it)
                        rand[it.name] = a0 + a1 if it.kind == "arith" else a0 ^ a1
                values = _derive(ms, rand, plan, i, masks, layout.circuit)
                del rand
                for it in ms.items:
                    if it.derived:
                        share0 = draw(prg0, it)
                        val = values[it.name].astype(it.dtype)
                        op_corr.append(val - share0 if it.kind == "arith" else val ^ share0)
            if op_corr:
                yield i, op_corr


async def stream_bundle(dealer: Dealer, model_id: str, batch: int, to0: Endpoint, to1: Endpoint,
                        bundle_id: str | None = None, announce: str | None = None) -> tuple[str, float]:
    """Generate one job's bundles and send them: an announcement (seed) to each server, then
    server 1's corrections op by op as they are made (labels ``bundle:<id>:<op>``).
    ``announce``: the announcement's label (default ``bundle:<id>``; the service uses ``ctl:bundle``).
    Returns the bundle id and the dealer's compute seconds."""
    b0, b1 = dealer.new_bundle(model_id, batch, bundle_id)
    await to0.send(announce or f"bundle:{b0.bundle_id}", bundle_header(b0))
    await to1.send(announce or f"bundle:{b1.bundle_id}", bundle_header(b1))
    gen = dealer.corrections(b0, b1)
    busy = 0.0
    while True:
        t = time.perf_counter()
        item = await asyncio.to_thread(next, gen, None)
        busy += time.perf_counter() - t
        if item is None:
            return b0.bundle_id, busy
        i, corr = item
        await to1.send(f"bundle:{b1.bundle_id}:{i}", encode_frame({"t": "bundle-op", "id": b1.bundle_id, "op": i}, corr))
