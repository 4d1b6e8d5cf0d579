"""The compute server as a long-running service (``python -m server0`` / ``python -m server1``).

Same code for both parties; the party index picks the role. State under ``state_dir``: deployed
models (:mod:`server.models`) and the bundle store (:mod:`server.store`). Per job:

1. the data owner's ``ctl:job`` brings this server's input share;
2. both servers agree on a bundle and consume it durably (:mod:`server.pool`);
3. they run the plan with the peer (labels ``<job>:<op>:<round>``), server0 reports progress per op;
4. each sends its output share to the data owner (``<job>:output``) and drops the bundle's data;
   server0 asks the dealer for a replacement.

A failure ends the job with ``ctl:error`` to the requester and the service goes on. Errors blindseg
raises on purpose carry their reason; anything else is a bug, logged with its traceback and reported
as an internal error (never dressed up as the peer's fault).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from blindseg.config import PartyConfig
from blindseg.errors import BlindsegError, ProtocolError, UsageError
from blindseg.layout import model_mask_shares
from blindseg.messages import (
    BundleAnnounce,
    Deploy,
    Deployed,
    Error,
    GetPlan,
    Job,
    Masks,
    Message,
    Output,
    PlanInfo,
    PoolRequest,
    Progress,
)
from blindseg.node import Node
from blindseg.plan import Plan
from blindseg.sources import RemoteSource

from .bundles import receive_bundle
from .core import RunStats, ServerCore, drive
from .models import load_models, save_model
from .pool import BundlePool
from .store import BundleStore

log = logging.getLogger("blindseg.server")


@dataclass
class ServerSettings:
    round_timeout: float = 120.0  # a peer silent this long fails the job
    bundle_wait: float = 120.0  # how long a job waits for preprocessing
    preload_bytes: int = 1 << 30  # a bundle whose material fits is expanded before its job


class ServerService:
    def __init__(self, party: int, node: Node, state_dir: Path, settings: ServerSettings | None = None) -> None:
        if party not in (0, 1):
            raise UsageError(f"a server is party 0 or 1, got {party}")
        self.party, self.name, self.peer = party, f"server{party}", f"server{1 - party}"
        self.node, self.state_dir = node, state_dir
        self.settings = settings or ServerSettings()
        self.store = BundleStore(state_dir / "bundles")
        self.models: dict[str, ServerCore] = load_models(state_dir, party)
        self._deployed: dict[str, asyncio.Event] = {}
        for m in self.models:
            self._event(m).set()
        self._pending: dict[str, dict[str, Any]] = {}
        self._jobs: set[str] = set()  # jobs in progress (finished ones are in the store)
        self._offline: dict[str, tuple[int, float]] = {}  # bundle -> (bytes received, seconds), this run
        self._tasks: set[asyncio.Task[None]] = set()
        self.pool = BundlePool(self)
        self.dealer_seconds = 0.0

    @staticmethod
    def from_config(cfg: PartyConfig) -> ServerService:
        if cfg.party not in ("server0", "server1"):
            raise UsageError(f"{cfg.path}: a server config needs party server0 or server1")
        return ServerService(int(cfg.party[-1]), Node.from_config(cfg), cfg.state_dir,
                             ServerSettings(cfg.round_timeout, cfg.bundle_wait))

    def _event(self, model: str) -> asyncio.Event:
        return self._deployed.setdefault(model, asyncio.Event())

    # ------------------------------------------------------------------ loop
    async def serve(self) -> None:
        await self.node.start()
        log.info("%s serving deployment %s (%d models)", self.name, self.node.deployment, len(self.models))
        try:
            while True:
                sender, msg = await self.node.next_control()
                self.spawn(self._handle(sender, msg))
        finally:
            for t in list(self._tasks):
                t.cancel()
            await self.node.close()
            self.store.close()

    async def _handle(self, sender: str, msg: Message) -> None:
        try:
            await self._route(sender, msg)
        except (BlindsegError, TimeoutError) as e:
            await self._refuse(sender, msg, str(e) if isinstance(e, BlindsegError) else f"{msg.T} timed out")
        except Exception:
            log.exception("%s: internal error handling %s from %s", self.name, msg.T, sender)
            await self._refuse(sender, msg, f"internal error at {self.name} handling {msg.T}")

    async def _refuse(self, sender: str, msg: Message, reason: str) -> None:
        log.warning("%s: %s from %s: %s", self.name, msg.T, sender, reason)
        if sender in ("data_owner", "model_owner"):
            try:
                await self.node.tell(sender, Error(reason, self.name, getattr(msg, "job", None),
                                                   getattr(msg, "model", None)))
            except BlindsegError:
                pass

    async def _route(self, sender: str, msg: Message) -> None:
        if isinstance(msg, Deploy) and sender == "model_owner":
            self._pending.setdefault(msg.model, {})["deploy"] = msg
            await self._try_deploy(msg.model)
        elif isinstance(msg, Masks) and sender == "dealer":
            self._pending.setdefault(msg.model, {})["seed"] = msg.seed
            await self._try_deploy(msg.model)
        elif isinstance(msg, BundleAnnounce) and sender == "dealer":
            await asyncio.wait_for(self._event(msg.model).wait(), self.settings.bundle_wait)
            t0 = time.perf_counter()
            dealer = self.node.link("dealer")
            bid, nbytes = await receive_bundle(self.models[msg.model], self.store, RemoteSource(msg, dealer),
                                               timeout=self.settings.bundle_wait)
            self._offline[bid] = (nbytes + dealer.wire_size("ctl:bundle", msg.encode()), time.perf_counter() - t0)
            self.pool.schedule_warm(msg.model, msg.batch)
        elif isinstance(msg, GetPlan):
            await self.node.tell(sender, PlanInfo(msg.model, self.model(msg.model).plan.to_dict()))
        elif isinstance(msg, Job) and sender == "data_owner":
            await self._job(msg)
        else:
            raise ProtocolError(f"unexpected {msg.T} message from {sender}")

    def spawn(self, coro: Any) -> None:
        """Run ``coro`` in the background; it is cancelled when the service stops."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def model(self, model: str) -> ServerCore:
        if model not in self.models:
            raise UsageError(f"model {model!r} is not deployed on {self.name}")
        return self.models[model]

    async def _try_deploy(self, model: str) -> None:
        p = self._pending.get(model, {})
        if "deploy" not in p or "seed" not in p:
            return
        del self._pending[model]
        dep: Deploy = p["deploy"]
        plan = Plan.from_dict(dep.plan)
        core = ServerCore(self.party, plan)
        await drive(core.deploy(dep.weights(), model_mask_shares(plan, p["seed"])), self.node.link(self.peer),
                    f"deploy-{model}", timeout=self.settings.round_timeout)
        await asyncio.to_thread(save_model, self.state_dir, model, core)
        self.models[model] = core
        self._event(model).set()
        log.info("%s: model %s deployed (%d ops)", self.name, model, len(plan.ops))
        await self.node.tell("model_owner", Deployed(model, self.name))

    # ------------------------------------------------------------------- job
    async def _job(self, msg: Job) -> None:
        job = msg.job
        if not job.isalnum() or len(job) > 64:
            raise ProtocolError("job id must be 1-64 alphanumeric characters")
        if job in self._jobs or self.store.job_seen(job):
            raise ProtocolError(f"duplicate job id {job}")
        self._jobs.add(job)
        try:
            await self._run_job(msg)
        finally:
            self._jobs.discard(job)

    async def _run_job(self, msg: Job) -> None:
        job, model, batch = msg.job, msg.model, msg.batch
        core = self.model(model)
        (x,) = msg.arrays
        if x.shape != (batch, *core.plan.input_shape):
            raise UsageError(f"job {job}: input share does not match the model's input {core.plan.input_shape}")
        peer = self.node.link(self.peer)
        t_start = time.perf_counter()
        log_start = len(peer.counters.log)
        bid, prep, warm = await self.pool.agree(job, model, batch, core, peer)
        try:
            if warm is None:
                await asyncio.to_thread(prep.preload, self.settings.preload_bytes)
            stats = RunStats()
            n = len(core.plan.ops)

            async def progress(op: int) -> None:
                if self.party == 0:  # off the critical path: the round does not wait for it
                    self.spawn(self.node.tell("data_owner", Progress(job, op, n)))

            t_run = time.perf_counter()
            out = await drive(core.run(prep, x), peer, job, stats, self.settings.round_timeout, on_op=progress)
            log.info("%s: job %s: %.3f s to start (bundle %s, %s), %.3f s for %d rounds", self.name, job[:8],
                     t_run - t_start, bid[:8], "warm" if warm is not None else "cold", time.perf_counter() - t_run,
                     stats.rounds)
            off_bytes, off_seconds = self._offline.pop(bid, (0, 0.0))
            await self.node.link("data_owner").send(f"{job}:output", Output(
                job, stats.rounds, stats.bytes_sent, off_bytes, off_seconds,
                [[i, s.seconds, s.bytes_sent, s.rounds] for i, s in sorted(stats.per_op.items())],
                [list(e) for e in peer.counters.log[log_start:]], (np.ascontiguousarray(out),)).encode())
        finally:
            self.pool.release(bid)
            self.pool.schedule_warm(model, batch)
            if self.party == 0:  # refill after the job, so the next bundle never competes with this job's rounds
                await self.node.tell("dealer", PoolRequest(model, batch, self.pool.ready_count(model, batch)))


def main(party: str, argv: list[str] | None = None) -> int:
    import argparse

    from blindseg.node import run_service

    ap = argparse.ArgumentParser(prog=f"python -m {party}")
    ap.add_argument("--config", required=True)
    args = ap.parse_args(argv)

    async def go() -> None:
        await ServerService.from_config(PartyConfig.load(args.config, party)).serve()

    return run_service(go())
