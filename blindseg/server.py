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
from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import protocols as P
from .channel import Endpoint
from .circuit import build_circuit
from .errors import ProtocolError, UsageError
from .plan import LINEAR, Plan
from .preprocessing import DEFAULT_ARITIES, Layout, Material, expand_op
from .store import BundleStore, BundleWriter, StoredBundle
from .wire import decode_frame, encode_frame

LOCAL = frozenset({"input", "avgsum", "concat", "add", "output"})
Step = Generator[tuple[int, P.Open], P.Opened, Any]


@dataclass
class LinearState:
    """Per linear op, what a server keeps of the model: E (public), B_i + i*E, its bias share."""

    e: np.ndarray
    w_online: np.ndarray
    bias: np.ndarray | None


class Prepared:
    """A consumed bundle, expanded op by op while the job runs (one op's material in memory at a time).

    Random items come from this server's PRG stream for the op; derived ones
    (server 1) and the precomputed F_i come from the store.
    """

    def __init__(self, layout: Layout, party: int, bundle: StoredBundle) -> None:
        self.layout = layout
        self.party = party
        self.bundle = bundle
        self.batch = bundle.batch
        self._ready: dict[int, tuple[list[Material], np.ndarray | None]] = {}

    def preload(self, budget_bytes: int = 1 << 30) -> bool:
        """Expand every op now (before the image arrives) if it all fits in ``budget_bytes``."""
        if self.layout.material_bytes() > budget_bytes:
            return False
        for i in range(len(self.layout.specs)):
            if self.layout.specs[i]:
                self._ready[i] = self._expand(i)
        return True

    def material(self, i: int) -> tuple[list[Material], np.ndarray | None]:
        """Op ``i``'s material and, for a linear op, its F_i (each op's material is handed out once)."""
        if i in self._ready:
            return self._ready.pop(i)
        return self._expand(i)

    def _expand(self, i: int) -> tuple[list[Material], np.ndarray | None]:
        specs = self.layout.specs[i]
        stored = self.bundle.arrays(i)
        if self.layout.plan.ops[i].kind in LINEAR:
            if len(stored) != 1:
                raise ProtocolError(f"bundle {self.bundle.bundle_id} lacks F for op {i}")
            return expand_op(specs, self.party, self.bundle.seed, i, None, skip=("C",)), stored[0]
        corr = iter(stored) if self.party == 1 else None
        return expand_op(specs, self.party, self.bundle.seed, i, corr), None


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
    def layout(self, batch: int) -> Layout:
        return Layout.of(self.plan, batch, self.arities)

    def ingest_op(self, writer: BundleWriter, layout: Layout, seed: bytes, i: int, corrections: list[np.ndarray]) -> None:
        """Offline work for op ``i`` of a bundle: check server 1's corrections, precompute
        F_i = C_i + f(A_i, E) + bias_i for a linear op (one ring conv), store what the job needs."""
        if not self.model:
            raise UsageError("model is not deployed on this server")
        specs = layout.specs[i]
        want = [it for ms in specs for it in ms.items if it.derived] if self.party == 1 else []
        if len(corrections) != len(want):
            raise ProtocolError(f"bundle has {len(corrections)} items for op {i}, expected {len(want)}")
        for it, arr in zip(want, corrections, strict=True):
            if arr.dtype != it.dtype or arr.shape != it.shape:
                raise ProtocolError(f"bundle item {it.name} of op {i} has the wrong dtype or shape")
        if self.plan.ops[i].kind in LINEAR:
            (mat,) = expand_op(specs, self.party, seed, i, iter(corrections) if self.party == 1 else None)
            st = self.model[i]
            writer.put(i, [P.linear_offline(self.party, self.plan.ops[i], mat, st.e, st.bias)])
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
        plan, party = self.plan, self.party
        want = (prep.batch, *plan.input_shape)
        if x.shape != want or x.dtype != np.uint32:
            raise UsageError(f"input share has shape {x.shape} / {x.dtype}, expected {want} uint32")
        circ = build_circuit(30, self.arities)
        vals: dict[int, np.ndarray] = {}
        for i, op in enumerate(plan.ops):
            ins = [vals[j] for j in op.inputs]
            mats, f_pre = prep.material(i) if op.kind not in LOCAL else ([], None)
            k = op.kind
            gen: P.Proto | None = None
            if k == "input":
                out: np.ndarray = x
            elif k in LINEAR:
                if f_pre is None:
                    raise ProtocolError(f"no precomputed F for linear op {i}")
                gen = P.linear(op, ins[0], mats[0], f_pre, self.model[i].w_online)
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
            del mats, f_pre
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
    return req.combine(theirs)


async def drive(gen: Step, party: int, peer: Endpoint, job: str, stats: RunStats | None = None,
                timeout: float | None = 600.0, on_op: Callable[[int], Awaitable[None]] | None = None) -> Any:
    """Run a sans-IO server generator to completion over ``peer``; record per-op cost.

    ``on_op(i)`` is awaited when the first round of op ``i`` starts (progress reports)."""
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
        if r == 0 and on_op is not None:
            await on_op(op)
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


def bundle_header(b: Any) -> bytes:
    """The frame that announces a bundle to one server (its seed travels only inside the encrypted link)."""
    return encode_frame({"t": "bundle", "id": b.bundle_id, "model": b.model_id, "batch": b.batch,
                         "party": b.party, "seed": b.seed})


async def receive_bundle(core: ServerCore, store: BundleStore, frame: bytes | memoryview, dealer: Endpoint,
                         timeout: float | None = 600.0, announced_as: str | None = None) -> tuple[str, int]:
    """Offline, at a server: take a bundle announced by ``frame``, receive server 1's corrections op
    by op (labels ``bundle:<id>:<op>``), precompute F_i, store durably. Returns the bundle id and the
    bytes its frames took on the link. A bundle cut off midway is dropped, never left usable."""
    header, _ = decode_frame(frame)
    try:
        bid, model, batch, party, seed = (str(header["id"]), str(header["model"]), int(header["batch"]),
                                          int(header["party"]), bytes(header["seed"]))
    except (KeyError, TypeError, ValueError):
        raise ProtocolError("bundle announcement is malformed") from None
    if header.get("t") != "bundle" or party != core.party or len(seed) != 32 or not 1 <= batch <= 4096:
        raise ProtocolError("bundle announcement does not fit this server")
    layout = core.layout(batch)
    writer = store.writer(bid, model, batch, party, seed)
    nbytes = dealer.wire_size(announced_as or f"bundle:{bid}", frame)
    try:
        for i, specs in enumerate(layout.specs):
            needs = core.party == 1 and any(it.derived for ms in specs for it in ms.items)
            corr: list[np.ndarray] = []
            if needs:
                label = f"bundle:{bid}:{i}"
                op_frame = await dealer.recv(label, timeout)
                nbytes += dealer.wire_size(label, op_frame)
                h, corr = decode_frame(op_frame)
                if h.get("t") != "bundle-op" or h.get("op") != i:
                    raise ProtocolError(f"bundle frame for op {i} is malformed")
            if needs or core.plan.ops[i].kind in LINEAR:
                await asyncio.to_thread(core.ingest_op, writer, layout, seed, i, corr)
        writer.commit()
    except BaseException:
        writer.abort()
        raise
    return bid, nbytes

