"""The server's sans-IO core and the round driver.

:class:`ServerCore` is sans-IO: ``deploy`` and ``run`` are generators yielding ``(op index, Open)``
and receiving opened values; ``ingest_op`` does an op's offline work. The plan walk loops over the
layer registry (:mod:`blindseg.layers`): each op's layer gets its inputs and its material and runs
its protocol. :func:`drive` is the one place where a server's rounds meet an
:class:`~blindseg.channel.Endpoint`: it labels each round ``job:op:round``, sends this server's
shares, waits for the peer's, and combines (add mod 2^32 / XOR). Compute steps run in a worker
thread so the two servers of an in-process run overlap on two cores.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from blindseg import protocols as P
from blindseg.channel import Endpoint
from blindseg.errors import ProtocolError, UsageError
from blindseg.layers import ModelShare, OpMaterial, Runtime
from blindseg.layout import Layout
from blindseg.messages import Shares, expect
from blindseg.plan import Plan
from blindseg.preprocessing import corrections_of, expand_op

from .store import BundleStore, BundleWriter, StoredBundle

Step = Generator[tuple[int, P.Open], P.Opened, Any]


class Prepared:
    """A consumed bundle, expanded op by op while the job runs (one op's material in memory at a time).

    Random items come from this server's PRG stream for the op; corrections (server 1) and what
    the offline phase precomputed (a linear op's F_i) come from the store.
    """

    def __init__(self, layout: Layout, party: int, bundle: StoredBundle) -> None:
        self.layout = layout
        self.party = party
        self.bundle = bundle
        self.batch = bundle.batch
        self._ready: dict[int, OpMaterial] = {}

    def preload(self, budget_bytes: int = 1 << 30) -> bool:
        """Expand every op now (before the image arrives) if it all fits in ``budget_bytes``."""
        if self.layout.material_bytes() > budget_bytes:
            return False
        for i in range(len(self.layout.specs)):
            if self.layout.specs[i]:
                self._ready[i] = self._expand(i)
        return True

    def material(self, i: int) -> OpMaterial:
        """Op ``i``'s material (each op's material is handed out once)."""
        if i in self._ready:
            return self._ready.pop(i)
        return self._expand(i)

    def _expand(self, i: int) -> OpMaterial:
        specs = self.layout.specs[i]
        if not specs:
            return OpMaterial([], [])
        stored = self.bundle.arrays(i)
        layer = self.layout.plan.ops[i].layer
        if layer.offline_items:  # consumed offline: the store holds what was precomputed from them
            return OpMaterial(expand_op(specs, self.party, self.bundle.seed, i, None, skip=layer.offline_items), stored)
        return OpMaterial(expand_op(specs, self.party, self.bundle.seed, i, iter(stored)), [])


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
    compute_seconds: float = 0.0  # in this server's protocol steps (the rest of a run waits on the peer and the link)
    per_op: dict[int, OpStats] = field(default_factory=dict)


class ServerCore:
    """One compute server's state for one deployed model."""

    def __init__(self, party: int, plan: Plan) -> None:
        if party not in (0, 1):
            raise UsageError(f"party must be 0 or 1, got {party}")
        self.party = party
        self.plan = plan
        self.rt = Runtime(party, plan.circuit())
        self._layouts: dict[int, Layout] = {}
        self.step_costs: dict[int, list[float]] = {}  # per batch size: each online step's seconds, last job
        self._last_use: dict[int, int] = {}
        for i, op in enumerate(plan.ops):
            for j in op.inputs:
                self._last_use[j] = i

    @property
    def model(self) -> dict[int, ModelShare]:
        return self.rt.model

    # ---------------------------------------------------------------- deploy
    def deploy(self, weights: dict[int, tuple[np.ndarray, np.ndarray | None]], masks: dict[int, np.ndarray]) -> Step:
        """Open E = W - B for every weighted op (one round, |W| ring elements)."""
        lin = self.plan.weighted_ops()
        for i in lin:
            if i not in weights or i not in masks or weights[i][0].shape != masks[i].shape:
                raise UsageError(f"weights do not match the plan at op {i} ({self.plan.ops[i].name})")
        (opened, _) = yield (-1, P.Open(arith=[weights[i][0] - masks[i] for i in lin]))
        for i, e in zip(lin, opened, strict=True):
            w_on = masks[i] + e if self.party == 1 else masks[i].copy()
            self.model[i] = ModelShare(e, w_on, weights[i][1])

    # --------------------------------------------------------------- offline
    def layout(self, batch: int) -> Layout:
        """The job layout for ``batch`` (built once per batch size: every bundle and job asks)."""
        if batch not in self._layouts:
            self._layouts[batch] = Layout.of(self.plan, batch)
        return self._layouts[batch]

    def ingest_op(self, writer: BundleWriter, layout: Layout, seed: bytes, i: int, corrections: list[np.ndarray]) -> None:
        """Offline work for op ``i`` of a bundle: check server 1's corrections; a layer with offline
        items precomputes from its full material (a linear op: F_i = C_i + f(A_i, E) + bias_i, one
        ring conv); store what the job needs."""
        if not self.model and self.plan.weighted_ops():
            raise UsageError("model is not deployed on this server")
        specs = layout.specs[i]
        want = corrections_of(specs, self.party)
        if len(corrections) != len(want):
            raise ProtocolError(f"bundle has {len(corrections)} items for op {i}, expected {len(want)}")
        for it, arr in zip(want, corrections, strict=True):
            if arr.dtype != it.dtype or arr.shape != it.shape:
                raise ProtocolError(f"bundle item {it.name} of op {i} has the wrong dtype or shape")
        op = self.plan.ops[i]
        if op.layer.offline_items:
            mats = expand_op(specs, self.party, seed, i, iter(corrections))
            writer.put(i, op.layer.precompute(self.rt, i, op, mats))
        elif corrections:
            writer.put(i, corrections)

    def begin(self, store: BundleStore, bundle_id: str, job: str, warm: Prepared | None = None) -> Prepared:
        """Consume a ready bundle for ``job`` (durably, before the first opening).

        ``warm``: the same bundle already expanded ahead of the job (:meth:`warm_up`)."""
        b = store.consume(bundle_id, job)
        if warm is not None and warm.bundle.bundle_id == bundle_id:
            return warm
        return Prepared(self.layout(b.batch), self.party, b)

    def warm_up(self, store: BundleStore, bundle_id: str, budget_bytes: int = 1 << 30) -> Prepared | None:
        """Expand a ready (not yet consumed) bundle's material now, if it fits the budget."""
        b = store.peek(bundle_id)
        prep = Prepared(self.layout(b.batch), self.party, b)
        return prep if prep.preload(budget_bytes) else None

    # ---------------------------------------------------------------- online
    def run(self, prep: Prepared, x: np.ndarray) -> Step:
        """Walk the plan on shares; returns this server's output share."""
        plan = self.plan
        want = (prep.batch, *plan.input_shape)
        if x.shape != want or x.dtype != np.uint32:
            raise UsageError(f"input share has shape {x.shape} / {x.dtype}, expected {want} uint32")
        vals: dict[int, np.ndarray] = {}
        for i, op in enumerate(plan.ops):
            ins = [vals[j] for j in op.inputs] or [x]
            mat = prep.material(i)
            vals[i] = yield from _tag(i, op.layer.online(self.rt, i, op, ins, mat))
            del mat
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


def _step(gen: Step, value: Any) -> tuple[bool, Any, float]:
    """One compute step (run in a worker thread or inline); StopIteration cannot cross a Future.
    Returns (done, value, seconds the step took)."""
    t = time.perf_counter()
    try:
        return False, gen.send(value), time.perf_counter() - t
    except StopIteration as stop:
        return True, stop.value, time.perf_counter() - t


INLINE_BELOW = 1e-3  # a step that took less than this in the last job runs on the event loop (no handoff)


async def exchange(peer: Endpoint, label: str, req: P.Open, timeout: float | None) -> P.Opened:
    """Send this server's shares of one round, receive the peer's, open."""
    mine = req.arith + req.boolean
    await peer.send(label, Shares(label, len(req.arith), tuple(mine)).encode())
    theirs = expect(await peer.recv(label, timeout), Shares, copy=False)  # read once, by combine
    if theirs.l != label or len(theirs.arrays) != len(mine) or theirs.na != len(req.arith):
        raise ProtocolError(f"peer frame for {label!r} does not match this round")
    for a, b in zip(mine, theirs.arrays, strict=True):
        if a.shape != b.shape or a.dtype != b.dtype:
            raise ProtocolError(f"peer share for {label!r} has shape {b.shape}/{b.dtype}, expected {a.shape}/{a.dtype}")
    return req.combine(list(theirs.arrays))


async def drive(gen: Step, peer: Endpoint, job: str, stats: RunStats | None = None,
                timeout: float | None = 600.0, on_op: Callable[[int], Awaitable[None]] | None = None,
                costs: list[float] | None = None) -> Any:
    """Run a sans-IO server generator to completion over ``peer``; record per-op cost.

    ``on_op(i)`` is awaited when the first round of op ``i`` starts (progress reports). ``costs``: each
    step's seconds in the last run of the same program (updated in place); a step that took under
    :data:`INLINE_BELOW` then runs on the event loop, where a worker-thread handoff (~0.4 ms here)
    would cost more than the step itself; every other step runs in a worker thread, so the loop keeps
    serving the transport while kernels run."""
    stats = stats if stats is not None else RunStats()
    rounds_in_op: dict[int, int] = {}
    value: Any = None
    t_last = time.perf_counter()
    k = 0
    while True:
        if costs is not None and k < len(costs) and costs[k] < INLINE_BELOW:
            done, item, took = _step(gen, value)
        else:
            done, item, took = await asyncio.to_thread(_step, gen, value)
        stats.compute_seconds += took
        if costs is not None:
            costs[k:k + 1] = [took]
        k += 1
        if done:
            return item
        op, req = item
        r = rounds_in_op.get(op, 0)
        rounds_in_op[op] = r + 1
        if r == 0 and on_op is not None:
            await on_op(op)
        before = peer.counters.bytes_sent
        value = await exchange(peer, f"{job}:{op}:{r}", req, timeout)
        st = stats.per_op.setdefault(op, OpStats())
        now = time.perf_counter()
        st.seconds += now - t_last
        t_last = now
        sent = peer.counters.bytes_sent - before
        st.bytes_sent += sent
        st.rounds += 1
        stats.rounds += 1
        stats.bytes_sent += sent
