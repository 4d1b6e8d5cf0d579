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
``ctl:error``          any -> requester             a job or request failed, with the reason
=====================  ===========================  ==========================================
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import numpy as np

from netsim import close as close_links
from netsim import profile, wrap

from .channel import Endpoint
from .config import PartyConfig
from .transport import MqttTransport
from .wire import encode_frame

log = logging.getLogger("blindseg.node")


class Node:
    """A party's connection to the deployment: endpoints to its peers, shaped by its netsim profile."""

    def __init__(self, cfg: PartyConfig) -> None:
        self.cfg = cfg
        self.transport = MqttTransport(cfg.deployment, cfg.party, cfg.key, cfg.peers, cfg.broker)
        prof = profile(cfg.net)
        self.links: dict[str, Endpoint] = {p: wrap(ep, prof) for p, ep in self.transport.endpoints.items()}

    async def start(self) -> Node:
        await self.transport.start()
        return self

    async def close(self) -> None:
        await close_links(list(self.links.values()))
        await self.transport.close()

    def link(self, peer: str) -> Endpoint:
        if peer not in self.links:
            from .errors import UsageError

            raise UsageError(f"{self.cfg.path}: no [peers] key for {peer!r}")
        return self.links[peer]

    async def tell(self, peer: str, kind: str, header: dict[str, Any], arrays: list[np.ndarray] = ()) -> None:  # type: ignore[assignment]
        await self.link(peer).send(f"ctl:{kind}", encode_frame({"t": kind, **header}, list(arrays)))

    async def next_control(self) -> tuple[str, str, bytes]:
        """(sender, kind, frame) of the next control message."""
        sender, label, frame = await self.transport.control.get()
        return sender, label[4:], frame


def run_service(coro: Any) -> int:
    """Run a role's main coroutine until interrupted; user errors exit 2 without a traceback."""
    from .errors import BlindsegError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("mqtt").setLevel(logging.ERROR)
    try:
        asyncio.run(coro)
    except KeyboardInterrupt:
        return 0
    except BlindsegError as e:
        print(f"error: {e}", flush=True)
        return 2
    return 0
