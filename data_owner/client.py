"""``python -m data_owner segment``: the hospital's client.

Steps per batch of slices: ask a server for the model's public plan (once),
apply the model owner's preprocessing from the plan metadata, encode and split
the batch, send each server its share (``ctl:job``), follow server0's progress,
take both output shares (``<job>:output``) and reconstruct the mask. Only this
process ever holds the image or the mask in the clear.

With several server pairs among its peers, each job is first offered to all of them through the
broker (``ctl:offer`` on the shared subscription: the broker hands it to one pair's server0); the
first pair that claims it (``ctl:claim``) gets the shares and the job is pinned to it. A busy pair
does not claim; the offer is repeated every ``offer_interval`` seconds, so it reaches another pair.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np

from blindseg import intensity
from blindseg.channel import Frame
from blindseg.config import PartyConfig, pair_label, parse_server, server_name, server_pairs
from blindseg.errors import ConnectionLost, PeerRestarted, ProtocolError, StaleEpoch, UsageError
from blindseg.layout import Layout
from blindseg.messages import Claim, Error, GetPlan, Job, Message, Offer, Output, PlanInfo, Progress, expect
from blindseg.node import Node
from blindseg.plan import Plan
from blindseg.report import layer_rows

from . import check_input_range, reconstruct, share_image, validate_image

log = logging.getLogger("blindseg.data_owner")


class Client:
    """A connected data owner; run several :meth:`segment` calls concurrently if you like."""

    def __init__(self, cfg: PartyConfig | Node, timeout: float | None = None) -> None:
        self.node = cfg if isinstance(cfg, Node) else Node.from_config(cfg)
        default = 600.0 if isinstance(cfg, Node) else cfg.job_timeout
        self.timeout = timeout if timeout is not None else default
        self.pairs = server_pairs(self.node.links)  # the server pairs this tenant may send jobs to
        if not self.pairs:
            raise UsageError(f"{self.node.where}: no server pair (server0, server1) among this party's peers")
        self.offer_interval = 0.5  # seconds between offers of a job no pair has claimed yet
        self.claim_timeout = 60.0  # seconds a job may wait for a pair to take it
        self.taken: dict[str, int] = {}  # pair -> jobs it took (several pairs), for reports
        self._claims: dict[str, asyncio.Future[str]] = {}
        self._waiters: dict[str, asyncio.Future[PlanInfo]] = {}
        self._plan_locks: dict[str, asyncio.Lock] = {}
        self._progress: dict[str, Callable[[int, int, str], None]] = {}
        self._errors: dict[str, asyncio.Future[None]] = {}
        self._pump: asyncio.Task[None] | None = None
        self.plans: dict[str, Plan] = {}
        self.epochs: dict[str, str] = {}  # model -> the deployment its plan came from

    async def __aenter__(self) -> Client:
        await self.node.start()
        self._pump = asyncio.get_running_loop().create_task(self._dispatch())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._pump is not None:
            self._pump.cancel()
        await self.node.close()

    async def _dispatch(self) -> None:
        while True:
            sender, msg = await self.node.next_control()
            try:
                self._on_control(sender, msg)
            except Exception:  # a bug (e.g. in a progress callback) must not stop every later job's replies
                log.exception("data owner: error handling %s from %s", msg.T, sender)

    def _on_control(self, sender: str, msg: Message) -> None:
        if isinstance(msg, Claim) and msg.job in self._claims and not self._claims[msg.job].done():
            who = parse_server(sender)
            if who is not None and who[0] == 0 and who[1] in self.pairs:  # only a pair's server0 claims
                self._claims[msg.job].set_result(who[1])
        elif isinstance(msg, Progress) and msg.job in self._progress:
            self._progress[msg.job](msg.op, msg.ops, msg.phase)
        elif isinstance(msg, Error):
            # a job's error goes to that job only (a late one for a finished job is dropped); a request's
            # error (no job) to whoever waits for that model's plan
            fut: asyncio.Future[Any] | None = (self._errors.get(msg.job) if msg.job
                                               else self._waiters.get(msg.model or ""))
            if fut is not None and not fut.done():
                err = StaleEpoch if msg.code == StaleEpoch.code else ProtocolError
                fut.set_exception(err(f"{sender}: {msg.error}"))
        elif isinstance(msg, PlanInfo) and msg.model in self._waiters and not self._waiters[msg.model].done():
            self._waiters[msg.model].set_result(msg)

    async def plan(self, model: str, timeout: float = 30.0) -> Plan:
        """The model's public plan, asked of server0 (re-asked every 2 s: a request can be lost while a
        party reconnects to the broker; asking is idempotent). With several pairs each ask goes to the
        next pair's server0 (every pair serves the same plans), so one pair being down costs 2 s."""
        async with self._plan_locks.setdefault(model, asyncio.Lock()):  # concurrent jobs ask once
            if model not in self.plans:
                self.plans[model], self.epochs[model] = await self._fetch_plan(model, timeout)
        return self.plans[model]

    async def _fetch_plan(self, model: str, timeout: float) -> tuple[Plan, str]:
        fut: asyncio.Future[PlanInfo] = asyncio.get_running_loop().create_future()
        self._waiters[model] = fut
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        asks = 0
        try:
            while True:
                await self.node.tell(server_name(0, self.pairs[asks % len(self.pairs)]), GetPlan(model))
                asks += 1
                try:
                    h = await asyncio.wait_for(asyncio.shield(fut), min(2.0, max(0.01, deadline - loop.time())))
                    return Plan.from_dict(h.plan), h.epoch
                except TimeoutError:
                    if loop.time() >= deadline:
                        raise ConnectionLost(f"{' / '.join(server_name(0, p) for p in self.pairs)} did not answer "
                                             f"within {timeout:.0f} s: is it running?") from None
        finally:
            self._waiters.pop(model, None)

    async def segment(self, model: str, raw: np.ndarray, progress: Callable[[int, int, str], None] | None = None,
                      retries: int = 0) -> tuple[np.ndarray, dict[str, Any]]:
        """One job: ``raw`` N x C x H x W in the scanner's units -> (N x H x W labels, costs).

        ``retries``: on a failed job, try again with fresh shares and a fresh bundle (always safe: a
        failed attempt revealed only openings masked by a bundle that is never used again)."""
        attempt, refreshed, restarts = 0, False, 0
        while True:
            try:
                return await self._segment_once(model, raw, progress)
            except PeerRestarted as e:
                # the restart voided this attempt's frames (e.g. a retry that raced the restarted server's new
                # session): with retries allowed, try again on the new session, up to 3 times, uncounted
                if retries == 0 or restarts >= 3:
                    raise
                restarts += 1
                log.warning("job failed (%s); retrying on its new session", e)
            except StaleEpoch as e:  # the model was redeployed since we fetched its plan: once, with the new one
                if refreshed:
                    raise
                refreshed = True
                self.plans.pop(model, None)
                log.warning("%s; fetching the new plan", e)
            except (ProtocolError, ConnectionLost) as e:
                if attempt >= retries:
                    raise
                attempt += 1
                log.warning("job failed (%s); retrying with a fresh bundle", e)

    async def _segment_once(self, model: str, raw: np.ndarray, progress: Callable[[int, int, str], None] | None
                            ) -> tuple[np.ndarray, dict[str, Any]]:
        plan = await self.plan(model)
        x = intensity.apply(plan.meta.get("preprocess"), raw)
        x, clipped = check_input_range(plan, validate_image(plan, x))  # refused here, before anything is shared
        if clipped:
            log.warning("%d voxels outside the model's calibrated range were clipped (the model owner allows it)",
                        clipped)
        job = uuid.uuid4().hex
        err: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._errors[job] = err
        if progress is not None:
            self._progress[job] = progress
        t0 = time.perf_counter()
        try:
            pair = await self._take(job, model, int(x.shape[0]), err)
            servers = (server_name(0, pair), server_name(1, pair))
            x0, x1 = share_image(plan, x)
            # both shares go out at once, and a server's refusal ends the job even while the other is not
            # answering (e.g. a handshake with a stopped server)
            outs = asyncio.gather(
                *(self.node.tell(s, Job(job, model, self.epochs[model], int(x.shape[0]), (xs,)))
                  for s, xs in zip(servers, (x0, x1), strict=True)),
                *(self.node.link(s).recv(f"{job}:output", self.timeout) for s in servers))
            # a server that stops or goes silent ends the job in seconds (its presence), not after job_timeout
            both = asyncio.wait({err, outs}, return_when=asyncio.FIRST_COMPLETED)  # type: ignore[arg-type,type-var]
            try:
                done, _ = await self.node.guarded(both, servers)
            except ConnectionLost:
                outs.cancel()
                outs.add_done_callback(lambda f: f.cancelled() or f.exception())
                raise
            if err in done:
                outs.cancel()
                outs.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved: no warning
                err.result()
            frames: list[Frame] = outs.result()[2:]  # type: ignore[assignment]
            sent_in = next(n for lab, n in reversed(self.node.link(servers[0]).counters.log) if lab == "ctl:job")
            outs_ = [expect(f, Output) for f in frames]
            mask = reconstruct(plan, outs_[0].arrays[0], outs_[1].arrays[0])
            online = time.perf_counter() - t0
            layout = Layout.of(plan, int(x.shape[0]))  # offline bytes per op follow from the public plan
            offline = {i: layout.correction_bytes(i) for i in range(len(plan.ops))}
            try:
                per_op = [{int(i): (float(sec), int(nb), int(r)) for i, sec, nb, r in o.ops} for o in outs_]
                logs = [[(str(lab), int(n)) for lab, n in o.log] for o in outs_]
            except (TypeError, ValueError):
                raise ProtocolError("a server's cost report is malformed") from None
            cost = {"online_seconds": online, "layers": layer_rows(plan, per_op, offline), "rounds": outs_[0].rounds,
                    "server_bytes": [o.bytes for o in outs_], "offline_bytes": [o.offline_bytes for o in outs_],
                    "offline_seconds": max(o.offline_seconds for o in outs_), "round_log": logs,
                    "wait_seconds": max(o.wait_seconds for o in outs_),
                    "server_run_seconds": [o.run_seconds for o in outs_],
                    "server_compute_seconds": [o.compute_seconds for o in outs_],
                    "io_frames": [sent_in, len(frames[0])], "output_bytes": [len(f) for f in frames],
                    "clipped_voxels": clipped, "pair": pair_label(pair)}
            return mask, cost
        finally:
            self._errors.pop(job, None)
            self._progress.pop(job, None)

    async def _take(self, job: str, model: str, batch: int, err: asyncio.Future[None]) -> str:
        """The server pair that runs ``job``: the only one, or the first to claim the offer (offered
        again every ``offer_interval`` s until one does; a pair's refusal, e.g. a stale epoch, ends it)."""
        if len(self.pairs) == 1:
            return self.pairs[0]
        claim: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._claims[job] = claim
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.claim_timeout
        offer = Offer(job, model, self.epochs[model], batch, time.time())
        to = [server_name(0, p) for p in self.pairs]
        try:
            while True:
                await self.node.offer(offer, to)
                waits: set[asyncio.Future[Any]] = {claim, err}
                done, _ = await asyncio.wait(waits, timeout=self.offer_interval, return_when=asyncio.FIRST_COMPLETED)
                if err in done:
                    err.result()
                if claim in done:
                    pair = claim.result()
                    self.taken[pair_label(pair)] = self.taken.get(pair_label(pair), 0) + 1
                    return pair
                if loop.time() > deadline:
                    raise ConnectionLost(f"no server pair took job {job[:8]} within {self.claim_timeout:.0f} s "
                                         f"(pairs {', '.join(map(pair_label, self.pairs))}: all busy, or down?)")
        finally:
            self._claims.pop(job, None)
