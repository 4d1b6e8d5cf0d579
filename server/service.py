"""The compute server as a long-running service (``python -m server0`` / ``python -m server1``).

Same code for both parties; the party index picks the role. State under ``state_dir``: deployed
models (:mod:`server.models`) and the bundle store (:mod:`server.store`). Per job:

0. deployments are staged (``ctl:deploy`` + the dealer's ``ctl:masks``, E opened with the peer) and
   serve only once the model owner commits them (``ctl:commit``): a job, bundle or mask of any other
   epoch is refused, and a commit purges the model's old bundles;
1. a data owner's (tenant's) ``ctl:job`` brings this server's input share and names the epoch;
2. both servers agree on a bundle and consume it durably (:mod:`server.pool`);
3. they run the plan with the peer (labels ``<job>:<op>:<round>``), server0 reports progress per op;
4. each sends its output share to the requesting tenant only (``<job>:output`` on its own topic) and
   drops the bundle's data;
   server0 asks the dealer for a replacement.

A failure ends the job with ``ctl:error`` to the requester and the service goes on. Errors blindseg
raises on purpose carry their reason; anything else is a bug, logged with its traceback and reported
as an internal error (never dressed up as the peer's fault).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from blindseg import ids
from blindseg.background import spawn
from blindseg.config import PartyConfig, is_role, parse_server, server_name
from blindseg.errors import BlindsegError, ProtocolError, StaleEpoch, StoreFull, UsageError
from blindseg.health import Health
from blindseg.layout import model_mask_shares
from blindseg.messages import (
    BundleAnnounce,
    Claim,
    Commit,
    Committed,
    Deploy,
    Deployed,
    Error,
    GetPlan,
    Job,
    Masks,
    Message,
    Offer,
    Output,
    PlanInfo,
    PoolRequest,
    Progress,
)
from blindseg.node import Node
from blindseg.plan import Plan, check_budget
from blindseg.sources import RemoteSource
from blindseg.state import private_dir, write_private

from .bundles import receive_bundle
from .core import RunStats, ServerCore, drive
from .models import commit_model, load_models, save_model
from .pool import BundlePool
from .store import BundleStore

log = logging.getLogger("blindseg.server")


@dataclass
class ServerSettings:
    round_timeout: float = 120.0  # a peer silent this long fails the job
    bundle_wait: float = 120.0  # how long a job waits for preprocessing
    preload_bytes: int = 1 << 30  # a bundle whose material fits is expanded before its job
    inline_steps: bool = True  # steps that were short last job run on the event loop (see server.core.drive)
    max_job_bytes: int = 16 << 30  # a plan or job needing more preprocessing material is refused
    pool_expiry: float = 3600.0  # ready bundles of a (model, batch size) unused this long are dropped
    metrics_address: str = ""  # host:port of /metrics, /healthz, /readyz; "" = off
    store_budget: int = 0  # most bytes the bundle store may hold on disk (0: what the disk allows)
    max_jobs: int = 2  # server0: offered jobs (several pairs) are claimed only while fewer run or are claimed
    claim_hold: float = 15.0  # a claimed job whose shares have not come within this many seconds is let go
    offer_age: float = 120.0  # offers dated further than this from this clock are dropped (replays)


class ServerService:
    def __init__(self, party: int, node: Node, state_dir: Path, settings: ServerSettings | None = None,
                 tenants: frozenset[str] = frozenset({"data_owner"})) -> None:
        if party not in (0, 1):
            raise UsageError(f"a server is party 0 or 1, got {party}")
        me = parse_server(node.party)
        if me is None or me[0] != party:
            raise UsageError(f"server {party} cannot run as {node.party!r} (server0, server1, server0-<pair>, ...)")
        self.party, self.name, self.pair, self.peer = party, node.party, me[1], server_name(1 - party, me[1])
        self.node, self.state_dir = node, state_dir
        self.settings = settings or ServerSettings()
        self.tenants = tenants  # the data-owner identities this server has keys for
        private_dir(state_dir)
        self.store = BundleStore(state_dir / "bundles", self.settings.store_budget)
        self._deployed: dict[str, asyncio.Event] = {}  # model@epoch -> set while it is the current one
        self.models: dict[str, ServerCore] = {}  # model -> its committed deployment
        self.epochs: dict[str, str] = {}
        for m, (epoch, core) in load_models(state_dir, party).items():
            self.models[m], self.epochs[m] = core, epoch
            self._event(ids.key(m, epoch)).set()
        self._staged: dict[str, ServerCore] = {}  # model@epoch -> E opened, waiting for its commit
        self._allowed: dict[str, list[str]] = {}  # model@epoch -> tenants allowed to run jobs ([] = all)
        self._pending: dict[str, dict[str, Any]] = {}
        self._jobs: dict[str, str] = {}  # jobs in progress -> their tenant (finished ones are in the store)
        self._claims: dict[str, tuple[str, float]] = {}  # server0: offered jobs this pair took -> (tenant, when)
        self._offline: dict[str, tuple[int, float]] = {}  # bundle -> (bytes received, seconds), this run
        self._tasks: set[asyncio.Task[None]] = set()
        self.pool = BundlePool(self)
        self.dealer_seconds = 0.0
        self._last_used: dict[tuple[str, int], float] = {}  # (model@epoch, batch) -> monotonic time of its last job
        self._started = time.monotonic()
        self._store_view: tuple[float, dict[str, dict[int, int]], int] = (-math.inf, {}, 0)
        self.health = Health(self.name, node.deployment)
        self.health.info, self.health.refresh = self._status, self._refresh_metrics
        self.health.checks.append(lambda: None if self.node.connected() else "not connected to the broker")
        self._load_acl()

    def __repr__(self) -> str:
        return f"ServerService({self.name}, models={self.epochs})"

    @staticmethod
    def from_config(cfg: PartyConfig) -> ServerService:
        if parse_server(cfg.name) is None:
            raise UsageError(f"{cfg.path}: a server config needs party server0 or server1")
        return ServerService(int(cfg.party[-1]), Node.from_config(cfg), cfg.state_dir,
                             ServerSettings(cfg.round_timeout, cfg.bundle_wait, max_job_bytes=cfg.max_job_bytes,
                                            pool_expiry=cfg.pool_expiry, metrics_address=cfg.metrics_address,
                                            store_budget=cfg.store_budget, max_jobs=cfg.max_jobs),
                             frozenset(cfg.tenants))

    def _event(self, key: str) -> asyncio.Event:
        return self._deployed.setdefault(key, asyncio.Event())

    def _acl_file(self) -> Path:
        return self.state_dir / "models" / "tenants.json"

    def _load_acl(self) -> None:
        f = self._acl_file()
        if f.exists():
            self._allowed = {k: list(v) for k, v in json.loads(f.read_text()).items()}

    def current_key(self, model: str) -> str:
        if model not in self.models:
            raise UsageError(f"model {model!r} is not deployed on {self.name}")
        return ids.key(model, self.epochs[model])

    def core_for(self, key: str) -> ServerCore | None:
        """The core of deployment ``key`` if it is the model's current one."""
        model, epoch = ids.split(key)
        return self.models[model] if self.epochs.get(model) == epoch else None

    # ------------------------------------------------------------------ loop
    async def serve(self) -> None:
        probes = await self.health.serve_probes(self.settings.metrics_address)
        self.node.announce(self.health.document, self.health.interval)
        await self.node.start()
        log.info("%s serving deployment %s (%d models)", self.name, self.node.deployment, len(self.models))
        self.spawn(self._expire_pools(), "pool expiry")
        try:
            while True:
                sender, msg = await self.node.next_control()
                self.spawn(self._handle(sender, msg))
        finally:
            await self._abort_running("is shutting down")
            for t in list(self._tasks):
                t.cancel()
            await self.node.goodbye(self.health.goodbye("stopped"))
            if probes is not None:
                probes.close()
            await self.node.close()
            self.store.close()

    async def _abort_running(self, why: str) -> None:
        """Tell each running job's data owner at once that it ends here (its retry starts now, not after
        a timeout); the bundles those jobs hold were consumed and are never used again."""
        async def tell(job: str, tenant: str) -> None:
            with contextlib.suppress(BlindsegError, TimeoutError):
                await asyncio.wait_for(self.node.tell(tenant, Error(f"{self.name} {why}; retry the job", self.name,
                                                                    job)), 2.0)

        if self._jobs:
            log.info("%s %s: ending %d running jobs", self.name, why, len(self._jobs))
            await asyncio.gather(*(tell(j, t) for j, t in list(self._jobs.items())))

    # ---------------------------------------------------------- operations
    def _status(self, reader: str) -> dict[str, Any]:
        """This server's part of its presence document (``blindseg status``); a tenant sees only the
        models it may use."""
        def shown(key: str) -> bool:
            allowed = self._allowed.get(key, [])
            return is_role(reader) or not allowed or reader in allowed

        now = time.monotonic()
        if now - self._store_view[0] > 1.0:  # one store scan per publishing round, not one per reader
            self._store_view = (now, self.store.summary(), self.store.disk_bytes())
        _, summary, disk = self._store_view
        pool = {k: v for k, v in summary.items() if shown(k)}
        return {"models": {m: e for m, e in self.epochs.items() if shown(ids.key(m, e))},
                "staged": sorted(k for k in self._staged if is_role(reader)),
                "pool": {k: {str(b): n for b, n in sorted(v.items())} for k, v in sorted(pool.items())},
                "jobs_running": len(self._jobs), "jobs_claimed": len(self._claims), "store_bytes": disk,
                "pool_expiry_seconds": self.settings.pool_expiry}

    def _refresh_metrics(self) -> None:
        self.health.pool.clear()
        for key, batches in self.store.summary().items():
            for b, n in batches.items():
                self.health.pool.labels(key, str(b)).set(n)

    def expire_unused(self, now: float | None = None) -> int:
        """Drop the ready bundles of every (deployment, batch size) whose last job (or this server's start,
        if none ran since) is older than ``pool_expiry``; returns how many were dropped."""
        now = time.monotonic() if now is None else now
        dropped = 0
        for key, batches in self.store.summary().items():
            for b in batches:
                if now - self._last_used.get((key, b), self._started) < self.settings.pool_expiry:
                    continue
                gone = self.pool.unreserved(key, b)
                for bid in gone:
                    self.pool.retire(bid, "expired")
                dropped += len(gone)
                log.info("%s: %d ready bundles of %s batch %d expired (no job for %.0f s)", self.name, len(gone),
                         key, b, self.settings.pool_expiry)
        return dropped

    async def _expire_pools(self) -> None:
        while True:
            await asyncio.sleep(min(60.0, self.settings.pool_expiry / 4))
            await asyncio.to_thread(self.expire_unused)

    async def _handle(self, sender: str, msg: Message) -> None:
        try:
            await self._route(sender, msg)
        except (BlindsegError, TimeoutError) as e:
            self.health.failed(msg.T, e, getattr(msg, "job", None), sender)
            await self._refuse(sender, msg, str(e) if isinstance(e, BlindsegError) else f"{msg.T} timed out",
                               e.code if isinstance(e, StaleEpoch | StoreFull) else "")
        except Exception as e:
            log.exception("%s: internal error handling %s from %s", self.name, msg.T, sender)
            self.health.failed(msg.T, e, getattr(msg, "job", None), sender)
            await self._refuse(sender, msg, f"internal error at {self.name} handling {msg.T}")

    async def _refuse(self, sender: str, msg: Message, reason: str, code: str = "") -> None:
        log.warning("%s: %s from %s: %s", self.name, msg.T, sender, reason)
        if sender == "model_owner" or sender in self.tenants or (sender == "dealer" and code == StoreFull.code):
            try:
                await self.node.tell(sender, Error(reason, self.name, getattr(msg, "job", None),
                                                   getattr(msg, "model", None), code))
            except BlindsegError:
                pass

    async def _route(self, sender: str, msg: Message) -> None:
        if isinstance(msg, Deploy) and sender == "model_owner":
            plan = Plan.from_dict(msg.plan)  # parsed and checked once, here
            check_budget(plan, self.settings.max_job_bytes)
            self._pending.setdefault(ids.key(msg.model, msg.epoch), {}).update(deploy=msg, plan=plan)
            await self._try_deploy(ids.key(msg.model, msg.epoch))
        elif isinstance(msg, Masks) and sender == "dealer":
            self._pending.setdefault(ids.key(msg.model, msg.epoch), {})["seed"] = msg.seed
            await self._try_deploy(ids.key(msg.model, msg.epoch))
        elif isinstance(msg, Commit) and sender == "model_owner":
            await self._commit(msg.model, msg.epoch)
        elif isinstance(msg, BundleAnnounce) and sender == "dealer":
            key = ids.key(msg.model, msg.epoch)
            if self.core_for(key) is None and key not in self._staged:
                raise StaleEpoch(f"bundle {msg.id[:8]} was made for {key}, which this server neither serves nor "
                                 "has staged")
            try:  # staged: the commit is on its way (the dealer may commit first)
                await asyncio.wait_for(self._event(key).wait(), self.settings.bundle_wait)
            except TimeoutError:
                raise ProtocolError(f"bundle {msg.id[:8]} is for {key}, which this server does not serve") from None
            core = self.core_for(key)
            if core is None:
                raise ProtocolError(f"bundle {msg.id[:8]} was made for {key}, not the current deployment")
            t0 = time.perf_counter()
            dealer = self.node.link("dealer")
            bid, nbytes = await receive_bundle(core, self.store, RemoteSource(msg, dealer),
                                               timeout=self.settings.bundle_wait)
            self._offline[bid] = (nbytes + dealer.wire_size("ctl:bundle", msg.encode()), time.perf_counter() - t0)
            self.pool.schedule_warm(key, msg.batch)
        elif isinstance(msg, GetPlan) and (sender in self.tenants or sender == "model_owner"):
            self._check_tenant(sender, self.current_key(msg.model))
            await self.node.tell(sender, PlanInfo(msg.model, self.epochs[msg.model], self.models[msg.model].plan.to_dict()))
        elif isinstance(msg, Offer) and sender in self.tenants and self.party == 0:
            await self._offered(sender, msg)
        elif isinstance(msg, Job) and sender in self.tenants:
            await self._job(sender, msg)
        else:
            raise ProtocolError(f"unexpected {msg.T} message from {sender}")

    def _check_tenant(self, sender: str, key: str) -> None:
        allowed = self._allowed.get(key, [])
        if sender != "model_owner" and allowed and sender not in allowed:
            raise UsageError(f"{sender} is not an allowed tenant of model {key.split('@')[0]!r}")

    def spawn(self, coro: Any, what: str = "background task") -> None:
        """Run ``coro`` in the background (cancelled when the service stops; failures logged)."""
        spawn(self._tasks, coro, log, f"{self.name}: {what}")

    def model(self, model: str) -> ServerCore:
        self.current_key(model)
        return self.models[model]

    async def _try_deploy(self, key: str) -> None:
        """Stage a deployment once both its weight shares and mask seed are in: open E with the peer
        (label ``deploy-<model>-<epoch>``), store it, tell the model owner. It serves only after commit."""
        p = self._pending.get(key, {})
        if "deploy" not in p or "seed" not in p:
            return
        del self._pending[key]
        dep: Deploy = p["deploy"]
        plan: Plan = p["plan"]
        core = ServerCore(self.party, plan)
        await drive(core.deploy(dep.weights(), model_mask_shares(plan, p["seed"])), self.node.link(self.peer),
                    f"deploy-{dep.model}-{dep.epoch}", timeout=self.settings.round_timeout)
        await asyncio.to_thread(save_model, self.state_dir, dep.model, dep.epoch, core)
        self._staged[key] = core
        self._allowed[key] = list(dep.tenants)
        log.info("%s: model %s epoch %s staged (%d ops)", self.name, dep.model, dep.epoch, len(plan.ops))
        await self.node.tell("model_owner", Deployed(dep.model, dep.epoch, self.name))

    async def _commit(self, model: str, epoch: str) -> None:
        key = ids.key(model, epoch)
        if self.epochs.get(model) != epoch:
            core = self._staged.get(key)  # stays staged until it serves: a bundle arriving meanwhile waits
            if core is None:
                raise UsageError(f"commit of {key}: no such staged deployment on {self.name}")
            old = self.epochs.get(model)
            await asyncio.to_thread(commit_model, self.state_dir, model, epoch)
            self.models[model], self.epochs[model] = core, epoch
            self._allowed = {k: v for k, v in self._allowed.items() if k.split("@")[0] != model or k == key}
            await asyncio.to_thread(write_private, self._acl_file(), json.dumps(self._allowed).encode())
            purged = self.store.purge(model, key)
            if old is not None:
                self._event(ids.key(model, old)).clear()
            self._staged.pop(key, None)
            self._event(key).set()
            log.info("%s: model %s now serves epoch %s (was %s; %d old bundles purged)", self.name, model, epoch,
                     old or "-", purged)
        await self.node.tell("model_owner", Committed(model, epoch, self.name))

    # ------------------------------------------------------------------- job
    async def _offered(self, tenant: str, msg: Offer) -> None:
        """A job offered to the server pairs reached this pair (the broker's shared subscription picked
        it): claim it, unless this pair already runs or holds ``max_jobs`` (then say nothing: the data
        owner offers it again and the broker hands it to another pair). A job this pair cannot serve
        (model, epoch, tenant) is refused with the reason, as a job itself would be."""
        now = time.monotonic()
        for j, (_, t) in list(self._claims.items()):
            if now - t > self.settings.claim_hold:
                del self._claims[j]
        if abs(time.time() - msg.sent) > self.settings.offer_age:
            log.warning("%s: dropped an offer of job %s from %s dated %.0f s from this clock (replayed, or a clock "
                        "far off)", self.name, msg.job[:8], tenant, time.time() - msg.sent)
            return
        if msg.job in self._claims:  # offered again (our claim may be on its way): say it again
            if self._claims[msg.job][0] == tenant:
                await self.node.tell(tenant, Claim(msg.job))
            return
        if msg.job in self._jobs or self.store.job_seen(msg.job):
            return
        key = self.current_key(msg.model)
        if msg.epoch != self.epochs[msg.model]:
            raise StaleEpoch(f"model {msg.model!r} was redeployed: {self.name} serves epoch {self.epochs[msg.model]}, "
                             f"the job was made for {msg.epoch}; ask for the plan again")
        self._check_tenant(tenant, key)
        if len(self._jobs) + len(self._claims) >= self.settings.max_jobs:
            log.debug("%s: busy (%d jobs); left job %s of %s to another pair", self.name, len(self._jobs) +
                     len(self._claims), msg.job[:8], tenant)
            return
        self._claims[msg.job] = (tenant, now)
        log.info("%s: took job %s of %s (offered to the pairs)", self.name, msg.job[:8], tenant)
        await self.node.tell(tenant, Claim(msg.job))

    async def _job(self, sender: str, msg: Job) -> None:
        job = msg.job
        if job in self._jobs or self.store.job_seen(job):
            raise ProtocolError(f"duplicate job id {job}")
        self._claims.pop(job, None)
        self._jobs[job] = sender
        try:  # a peer that stops or goes silent fails the job in seconds, not after a round timeout
            await self.node.guarded(self._run_job(sender, msg), [self.peer])
        finally:
            self._jobs.pop(job, None)

    async def _run_job(self, tenant: str, msg: Job) -> None:
        job, model, batch = msg.job, msg.model, msg.batch
        key = self.current_key(model)
        if msg.epoch != self.epochs[model]:
            raise StaleEpoch(f"model {model!r} was redeployed: this server serves epoch {self.epochs[model]}, the "
                             f"job was made for {msg.epoch}; ask for the plan again")
        self._check_tenant(tenant, key)
        core = self.models[model]
        core.layout(batch).check_budget(self.settings.max_job_bytes)
        (x,) = msg.arrays
        if x.shape != (batch, *core.plan.input_shape):
            raise UsageError(f"job {job}: input share does not match the model's input {core.plan.input_shape}")
        peer = self.node.link(self.peer)
        t_start = time.perf_counter()
        self._last_used[(key, batch)] = time.monotonic()
        log_start = len(peer.counters.log)
        if self.party == 0 and not self.pool.ready_count(key, batch):  # the data owner sees what it waits for
            self.spawn(self.node.tell(tenant, Progress(job, 0, len(core.plan.ops), "bundle")),
                       f"progress of job {job[:8]}")
        try:
            bid, prep, warm = await self.pool.agree(job, key, batch, core, peer, tenant)
        except BaseException:
            if self.party == 0:  # a failed agreement burns bundles: refill the pool all the same
                self.spawn(self.node.tell("dealer", PoolRequest(model, self.epochs[model], batch,
                                                                self.pool.ready_count(key, batch))), "refill")
            raise
        try:
            if warm is None:
                await asyncio.to_thread(prep.preload, self.settings.preload_bytes)
            stats = RunStats()
            n = len(core.plan.ops)

            async def progress(op: int) -> None:
                if self.party == 0:  # off the critical path: the round does not wait for it
                    self.spawn(self.node.tell(tenant, Progress(job, op, n)), f"progress of job {job[:8]}")

            t_run = time.perf_counter()
            out = await drive(core.run(prep, x), peer, job, stats, self.settings.round_timeout, on_op=progress,
                              costs=core.step_costs.setdefault(batch, []) if self.settings.inline_steps else None)
            t_done = time.perf_counter()
            log.info("%s: job %s of %s: %.3f s to start (bundle %s, %s), %.3f s for %d rounds (%.3f s computing)",
                     self.name, job[:8], tenant, t_run - t_start, bid[:8], "warm" if warm is not None else "cold",
                     t_done - t_run, stats.rounds, stats.compute_seconds)
            off_bytes, off_seconds = self._offline.pop(bid, (0, 0.0))
            h = self.health
            h.jobs.labels("ok").inc()
            h.job_seconds.labels("wait").observe(t_run - t_start)
            h.job_seconds.labels("online").observe(t_done - t_run)
            h.rounds.inc(stats.rounds)
            h.bytes.inc(stats.bytes_sent)
            h.offline_bytes.inc(off_bytes)
            await self.node.link(tenant).send(f"{job}:output", Output(  # only to the requester's own topic
                job, stats.rounds, stats.bytes_sent, off_bytes, off_seconds, t_run - t_start,
                [[i, s.seconds, s.bytes_sent, s.rounds] for i, s in sorted(stats.per_op.items())],
                [list(e) for e in peer.counters.log[log_start:]], (np.ascontiguousarray(out),),
                run_seconds=t_done - t_run, compute_seconds=stats.compute_seconds).encode())
        finally:
            self.pool.release(bid)
            self.pool.schedule_warm(key, batch)
            if self.party == 0:  # refill after the job, so the next bundle never competes with this job's rounds
                await self.node.tell("dealer", PoolRequest(model, self.epochs[model], batch,
                                                           self.pool.ready_count(key, batch)))


def main(party: str, argv: list[str] | None = None) -> int:
    import argparse

    from blindseg.node import run_service

    ap = argparse.ArgumentParser(prog=f"python -m {party}")
    ap.add_argument("--config", required=True)
    args = ap.parse_args(argv)

    async def go() -> None:
        await ServerService.from_config(PartyConfig.load(args.config, party)).serve()

    return run_service(go())
