"""Which bundle a job uses: agreement between the two servers, the warm cache, refill requests.

Agreement (both servers consume the same bundle, durably, before any opening): server0 proposes
its oldest ready bundle (``<job>:bundle:<k>``, with the requesting tenant); server1 consumes it if it has it ready for the
same deployment, got the job from the same tenant, and
acknowledges (``<job>:ack:<k>``); only then does server0 consume its own copy. A bundle server1
cannot use (lost in a crash mid-transfer, refused by a full store) is burnt at server0 too, and so
is every other one server1 says it does not hold (its answer lists what it holds); the next one is
proposed, up to 3 times. Server0 waits (never generates) when it has none, asking the dealer every 2 s.
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import TYPE_CHECKING

from blindseg import ids
from blindseg.channel import Endpoint
from blindseg.errors import BlindsegError, PreprocessingExhausted, ProtocolError
from blindseg.messages import Ack, Need, Use, expect

from .core import Prepared, ServerCore

if TYPE_CHECKING:
    from .service import ServerService

log = logging.getLogger("blindseg.server")


class BundlePool:
    """A server's view of its ready bundles: reservation, warm expansion, agreement with the peer."""

    def __init__(self, service: ServerService) -> None:
        self.svc = service
        self.store = service.store
        self._reserved: set[str] = set()
        self._warm: dict[str, Prepared | None] = {}  # bundle -> material expanded ahead of its job
        self._warming: set[str] = set()  # warm-ups in progress
        self._burnt: list[str] = []  # server0: bundles burnt lately, told to server1 with the next proposal

    def unreserved(self, model: str, batch: int) -> list[str]:
        """Ready bundles of (deployment, batch) that no running job has picked."""
        return [b for b in self.store.ready(model, batch) if b not in self._reserved]

    def retire(self, bid: str, why: str) -> None:
        """Drop a ready bundle no job has picked (an expired pool), with any material expanded for it."""
        self._warm.pop(bid, None)
        self.store.drop(bid, why)

    def ready_count(self, model: str, batch: int) -> int:
        return len(self.unreserved(model, batch))

    def settled(self, model: str, batch: int) -> bool:
        """A bundle for (model, batch) is ready and its warm-up (if it fits the budget) is over."""
        ready = self.store.ready(model, batch)
        return bool(ready) and ready[0] not in self._warming

    def release(self, bid: str) -> None:
        """The job that used ``bid`` is over: drop its data."""
        self.store.discard(bid)
        self._reserved.discard(bid)

    async def agree(self, job: str, model: str, batch: int, core: ServerCore, peer: Endpoint, tenant: str
                    ) -> tuple[str, Prepared, Prepared | None]:
        """Both servers consume the same bundle of deployment ``model`` (``model@epoch``) for the same
        requester (module docstring). Returns (id, material, warm)."""
        timeout = self.svc.settings.round_timeout
        for k in range(3):
            if self.svc.party == 0:
                try:
                    bid = await self._pick(model, batch)
                except BlindsegError as e:  # tell server1 at once instead of letting it time out
                    await peer.send(f"{job}:bundle:{k}", Use(abort=str(e)).encode())
                    raise
                await peer.send(f"{job}:bundle:{k}", Use(bundle=bid, tenant=tenant, burnt=self._burnt[-64:]).encode())
                try:
                    ack = expect(await peer.recv(f"{job}:ack:{k}", timeout), Ack)
                except BaseException:
                    self._burn(bid, job)  # server1 may have consumed it: never propose it again
                    raise
                if not ack.ok:
                    log.warning("server0: server1 cannot use bundle %s (%s); burning it", bid[:8], ack.why)
                    self._burn(bid, job)
                    self._burn_missing(model, batch, ack.known, job)
                    continue
                warm = self._warm.pop(bid, None)
                return bid, core.begin(self.store, bid, job, warm), warm
            use = expect(await peer.recv(f"{job}:bundle:{k}", self.svc.settings.bundle_wait + timeout), Use)
            if use.abort:
                raise ProtocolError(f"job {job} aborted by server0: {use.abort}")
            bid = use.bundle
            self._drop_burnt(use.burnt, job)
            if use.tenant != tenant:  # two requesters under one job id: refuse before anything is opened
                await peer.send(f"{job}:ack:{k}", Ack(False, "the job came from another tenant here").encode())
                raise ProtocolError(f"job {job} reached server0 from {use.tenant} but this server from {tenant}")
            if self.store.model_of(bid) not in (None, model):
                await peer.send(f"{job}:ack:{k}", Ack(False, "bundle of another deployment").encode())
                continue
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout / 2  # answer before server0 gives up on the ack
            while self.store.state(bid) == "receiving" and loop.time() < deadline:
                await asyncio.sleep(0.05)  # still arriving from the dealer
            warm = self._warm.pop(bid, None)
            try:
                prep = core.begin(self.store, bid, job, warm)
            except ProtocolError as e:
                await peer.send(f"{job}:ack:{k}", Ack(False, str(e), self.store.known(model, batch)[-4096:]).encode())
                continue
            await peer.send(f"{job}:ack:{k}", Ack(True).encode())
            return bid, prep, warm
        raise PreprocessingExhausted(f"job {job}: the servers could not agree on a usable bundle in 3 tries")

    def _burn_missing(self, model: str, batch: int, known: list[str], job: str) -> None:
        """server0: burn our unreserved ready bundles of (model, batch) that server1 does not hold."""
        theirs = {b for b in known[:4096] if isinstance(b, str)}
        missing = [b for b in self.unreserved(model, batch) if b not in theirs]
        if missing:
            log.warning("server0: server1 does not hold %d more of our bundles; burning them", len(missing))
        for b in missing:
            self._burn(b, job)

    def _drop_burnt(self, burnt: list[str], job: str) -> None:
        """server1: burn our ready copies of bundles server0 burnt (it never proposes them again; without
        this they would stay "ready" here forever)."""
        for b in burnt[:64]:
            try:
                ids.check("bundle", b)
            except BlindsegError:
                continue
            if self.store.state(b) == "ready" and b not in self._reserved:
                log.info("server1: bundle %s was burnt at server0; dropping our copy", b[:8])
                self._burn(b, job)

    def _burn(self, bid: str, job: str) -> None:
        if self.svc.party == 0:
            self._burnt = [*self._burnt[-255:], bid]
        self._warm.pop(bid, None)
        self._reserved.discard(bid)
        self.svc._offline.pop(bid, None)
        try:
            self.store.consume(bid, f"burnt{job}"[:64])
        except ProtocolError:
            pass
        self.store.discard(bid)

    def schedule_warm(self, model: str, batch: int) -> None:
        """Keep the next bundle for (model, batch) expanded in memory, so a job starts at once."""
        ready = self.store.ready(model, batch)
        core = self.svc.core_for(model)
        if not ready or ready[0] in self._warm or core is None:
            return
        bid = ready[0]
        self._warm[bid] = None
        self._warming.add(bid)

        async def warm() -> None:
            try:
                prep = await asyncio.to_thread(core.warm_up, self.store, bid,
                                               self.svc.settings.preload_bytes)
                if prep is not None and bid in self._warm and self.store.state(bid) == "ready":
                    self._warm[bid] = prep
                    log.info("%s: bundle %s ready and expanded", self.svc.name, bid[:8])
                elif prep is None:
                    log.info("%s: bundle %s ready (expanded op by op during its job)", self.svc.name, bid[:8])
            except BlindsegError:
                self._warm.pop(bid, None)
            finally:
                self._warming.discard(bid)

        self.svc.spawn(warm())

    async def _pick(self, model: str, batch: int) -> str:
        loop = asyncio.get_running_loop()
        wait = self.svc.settings.bundle_wait
        deadline = loop.time() + wait
        asked = -math.inf
        while True:
            ready = [b for b in self.store.ready(model, batch) if b not in self._reserved]
            if ready:
                self._reserved.add(ready[0])  # concurrent jobs never pick the same bundle
                return ready[0]
            if loop.time() - asked > 2.0:  # asked again every 2 s: the bundle the dealer had in flight when we
                await self.svc.node.tell("dealer", Need(*ids.split(model), batch, 0))  # asked may be void
                asked = loop.time()  # (e.g. streamed to a server1 that restarted), then the dealer makes one more
            if loop.time() > deadline:
                raise PreprocessingExhausted(f"no preprocessing bundle for model {model!r} (batch {batch}) "
                                             f"within {wait:.0f} s: is the dealer running?")
            await asyncio.sleep(0.05)
