"""The dealer as a long-running service (``python -m dealer --config dealer.toml``).

Keeps, per deployed model, ``pool`` ready bundles at the servers ahead of demand:
on ``ctl:plan`` it draws the model's mask seeds (persisted in its state dir so a
restart can keep serving) and sends each server its seed, then streams
``pool`` bundles; every ``ctl:used`` / ``ctl:need`` from server0 streams one
more. Bundles are generated one at a time in a worker thread; the servers wait
for them (back-pressure), they never generate their own.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from typing import Any

from blindseg.config import PartyConfig
from blindseg.errors import BlindsegError, UsageError
from blindseg.node import Node
from blindseg.plan import Plan
from blindseg.wire import decode_frame

from .core import Dealer, stream_bundle

log = logging.getLogger("blindseg.dealer")


class DealerService:
    def __init__(self, cfg: PartyConfig, pool: int = 2) -> None:
        if cfg.party != "dealer":
            raise UsageError(f"{cfg.path}: not a dealer config")
        self.cfg, self.pool = cfg, pool
        self.node = Node(cfg)
        self.dealer = Dealer()
        self.state = cfg.state_dir / "models.json"
        self._work: asyncio.Queue[tuple[str, int]] = asyncio.Queue()
        self._pending: dict[tuple[str, int], int] = {}  # bundles queued or being streamed, per (model, batch)
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        if self.state.exists():
            for model, m in json.loads(self.state.read_text()).items():
                self.dealer.restore(model, Plan.from_dict(m["plan"]), bytes.fromhex(m["s0"]), bytes.fromhex(m["s1"]))

    def _persist(self) -> None:
        data = {m: {"plan": plan.to_dict(), "s0": s0.hex(), "s1": s1.hex()}
                for m, (plan, s0, s1, _) in self.dealer._models.items()}
        tmp = self.state.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
        tmp.replace(self.state)

    async def serve(self) -> None:
        await self.node.start()
        worker = asyncio.get_running_loop().create_task(self._generate())
        log.info("dealer serving deployment %s (pool %d per model)", self.cfg.deployment, self.pool)
        try:
            while True:
                sender, kind, frame = await self.node.next_control()
                try:
                    await self._handle(sender, kind, frame)
                except (BlindsegError, KeyError, TypeError, ValueError) as e:
                    log.warning("dealer: %s from %s failed: %s", kind, sender, e)
        finally:
            worker.cancel()
            await self.node.close()

    async def _handle(self, sender: str, kind: str, frame: bytes) -> None:
        header, _ = decode_frame(frame)
        if kind == "plan" and sender == "model_owner":
            model = str(header["model"])
            s0, s1 = self.dealer.deploy(model, Plan.from_dict(header["plan"]))
            await asyncio.to_thread(self._persist)
            await self.node.tell("server0", "masks", {"model": model, "seed": s0})
            await self.node.tell("server1", "masks", {"model": model, "seed": s1})
            for _ in range(self.pool):
                self._enqueue((model, 1))
        elif kind in ("used", "need") and sender == "server0":
            # top the pool up to `pool` ready bundles (server0's count + those queued or in flight here);
            # a job that waited always gets one, whatever the count says
            key = (str(header["model"]), int(header["batch"]))
            want = self.pool - int(header.get("ready", 0)) - self._pending.get(key, 0)
            for _ in range(max(want, 1 if kind == "need" and not self._pending.get(key) else 0)):
                self._enqueue(key)
        else:
            raise UsageError(f"unexpected {kind!r} from {sender}")

    def _enqueue(self, key: tuple[str, int]) -> None:
        self._pending[key] = self._pending.get(key, 0) + 1
        self._work.put_nowait(key)

    async def _generate(self) -> None:
        while True:
            model, batch = await self._work.get()
            try:
                bid, secs = await stream_bundle(self.dealer, model, batch, self.node.link("server0"),
                                                self.node.link("server1"), announce="ctl:bundle")
                log.info("dealer: bundle %s for %s batch %d in %.2f s", bid[:8], model, batch, secs)
            except BlindsegError as e:
                log.warning("dealer: bundle for %s failed: %s", model, e)
            finally:
                self._pending[(model, batch)] -= 1


def main(argv: list[str] | None = None) -> int:
    import argparse

    from blindseg.node import run_service

    ap = argparse.ArgumentParser(prog="python -m dealer")
    ap.add_argument("--config", required=True)
    ap.add_argument("--pool", type=int, default=2, help="ready bundles kept per model")
    args = ap.parse_args(argv)

    async def go() -> Any:
        await DealerService(PartyConfig.load(args.config, "dealer"), args.pool).serve()

    return run_service(go())
