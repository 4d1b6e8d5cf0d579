"""The compute server as a long-running service (``python -m server0`` / ``python -m server1``).

Same code for both parties; the config's ``party`` picks the index. State
under ``state_dir``: deployed models (``models/<id>.npz`` + plan JSON) and the
bundle store (:mod:`blindseg.store`). Per job:

1. the data owner's ``ctl:job`` brings this server's input share;
2. server0 picks the oldest ready bundle for (model, batch) -- waiting, never
   generating, if there is none -- and tells server1 which (``<job>:bundle``);
3. both consume it durably (single use), run the plan with the peer
   (labels ``<job>:<op>:<round>``), server0 reports progress per op;
4. each sends its output share to the data owner (``<job>:output``) and drops
   the bundle's data; server0 asks the dealer for a replacement.
Any failure ends the job with ``ctl:error`` to the data owner; the service goes on.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from dealer.core import model_mask_shares

from .config import PartyConfig
from .engine import parse_weights
from .errors import BlindsegError, PreprocessingExhausted, ProtocolError, UsageError
from .node import Node
from .plan import Plan
from .server import LinearState, Prepared, RunStats, ServerCore, drive, receive_bundle
from .store import BundleStore
from .wire import decode_frame, encode_frame

log = logging.getLogger("blindseg.server")


class ServerService:
    def __init__(self, cfg: PartyConfig) -> None:
        if cfg.party not in ("server0", "server1"):
            raise UsageError(f"{cfg.path}: a server config needs party server0 or server1")
        self.cfg = cfg
        self.party = int(cfg.party[-1])
        self.peer = f"server{1 - self.party}"
        self.node = Node(cfg)
        self.store = BundleStore(cfg.state_dir / "bundles")
        self.models: dict[str, ServerCore] = {}
        self._deployed: dict[str, asyncio.Event] = {}
        self._pending: dict[str, dict[str, Any]] = {}
        self._jobs: set[str] = set()  # jobs in progress (finished ones are in the store)
        self._reserved: set[str] = set()
        self._warm: dict[str, Prepared | None] = {}  # bundle -> material expanded ahead of its job
        self._offline: dict[str, tuple[int, float]] = {}  # bundle -> (bytes received, seconds), this run
        self._tasks: set[asyncio.Task[None]] = set()
        self.bundle_wait, self.round_timeout = cfg.bundle_wait, cfg.round_timeout
        self._load_models()

    # ------------------------------------------------------------ model state
    def _model_dir(self) -> Path:
        d = self.cfg.state_dir / "models"
        d.mkdir(parents=True, exist_ok=True)
        return d

    def _save_model(self, model: str, core: ServerCore) -> None:
        d = self._model_dir()
        arrays: dict[str, np.ndarray] = {}
        for i, st in core.model.items():
            arrays[f"e{i}"], arrays[f"w{i}"] = st.e, st.w_online
            if st.bias is not None:
                arrays[f"b{i}"] = st.bias
        tmp = d / f"{model}.npz.tmp"
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)  # type: ignore[arg-type]
        (d / f"{model}.plan.json").write_text(json.dumps(core.plan.to_dict()))
        tmp.replace(d / f"{model}.npz")

    def _load_models(self) -> None:
        for npz in sorted(self._model_dir().glob("*.npz")):
            model = npz.name[:-4]
            plan = Plan.from_dict(json.loads((npz.parent / f"{model}.plan.json").read_text()))
            core = ServerCore(self.party, plan)
            with np.load(npz) as z:
                for i in plan.linear_ops():
                    core.model[i] = LinearState(z[f"e{i}"], z[f"w{i}"], z[f"b{i}"] if f"b{i}" in z else None)
            self.models[model] = core
            self._event(model).set()

    def _event(self, model: str) -> asyncio.Event:
        return self._deployed.setdefault(model, asyncio.Event())

    # ------------------------------------------------------------------ loop
    async def serve(self) -> None:
        await self.node.start()
        log.info("%s serving deployment %s (%d models)", self.cfg.party, self.cfg.deployment, len(self.models))
        try:
            while True:
                sender, kind, frame = await self.node.next_control()
                self._spawn(self._handle(sender, kind, frame))
        finally:
            for t in list(self._tasks):
                t.cancel()
            await self.node.close()
            self.store.close()

    async def _handle(self, sender: str, kind: str, frame: bytes) -> None:
        header: dict[str, Any] = {}
        try:
            header, arrays = decode_frame(frame)
            if kind == "deploy" and sender == "model_owner":
                self._pending.setdefault(str(header["model"]), {})["weights"] = (header, frame)
                await self._try_deploy(str(header["model"]))
            elif kind == "masks" and sender == "dealer":
                self._pending.setdefault(str(header["model"]), {})["seed"] = bytes(header["seed"])
                await self._try_deploy(str(header["model"]))
            elif kind == "bundle" and sender == "dealer":
                model = str(header["model"])
                await asyncio.wait_for(self._event(model).wait(), self.bundle_wait)
                t0 = time.perf_counter()
                bid, sealed = await receive_bundle(self.models[model], self.store, frame, self.node.link("dealer"),
                                                   timeout=self.bundle_wait, announced_as="ctl:bundle")
                self._offline[bid] = (sealed, time.perf_counter() - t0)
                self._schedule_warm(model, int(header["batch"]))
            elif kind == "getplan":
                core = self._model(str(header["model"]))
                await self.node.tell(sender, "planinfo", {"model": header["model"], "plan": core.plan.to_dict()})
            elif kind == "job" and sender == "data_owner":
                await self._job(header, arrays)
            else:
                raise ProtocolError(f"unexpected control message {kind!r} from {sender}")
        except (BlindsegError, KeyError, TypeError, ValueError, TimeoutError) as e:
            reason = str(e) if isinstance(e, BlindsegError) else f"{kind} failed: {e.__class__.__name__}"
            log.warning("%s: %s from %s: %s", self.cfg.party, kind, sender, reason)
            if sender in ("data_owner", "model_owner"):
                try:
                    await self.node.tell(sender, "error", {"job": header.get("job"), "model": header.get("model"),
                                                           "error": reason, "party": self.cfg.party})
                except BlindsegError:
                    pass

    def _spawn(self, coro: Any) -> None:
        """Run ``coro`` in the background; it is cancelled when the service stops."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _model(self, model: str) -> ServerCore:
        if model not in self.models:
            raise UsageError(f"model {model!r} is not deployed on {self.cfg.party}")
        return self.models[model]

    async def _try_deploy(self, model: str) -> None:
        p = self._pending.get(model, {})
        if "weights" not in p or "seed" not in p:
            return
        del self._pending[model]
        header, frame = p["weights"]
        plan = Plan.from_dict(header["plan"])
        core = ServerCore(self.party, plan)
        weights = parse_weights(frame)
        masks = model_mask_shares(plan, p["seed"])
        await drive(core.deploy(weights, masks), self.party, self.node.link(self.peer), f"deploy-{model}",
                    timeout=self.round_timeout)
        await asyncio.to_thread(self._save_model, model, core)
        self.models[model] = core
        self._event(model).set()
        log.info("%s: model %s deployed (%d ops)", self.cfg.party, model, len(plan.ops))
        await self.node.tell("model_owner", "deployed", {"model": model, "party": self.cfg.party})

    # ------------------------------------------------------------------- job
    async def _job(self, header: dict[str, Any], arrays: list[np.ndarray]) -> None:
        job, model, batch = str(header["job"]), str(header["model"]), int(header["batch"])
        if not job.isalnum() or len(job) > 64:
            raise ProtocolError("job id must be 1-64 alphanumeric characters")
        if job in self._jobs or self.store.job_seen(job):
            raise ProtocolError(f"duplicate job id {job}")
        self._jobs.add(job)
        try:
            await self._run_job(job, model, batch, arrays)
        finally:
            self._jobs.discard(job)

    async def _run_job(self, job: str, model: str, batch: int, arrays: list[np.ndarray]) -> None:
        core = self._model(model)
        if len(arrays) != 1 or arrays[0].shape != (batch, *core.plan.input_shape):
            raise UsageError(f"job {job}: input share does not match the model's input {core.plan.input_shape}")
        peer = self.node.link(self.peer)
        t_start = time.perf_counter()
        bid, prep, warm = await self._agree_bundle(job, model, batch, core, peer)
        try:
            if warm is None:
                await asyncio.to_thread(prep.preload)
            stats = RunStats()
            n = len(core.plan.ops)

            async def progress(op: int) -> None:
                if self.party == 0:  # off the critical path: the round does not wait for it
                    self._spawn(self.node.tell("data_owner", "progress", {"job": job, "op": op, "ops": n}))

            t_run = time.perf_counter()
            out = await drive(core.run(prep, arrays[0]), self.party, peer, job, stats, self.round_timeout,
                              on_op=progress)
            log.info("%s: job %s: %.3f s to start (bundle %s, %s), %.3f s for %d rounds", self.cfg.party, job[:8],
                     t_run - t_start, bid[:8], "warm" if warm is not None else "cold", time.perf_counter() - t_run,
                     stats.rounds)
            off_bytes, off_seconds = self._offline.pop(bid, (0, 0.0))
            await self.node.link("data_owner").send(
                f"{job}:output", encode_frame({"t": "output", "job": job, "rounds": stats.rounds,
                                               "bytes": stats.bytes_sent,
                                               "offline_bytes": off_bytes, "offline_seconds": off_seconds,
                                               "ops": [[i, s.seconds, s.bytes_sent, s.rounds]
                                                       for i, s in sorted(stats.per_op.items())]},
                                              [np.ascontiguousarray(out)]))
        finally:
            self.store.discard(bid)
            self._reserved.discard(bid)
            self._schedule_warm(model, batch)
            if self.party == 0:  # refill after the job, so the next bundle never competes with this job's rounds
                await self.node.tell("dealer", "used", {"model": model, "batch": batch,
                                                        "ready": self._ready_count(model, batch)})

    async def _agree_bundle(self, job: str, model: str, batch: int, core: ServerCore, peer: Any
                            ) -> tuple[str, Prepared, Prepared | None]:
        """Both servers consume the same bundle, durably, before any opening.

        server0 proposes its oldest ready bundle (``<job>:bundle:<k>``); server1 consumes it if it has
        it ready and acknowledges (``<job>:ack:<k>``); only then does server0 consume its own copy.
        A bundle server1 cannot use (lost in a crash mid-transfer) is burnt at server0 too and the
        next one is proposed, up to 3 times.
        """
        for k in range(3):
            if self.party == 0:
                try:
                    bid = await self._pick_bundle(model, batch)
                except BlindsegError as e:  # tell server1 at once instead of letting it time out
                    await peer.send(f"{job}:bundle:{k}", encode_frame({"t": "use", "abort": str(e)}))
                    raise
                await peer.send(f"{job}:bundle:{k}", encode_frame({"t": "use", "bundle": bid}))
                try:
                    h, _ = decode_frame(await peer.recv(f"{job}:ack:{k}", self.round_timeout))
                except BaseException:
                    self._burn(bid, job)  # server1 may have consumed it: never propose it again
                    raise
                if not h.get("ok"):
                    log.warning("server0: server1 cannot use bundle %s (%s); burning it", bid[:8], h.get("why"))
                    self._burn(bid, job)
                    continue
                warm = self._warm.pop(bid, None)
                return bid, core.begin(self.store, bid, job, warm), warm
            h, _ = decode_frame(await peer.recv(f"{job}:bundle:{k}", self.bundle_wait + self.round_timeout))
            if "abort" in h:
                raise ProtocolError(f"job {job} aborted by server0: {h['abort']}")
            bid = str(h["bundle"])
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.round_timeout / 2  # answer before server0 gives up on the ack
            while self.store.state(bid) == "receiving" and loop.time() < deadline:
                await asyncio.sleep(0.05)  # still arriving from the dealer
            warm = self._warm.pop(bid, None)
            try:
                prep = core.begin(self.store, bid, job, warm)
            except ProtocolError as e:
                await peer.send(f"{job}:ack:{k}", encode_frame({"t": "ack", "ok": False, "why": str(e)}))
                continue
            await peer.send(f"{job}:ack:{k}", encode_frame({"t": "ack", "ok": True}))
            return bid, prep, warm
        raise PreprocessingExhausted(f"job {job}: the servers could not agree on a usable bundle in 3 tries")

    def _burn(self, bid: str, job: str) -> None:
        self._warm.pop(bid, None)
        self._reserved.discard(bid)
        self._offline.pop(bid, None)
        try:
            self.store.consume(bid, f"burnt{job}"[:64])
        except ProtocolError:
            pass
        self.store.discard(bid)

    def _schedule_warm(self, model: str, batch: int) -> None:
        """Keep the next bundle for (model, batch) expanded in memory, so a job starts at once."""
        ready = self.store.ready(model, batch)
        if not ready or ready[0] in self._warm or model not in self.models:
            return
        bid = ready[0]
        self._warm[bid] = None

        async def warm() -> None:
            try:
                prep = await asyncio.to_thread(self.models[model].warm_up, self.store, bid)
                if bid in self._warm and self.store.state(bid) == "ready":
                    self._warm[bid] = prep
                    log.info("%s: bundle %s ready and expanded", self.cfg.party, bid[:8])
                else:
                    self._warm.pop(bid, None)
            except BlindsegError:
                self._warm.pop(bid, None)

        self._spawn(warm())

    def _ready_count(self, model: str, batch: int) -> int:
        return len([b for b in self.store.ready(model, batch) if b not in self._reserved])

    async def _pick_bundle(self, model: str, batch: int) -> str:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.bundle_wait
        asked = False
        while True:
            ready = [b for b in self.store.ready(model, batch) if b not in self._reserved]
            if ready:
                self._reserved.add(ready[0])  # concurrent jobs never pick the same bundle
                return ready[0]
            if not asked:
                await self.node.tell("dealer", "need", {"model": model, "batch": batch, "ready": 0})
                asked = True
            if loop.time() > deadline:
                raise PreprocessingExhausted(f"no preprocessing bundle for model {model!r} (batch {batch}) "
                                             f"within {self.bundle_wait:.0f} s: is the dealer running?")
            await asyncio.sleep(0.05)


def main(party: str, argv: list[str] | None = None) -> int:
    import argparse

    from .node import run_service

    ap = argparse.ArgumentParser(prog=f"python -m {party}")
    ap.add_argument("--config", required=True)
    args = ap.parse_args(argv)

    async def go() -> None:
        await ServerService(PartyConfig.load(args.config, party)).serve()

    return run_service(go())
