"""The dealer as a long-running service (``python -m dealer --config dealer.toml``).

Keeps, per deployed model, ``pool`` ready bundles at the servers ahead of demand:
on ``ctl:plan`` it draws the deployment's mask seeds (once per ``model@epoch``,
persisted 0600 in its state dir so a restart can keep serving) and sends each
server its seed; on ``ctl:commit`` it switches the model to that epoch and
streams ``pool`` bundles; every ``ctl:used`` / ``ctl:need`` from server0 tops the
pool up again. The pool's size follows the measured throughput (:func:`pool_target`): when
jobs use bundles faster than one is made and sent, it grows to cover the bundles in the
making (up to ``max_pool``), so a stream of jobs (the slices of a CT) does not wait for
each bundle. Bundles are generated one at a time in a worker thread; the servers wait
for them (back-pressure), they never generate their own.

Several server pairs: one dealer serves every pair it has keys for (``server0``/``server1``,
``server0-<pair>``/``server1-<pair>``, ...). Each pair has its own mask seeds per deployment (the
model owner splits the weights afresh per pair too), so a server of one pair and one of another
hold unrelated shares even together, and its own pool, requested by that pair's server0.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from blindseg import ids
from blindseg.channel import Endpoint
from blindseg.config import PartyConfig, pair_label, parse_server, server_name, server_pairs
from blindseg.errors import BlindsegError, StoreFull, UsageError
from blindseg.health import Health
from blindseg.messages import Commit, Committed, Error, Masks, Message, Need, PlanMsg, PoolRequest
from blindseg.node import Node
from blindseg.plan import Plan, check_budget
from blindseg.state import check_private, private_dir, write_private

from .core import Dealer

log = logging.getLogger("blindseg.dealer")


async def stream_bundle(dealer: Dealer, model_id: str, batch: int, to0: Endpoint, to1: Endpoint,
                        announce: str = "ctl:bundle") -> tuple[str, float]:
    """Generate one job's bundles and send them: an announcement (seed) to each server, then
    server 1's corrections op by op as they are made (labels ``bundle:<id>:<op>``).
    Returns the bundle id and the dealer's compute seconds."""
    b0, b1 = dealer.new_bundle(model_id, batch)
    await to0.send(announce, b0.announce().encode())
    await to1.send(announce, b1.announce().encode())
    gen = dealer.corrections(b0, b1)
    busy = 0.0
    while True:
        t = time.perf_counter()
        msg = await asyncio.to_thread(next, gen, None)
        busy += time.perf_counter() - t
        if msg is None:
            return b0.bundle_id, busy
        await to1.send(f"bundle:{b1.bundle_id}:{msg.op}", msg.encode())


def pool_target(base: int, cap: int, bundle_seconds: float | None, job_interval: float | None) -> int:
    """Ready bundles to keep for one (pair, deployment, batch): at least ``base``; when jobs arrive
    every ``job_interval`` seconds and a bundle takes ``bundle_seconds`` to make and send, enough to
    cover the bundles still being made while jobs keep using them (ceil(bundle / interval) + 1), at
    most ``cap`` (the service's ``max_pool`` and ``max_pool_bytes`` of bundles at server1). A dealer
    slower than the jobs (bundle > interval) cannot keep up at any size: the pool then only delays the
    wait (by as many jobs as it holds), so it is capped like any other."""
    if not bundle_seconds or not job_interval or job_interval <= 0:
        return base
    return max(base, min(cap, math.ceil(bundle_seconds / job_interval) + 1))


class Rate:
    """Exponential moving average of a duration (weight ``alpha`` for the newest sample)."""

    def __init__(self, alpha: float = 0.3) -> None:
        self.alpha, self.value = alpha, 0.0

    def add(self, x: float) -> float:
        self.value = x if not self.value else self.alpha * x + (1 - self.alpha) * self.value
        return self.value


class DealerService:
    """Deployments are staged on ``ctl:plan`` (masks drawn once per ``model@epoch``, persisted) and
    switched on ``ctl:commit`` (the model's other epochs are forgotten, the pool fills). Pool requests
    and queued bundles of a deployment that is not the current one are dropped."""

    max_bundle_bytes = 8 << 30  # a plan whose batch-1 bundle would be larger is refused
    max_pool = 8  # the most ready bundles the throughput sizing asks a server pair to hold
    max_pool_bytes = 16 << 30  # ... and the most bytes of them at server1 (a 512² bundle is ~5.5 GB)
    stream_gap = 120.0  # "used" reports further apart than this are separate bursts, not a job rate

    def __init__(self, node: Node, state_dir: Path, pool: int = 2, metrics_address: str = "",
                 in_use_for: float = 3600.0, max_pool: int | None = None) -> None:
        if pool < 0 or (max_pool is not None and max_pool < max(pool, 1)):
            raise UsageError(f"pool {pool} / max_pool {max_pool}: need 0 <= pool <= max_pool, max_pool >= 1")
        self.node, self.pool = node, pool
        if max_pool is not None:
            self.max_pool = max_pool
        self.metrics_address, self.in_use_for = metrics_address, in_use_for
        self.pairs = server_pairs(node.links)
        if not self.pairs:
            raise UsageError(f"{node.where}: the dealer needs the keys of at least one server pair (server0, server1)")
        self.dealers = {p: Dealer() for p in self.pairs}  # one per server pair: its own masks per deployment
        self.bundles_made = 0
        self._in_use: dict[str, dict[int, float]] = {}  # model -> batch size -> monotonic time last requested
        self._full_until: dict[tuple[str, str], float] = {}  # (pair, model) -> until when a store said it is full
        self.full_backoff = 10.0  # seconds before bundles for a full store are tried again
        self.health = Health("dealer", node.deployment)
        self.health.info = self._status
        self.health.checks.append(lambda: None if self.node.connected() else "not connected to the broker")
        self.state = state_dir / "models.json"
        self.current: dict[str, str] = {}  # model -> its committed epoch
        self.dealer_seconds = 0.0  # compute time of the bundles made so far
        self._work: asyncio.Queue[tuple[str, str, int]] = asyncio.Queue()
        # bundles queued or being streamed, per (pair, deployment, batch)
        self._pending: dict[tuple[str, str, int], int] = {}
        # throughput sizing: seconds per bundle (making and sending it) and between used bundles (jobs)
        self._bundle_rate: dict[tuple[str, int], Rate] = {}
        self._bundle_bytes: dict[tuple[str, int], int] = {}
        self._job_rate: dict[tuple[str, str, int], Rate] = {}
        self._last_used: dict[tuple[str, str, int], float] = {}
        private_dir(state_dir)
        if self.state.exists():
            check_private(self.state)
            data = json.loads(self.state.read_text())
            self.current = dict(data.get("current", {}))
            saved = {"": data.get("deployments", {}), **data.get("pairs", {})}
            for pair, deployments in saved.items():
                for k, m in deployments.items() if pair in self.dealers else ():
                    self.dealers[pair].restore(k, Plan.from_dict(m["plan"]), bytes.fromhex(m["s0"]),
                                               bytes.fromhex(m["s1"]))

    def __repr__(self) -> str:
        return f"DealerService({self.node.deployment}, current={self.current})"

    @staticmethod
    def from_config(cfg: PartyConfig, pool: int = 2, max_pool: int | None = None) -> DealerService:
        if cfg.party != "dealer":
            raise UsageError(f"{cfg.path}: not a dealer config")
        return DealerService(Node.from_config(cfg), cfg.state_dir, pool, cfg.metrics_address, cfg.pool_expiry, max_pool)

    @property
    def dealer(self) -> Dealer:
        """The first server pair's dealer."""
        return self.dealers[self.pairs[0]]

    def _persist(self) -> None:
        def saved(d: Dealer) -> dict[str, Any]:
            return {k: {"plan": plan.to_dict(), "s0": s0.hex(), "s1": s1.hex()} for k, (plan, s0, s1) in d.models().items()}

        data = {"current": self.current, "deployments": saved(self.dealers[""]) if "" in self.dealers else {},
                "pairs": {p: saved(d) for p, d in self.dealers.items() if p}}
        write_private(self.state, json.dumps(data).encode())

    def _status(self, reader: str) -> dict[str, Any]:
        pending: dict[str, dict[str, int]] = {}
        for (pair, k, b), n in sorted(self._pending.items()):
            if n:
                where = pending.setdefault(k if not pair else f"{k} (pair {pair})", {})
                where[str(b)] = where.get(str(b), 0) + n
        targets = {f"{k} batch {b}" + (f" (pair {pair})" if pair else ""): self.target((pair, k, b))
                   for (pair, k, b) in sorted(self._job_rate)}
        return {"models": dict(self.current), "pairs": [pair_label(p) for p in self.pairs], "pool_target": self.pool,
                "pool_targets": targets,
                "bundles_made": self.bundles_made,
                "bundle_seconds_total": round(self.dealer_seconds, 3), "queued": pending,
                "batch_sizes_in_use": {m: sorted(v) for m, v in self._in_use.items()}}

    def target(self, key: tuple[str, str, int]) -> int:
        """Ready bundles to keep for ``key`` = (pair, deployment, batch): :func:`pool_target` from the
        measured bundle time and job interval (``pool`` until both are known; a dealer with no pool,
        ``pool=0``, makes only the bundles asked for)."""
        bundle, jobs = self._bundle_rate.get(key[1:]), self._job_rate.get(key)
        room = self.max_pool_bytes // max(1, self._bundle_bytes.get(key[1:], 1))
        cap = max(self.pool, min(self.max_pool, room)) if self.pool else 0
        return pool_target(self.pool, cap, bundle.value if bundle else None, jobs.value if jobs else None)

    def _job_used(self, key: tuple[str, str, int]) -> None:
        now = time.monotonic()
        last = self._last_used.get(key)
        self._last_used[key] = now
        if last is not None and now - last < self.stream_gap:
            self._job_rate.setdefault(key, Rate()).add(now - last)

    def batches_in_use(self, model: str) -> list[int]:
        """Batch sizes server0 asked for within ``in_use_for`` seconds (pre-warmed after a redeploy)."""
        now = time.monotonic()
        return sorted(b for b, t in self._in_use.get(model, {}).items() if now - t < self.in_use_for)

    async def serve(self) -> None:
        probes = await self.health.serve_probes(self.metrics_address)
        self.node.announce(self.health.document, self.health.interval)
        await self.node.start()
        worker = asyncio.get_running_loop().create_task(self._generate())
        log.info("dealer serving deployment %s (pool %d per model)", self.node.deployment, self.pool)
        try:
            while True:
                sender, msg = await self.node.next_control()
                try:
                    await self._handle(sender, msg)
                except BlindsegError as e:
                    log.warning("dealer: %s from %s failed: %s", msg.T, sender, e)
                    self.health.failed(msg.T, e, who=sender)
                except Exception as e:  # a bug, never a reason to stop serving
                    log.exception("dealer: internal error handling %s from %s", msg.T, sender)
                    self.health.failed(msg.T, e, who=sender)
        finally:
            worker.cancel()
            await self.node.goodbye(self.health.goodbye("stopped"))
            if probes is not None:
                probes.close()
            await self.node.close()

    async def _handle(self, sender: str, msg: Message) -> None:
        if isinstance(msg, PlanMsg) and sender == "model_owner":
            k = ids.key(msg.model, msg.epoch)
            plan = Plan.from_dict(msg.plan)
            check_budget(plan, self.max_bundle_bytes)
            seeds = {p: d.deploy(k, plan) for p, d in self.dealers.items()}  # the same again for a repeated plan
            await asyncio.to_thread(self._persist)
            for pair, (s0, s1) in seeds.items():
                await self.node.tell(server_name(0, pair), Masks(msg.model, msg.epoch, s0))
                await self.node.tell(server_name(1, pair), Masks(msg.model, msg.epoch, s1))
        elif isinstance(msg, Commit) and sender == "model_owner":
            k = ids.key(msg.model, msg.epoch)
            if any(k not in d.models() for d in self.dealers.values()):
                raise UsageError(f"commit of {k}: no such staged deployment at the dealer")
            if self.current.get(msg.model) != msg.epoch:
                self.current[msg.model] = msg.epoch
                for d in self.dealers.values():
                    for other in [o for o in d.models() if o.split("@")[0] == msg.model and o != k]:
                        d.forget(other)
                await asyncio.to_thread(self._persist)
                log.info("dealer: model %s now serves epoch %s", msg.model, msg.epoch)
                for b in self.batches_in_use(msg.model) or [1]:  # the sizes jobs use now, warm at once
                    for pair in self.pairs:
                        for _ in range(self.pool):
                            self.request(k, b, pair)
            await self.node.tell("model_owner", Committed(msg.model, msg.epoch, "dealer"))
        elif isinstance(msg, PoolRequest) and (who := parse_server(sender)) and who[0] == 0 and who[1] in self.dealers:
            if self.current.get(msg.model) != msg.epoch:
                raise UsageError(f"pool request for {msg.model}@{msg.epoch}, which is not the current deployment")
            # top the pair's pool up to its target (server0's count + those queued or in flight here:
            # `pool`, or more when jobs use bundles faster than one is made); a job that waited always
            # gets one, whatever the count says
            key = (who[1], ids.key(msg.model, msg.epoch), msg.batch)
            self._in_use.setdefault(msg.model, {})[msg.batch] = time.monotonic()
            if not isinstance(msg, Need):
                self._job_used(key)
            want = self.target(key) - msg.ready - self._pending.get(key, 0)
            n = max(want, 1 if isinstance(msg, Need) and not self._pending.get(key) else 0)
            log.info("dealer: %s from %s for %s batch %d (%d ready there): %d more", msg.T, sender, key[1], msg.batch,
                     msg.ready, n)
            for _ in range(n):
                self.request(key[1], msg.batch, key[0])
        elif isinstance(msg, Error) and (who := parse_server(sender)) and msg.code == StoreFull.code:
            # the server refused the bundle and removed what it had of it; try again later, by ourselves
            self._full_until[(who[1], str(msg.model))] = time.monotonic() + self.full_backoff
            log.warning("dealer: %s: %s; new bundles for %s wait %.0f s", sender, msg.error, msg.model,
                        self.full_backoff)
        else:
            raise UsageError(f"unexpected {msg.T!r} from {sender}")

    def request(self, deployment: str, batch: int, pair: str = "") -> None:
        """Queue one more bundle for (deployment, batch) at server pair ``pair``."""
        key = (pair, deployment, batch)
        self._pending[key] = self._pending.get(key, 0) + 1
        self._work.put_nowait(key)

    async def _generate(self) -> None:
        while True:
            pair, k, batch = await self._work.get()
            try:
                model, epoch = ids.split(k)
                if self.current.get(model) != epoch:
                    continue  # superseded by a redeploy while queued
                wait = self._full_until.get((pair, model), 0.0) - time.monotonic()
                if wait > 0:  # a store is full: queue it again after the back-off (it heals by itself)
                    asyncio.get_running_loop().call_later(wait, self.request, k, batch, pair)
                    continue
                t0, to1 = time.monotonic(), self.node.link(server_name(1, pair))
                sent = to1.counters.bytes_sent
                bid, secs = await stream_bundle(self.dealers[pair], k, batch, self.node.link(server_name(0, pair)), to1)
                self._bundle_rate.setdefault((k, batch), Rate()).add(time.monotonic() - t0)
                self._bundle_bytes[(k, batch)] = to1.counters.bytes_sent - sent
                self.dealer_seconds += secs
                self.bundles_made += 1
                self.health.bundles.inc()
                self.health.bundle_seconds.observe(secs)
                log.info("dealer: bundle %s for %s batch %d%s in %.2f s", bid[:8], k, batch,
                         f" (pair {pair})" if pair else "", secs)
            except BlindsegError as e:
                log.warning("dealer: bundle for %s failed: %s", k, e)
            except Exception:  # a bug in one bundle never stops the pool
                log.exception("dealer: internal error making a bundle for %s", k)
            finally:
                self._pending[(pair, k, batch)] -= 1


def main(argv: list[str] | None = None) -> int:
    import argparse

    from blindseg.node import run_service

    ap = argparse.ArgumentParser(prog="python -m dealer")
    ap.add_argument("--config", required=True)
    ap.add_argument("--pool", type=int, default=2, help="ready bundles kept per model")
    ap.add_argument("--max-pool", type=int, default=DealerService.max_pool,
                    help="the most ready bundles the throughput sizing may keep per model (= --pool: a fixed pool)")
    args = ap.parse_args(argv)

    async def go() -> Any:
        await DealerService.from_config(PartyConfig.load(args.config, "dealer"), args.pool, args.max_pool).serve()

    return run_service(go())
