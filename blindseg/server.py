"""The compute server (run as server0 or server1): the same code, a different party index.

:class:`ServerCore` is sans-IO: ``deploy`` and ``run`` are generators yielding
``(op index, Open)`` and receiving opened values; ``prepare`` expands a bundle
and precomputes f(A_i, E) (offline). :func:`drive` is the one place where a
server's rounds meet an :class:`~blindseg.channel.Endpoint`: it labels each
round ``job:op:round``, sends this server's frame, waits for the peer's, and
combines (add mod 2^32 / XOR). Compute steps run in a worker thread so the two
servers of an in-process run overlap on two cores.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import protocols as P
from .channel import Endpoint
from .circuit import build_circuit
from .errors import ProtocolError, UsageError
from .plan import LINEAR, Plan
from .preprocessing import DEFAULT_ARITIES, Layout, Material, expand_op
from .wire import decode_frame, encode_frame

Step = Generator[tuple[int, P.Open], P.Opened, Any]


@dataclass
class LinearState:
    """Per linear op, what a server keeps of the model: E (public), B_i + i*E, its bias share."""

    e: np.ndarray
    w_online: np.ndarray
    bias: np.ndarray | None


@dataclass
class Prepared:
    """A bundle expanded for one job, with F_i precomputed for every linear op."""

    bundle_id: str
    batch: int
    mats: list[list[Material]]
    f_pre: dict[int, np.ndarray]


@dataclass
class OpStats:
    """Online cost of one op at one server."""

    seconds: float = 0.0
    bytes_sent: int = 0
    rounds: int = 0


@dataclass
class RunStats:
    rounds: int = 0
    bytes_sent: int = 0
    per_op: dict[int, OpStats] = field(default_factory=dict)


class ServerCore:
    """One compute server's state for one deployed model."""

    def __init__(self, party: int, plan: Plan, arities: tuple[int, ...] = DEFAULT_ARITIES) -> None:
        if party not in (0, 1):
            raise UsageError(f"party must be 0 or 1, got {party}")
        self.party = party
        self.plan = plan
        self.arities = arities
        self.model: dict[int, LinearState] = {}
        self._last_use = self._lifetimes(plan)

    @staticmethod
    def _lifetimes(plan: Plan) -> dict[int, int]:
        last: dict[int, int] = {}
        for i, op in enumerate(plan.ops):
            for j in op.inputs:
                last[j] = i
        return last

    # ---------------------------------------------------------------- deploy
    def deploy(self, weights: dict[int, tuple[np.ndarray, np.ndarray | None]], masks: dict[int, np.ndarray]) -> Step:
        """Open E = W - B for every linear op (one round, |W| ring elements)."""
        lin = self.plan.linear_ops()
        for i in lin:
            if i not in weights or weights[i][0].shape != masks[i].shape:
                raise UsageError(f"weights do not match the plan at op {i} ({self.plan.ops[i].name})")
        (opened, _) = yield (-1, P.Open(arith=[weights[i][0] - masks[i] for i in lin]))
        for i, e in zip(lin, opened, strict=True):
            w_on = masks[i] + e if self.party == 1 else masks[i].copy()
            self.model[i] = LinearState(e, w_on, weights[i][1])

    # --------------------------------------------------------------- offline
    def prepare(self, bundle_id: str, batch: int, seed: bytes, corrections: list[list[np.ndarray]] | None) -> Prepared:
        """Expand the bundle and precompute F_i = C_i + f(A_i, E) + bias_i (no image needed)."""
        if not self.model:
            raise UsageError("model is not deployed on this server")
        layout = Layout.of(self.plan, batch, self.arities)
        if corrections is not None and len(corrections) != len(layout.specs):
            raise ProtocolError("bundle does not match the plan (op count)")
        mats = []
        f_pre = {}
        for i, specs in enumerate(layout.specs):
            corr = iter(corrections[i]) if corrections is not None else None
            m = expand_op(specs, self.party, seed, i, corr)
            if corr is not None and next(corr, None) is not None:
                raise ProtocolError(f"bundle has extra items for op {i}")
            if self.plan.ops[i].kind in LINEAR:
                st = self.model[i]
                f_pre[i] = P.linear_offline(self.party, self.plan.ops[i], m[0], st.e, st.bias)
                del m[0]["C"]
            mats.append(m)
        return Prepared(bundle_id, batch, mats, f_pre)

    # ---------------------------------------------------------------- online
    def run(self, prep: Prepared, x: np.ndarray) -> Step:
        """Walk the plan on shares; returns this server's output share."""
        plan, party = self.plan, self.party
        want = (prep.batch, *plan.input_shape)
        if x.shape != want or x.dtype != np.uint32:
            raise UsageError(f"input share has shape {x.shape} / {x.dtype}, expected {want} uint32")
        circ = build_circuit(30, self.arities)
        vals: dict[int, np.ndarray] = {}
        for i, op in enumerate(plan.ops):
            ins = [vals[j] for j in op.inputs]
            mats = prep.mats[i]
            k = op.kind
            gen: P.Proto | None = None
            if k == "input":
                out: np.ndarray = x
            elif k in LINEAR:
                gen = P.linear(op, ins[0], mats[0], prep.f_pre.pop(i), self.model[i].w_online)
            elif k == "rescale":
                z = ins[0] * np.uint32(op.p("mul")) if op.p("mul") != 1 else ins[0]
                s = int(op.p("shift"))
                gen = P.select(party, z, mats[0], s, circ) if op.p("relu") else P.trunc(party, z, mats[0], s)
            elif k == "maxpool":
                gen = P.maxpool(party, op, ins[0], mats, circ)
            elif k == "avgsum":
                out = P.avgsum(op, ins[0])
            elif k == "concat":
                out = np.concatenate(ins, axis=1)
            elif k == "add":
                out = ins[0] + ins[1]
            elif k == "argmax":
                gen = P.argmax(party, op, ins[0], mats, circ)
            elif k == "output":
                out = ins[0]
            else:  # validated plans never get here
                raise UsageError(f"op kind {k!r} cannot run")
            if gen is not None:
                out = yield from _tag(i, gen)
            vals[i] = out
            prep.mats[i] = []
            for j in op.inputs:
                if self._last_use.get(j) == i:
                    del vals[j]
        return vals[len(plan.ops) - 1]


def _tag(i: int, gen: P.Proto) -> Generator[tuple[int, P.Open], P.Opened, np.ndarray]:
    """Tag every round of an op's protocol with the op index."""
    try:
        req = next(gen)
        while True:
            req = gen.send((yield (i, req)))
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]


def _step(gen: Step, value: Any) -> tuple[bool, Any]:
    """One compute step (run in a worker thread); StopIteration cannot cross a Future."""
    try:
        return False, gen.send(value)
    except StopIteration as stop:
        return True, stop.value


async def exchange(party: int, peer: Endpoint, label: str, req: P.Open, timeout: float | None) -> P.Opened:
    """Send this server's shares of one round, receive the peer's, open."""
    mine = req.arith + req.boolean
    await peer.send(label, encode_frame({"t": "open", "l": label, "na": len(req.arith)}, mine))
    header, theirs = decode_frame(await peer.recv(label, timeout))
    if header.get("t") != "open" or header.get("l") != label or len(theirs) != len(mine):
        raise ProtocolError(f"peer frame for {label!r} does not match this round")
    for a, b in zip(mine, theirs, strict=True):
        if a.shape != b.shape or a.dtype != b.dtype:
            raise ProtocolError(f"peer share for {label!r} has shape {b.shape}/{b.dtype}, expected {a.shape}/{a.dtype}")
    na = len(req.arith)
    return [a + b for a, b in zip(mine[:na], theirs[:na], strict=False)], [a ^ b for a, b in zip(mine[na:], theirs[na:], strict=False)]


async def drive(gen: Step, party: int, peer: Endpoint, job: str, stats: RunStats | None = None,
                timeout: float | None = 600.0) -> Any:
    """Run a sans-IO server generator to completion over ``peer``; record per-op cost."""
    stats = stats if stats is not None else RunStats()
    rounds_in_op: dict[int, int] = {}
    value: Any = None
    t_last = time.perf_counter()
    while True:
        done, item = await asyncio.to_thread(_step, gen, value)
        if done:
            return item
        op, req = item
        r = rounds_in_op.get(op, 0)
        rounds_in_op[op] = r + 1
        before = peer.counters.bytes_sent
        value = await exchange(party, peer, f"{job}:{op}:{r}", req, timeout)
        st = stats.per_op.setdefault(op, OpStats())
        now = time.perf_counter()
        st.seconds += now - t_last
        t_last = now
        st.bytes_sent += peer.counters.bytes_sent - before
        st.rounds += 1
        stats.rounds += 1
        stats.bytes_sent += peer.counters.bytes_sent - before
