"""Role plumbing shared by every party process: config -> transport (+ netsim) -> control loop.

Control messages (labels ``ctl:<kind>``) carry small msgpack headers and
optional arrays inside the sealed frames; protocol rounds and bulk transfers
use deterministic labels on the peer endpoints. Message kinds:

=====================  ===========================  ==========================================
kind                   from -> to                   meaning
=====================  ===========================  ==========================================
``ctl:deploy``         model_owner -> servers       plan + this server's weight shares
``ctl:plan``           model_owner -> dealer        plan (public) of a new model
``ctl:masks``          dealer -> servers            mask seed of a model
``ctl:deployed``       servers -> model_owner       E opened, model ready
``ctl:bundle``         dealer -> servers            bundle announcement (then ``bundle:<id>:<op>``)
``ctl:used``           server0 -> dealer            a bundle was consumed: make another
``ctl:getplan``        data_owner -> servers        ask for a model's public plan
``ctl:planinfo``       server -> data_owner         the plan
``ctl:job``            data_owner -> servers        job id, model, batch + this server's input share
``ctl:progress``       server0 -> data_owner        op i of n done
``ctl:offer``          data_owner -> one server0    who takes this job? (several pairs; via the broker)
``ctl:claim``          server0 -> data_owner        this pair takes it: send the shares to it
``ctl:error``          any -> requester             a job or request failed, with the reason
=====================  ===========================  ==========================================
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol, TypeVar

from netsim import Profile, profile, wrap
from netsim import close as close_links

from .channel import Control, Endpoint
from .config import PartyConfig
from .errors import ConnectionLost, ProtocolError, UsageError
from .messages import Message, decode

log = logging.getLogger("blindseg.node")
T = TypeVar("T")


class Transport(Protocol):
    """What a node needs of a transport (MQTT or in-memory): endpoints per peer and a control queue."""

    control: Control

    @property
    def endpoints(self) -> Any: ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...


class Node:
    """A party's connection to the deployment: endpoints to its peers, shaped by its netsim profile."""

    def __init__(self, party: str, transport: Transport, prof: Profile | None = None, where: str = "",
                 deployment: str = "local") -> None:
        self.party, self.transport, self.where, self.deployment = party, transport, where or party, deployment
        prof = prof or profile("none")
        self.links: dict[str, Endpoint] = {p: wrap(ep, prof) for p, ep in transport.endpoints.items()}

    @staticmethod
    def from_config(cfg: PartyConfig) -> Node:
        from .transport import MqttTransport

        return Node(cfg.name, MqttTransport(cfg.deployment, cfg.name, cfg.key, cfg.peers, cfg.broker,
                                            offer_group=cfg.offer_group if cfg.party == "server0" else ""),
                    profile(cfg.net), str(cfg.path), cfg.deployment)

    async def start(self) -> Node:
        await self.transport.start()
        return self

    def announce(self, document: Callable[[str], dict[str, Any]], interval: float = 2.0) -> None:
        """Publish ``document(reader)``, sealed for each peer, as this service's presence every ``interval``
        s (MQTT transports; the in-memory one has no broker to tell)."""
        t: Any = self.transport
        if hasattr(t, "presence"):
            t.presence, t.presence_interval = document, interval

    async def goodbye(self, document: dict[str, Any]) -> None:
        """This service's last presence document (a clean stop), where there is a broker."""
        if hasattr(self.transport, "goodbye"):
            await self.transport.goodbye(document)

    async def guarded(self, coro: Awaitable[T], peers: Sequence[str]) -> T:
        """Run ``coro``, failing it with ConnectionLost as soon as one of ``peers`` is gone (its goodbye,
        or its presence silent: seconds, not a round timeout). Without presence (in memory), just run it."""
        gone = getattr(self.transport, "gone", None)
        task = asyncio.ensure_future(coro)
        if gone is None:
            return await task
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=0.5)
                if done:
                    return task.result()
                for p in peers:
                    why = gone(p)
                    if why:
                        raise ConnectionLost(f"{p} {why}")
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task

    def connected(self) -> bool:
        """Whether the transport holds a broker connection now (always true in memory)."""
        ev = getattr(self.transport, "_connected", None)
        return True if ev is None else bool(ev.is_set())

    async def close(self) -> None:
        await close_links(list(self.links.values()))
        await self.transport.close()

    def link(self, peer: str) -> Endpoint:
        if peer not in self.links:
            raise UsageError(f"{self.where}: no [peers] key for {peer!r}")
        return self.links[peer]

    async def tell(self, peer: str, msg: Message) -> None:
        """Send a control message (label ``ctl:<type>``)."""
        await self.link(peer).send(f"ctl:{msg.T}", msg.encode())

    async def offer(self, msg: Message, to: list[str]) -> None:
        """Offer a job to the server0s ``to``: the broker (shared subscription) hands it to one."""
        t: Any = self.transport
        if not hasattr(t, "offer"):
            raise UsageError(f"{self.where}: this transport cannot offer jobs to several server pairs")
        await t.offer(msg.encode(), to)

    async def next_control(self) -> tuple[str, Message]:
        """(sender, message) of the next well-formed control message; malformed ones are dropped with a
        logged reason (the peer misbehaved; the service goes on)."""
        while True:
            sender, label, frame = await self.transport.control.get()
            try:
                msg = decode(frame)
                if label != f"ctl:{msg.T}":
                    raise ProtocolError(f"a {msg.T} message arrived on {label!r}")
                return sender, msg
            except ProtocolError as e:
                log.warning("%s: dropped control message from %s: %s", self.party, sender, e)


class _UtcFormatter(logging.Formatter):
    """Log lines in UTC with the offset written out (parties run in different clouds and zones)."""

    converter = time.gmtime  # type: ignore[assignment]

    def __init__(self, as_json: bool) -> None:
        super().__init__("%(asctime)s %(name)s %(levelname)s %(message)s", "%Y-%m-%dT%H:%M:%S+0000")
        self.as_json = as_json

    def format(self, record: logging.LogRecord) -> str:
        if not self.as_json:
            return super().format(record)
        import json

        doc = {"time": self.formatTime(record, self.datefmt), "level": record.levelname, "logger": record.name,
               "message": record.getMessage()}
        if record.exc_info:
            doc["traceback"] = self.formatException(record.exc_info)
        return json.dumps(doc)


def configure_logging(as_json: bool | None = None) -> None:
    """INFO to stderr in UTC; one JSON object per line when ``as_json`` (default: the environment
    variable ``BLINDSEG_LOG_FORMAT=json``), for log shippers."""
    import os

    if as_json is None:
        as_json = os.environ.get("BLINDSEG_LOG_FORMAT", "").lower() == "json"
    handler = logging.StreamHandler()
    handler.setFormatter(_UtcFormatter(as_json))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    logging.getLogger("mqtt").setLevel(logging.ERROR)


def run_service(coro: Any) -> int:
    """Run a role's main coroutine until interrupted; user errors exit 2 without a traceback."""
    from .errors import BlindsegError

    configure_logging()

    async def main() -> None:
        import signal

        task = asyncio.ensure_future(coro)
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError, RuntimeError):  # SIGTERM (systemd stop): a clean stop
            loop.add_signal_handler(signal.SIGTERM, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await task

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        return 0
    except BlindsegError as e:
        print(f"error: {e}", flush=True)
        return 2
    return 0
