"""``python -m model_owner deploy``: compile, share and deploy a model to a running deployment.

Steps: compile the model to a public plan (calibrating f on the model owner's
own samples) with its preprocessing and class names in the plan metadata;
send the plan to the dealer (which sends the servers their mask seeds) and
each server its plan + weight shares, all under a fresh epoch; wait until both
servers have opened E; then commit the epoch at both servers and the dealer.
With several server pairs, every pair gets its own fresh split of the weights
(and the dealer its own masks), and the epoch commits at all of them.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from blindseg import ids
from blindseg.config import PartyConfig, server_name, server_pairs
from blindseg.errors import ConnectionLost, ProtocolError, UsageError
from blindseg.messages import Commit, Committed, Deploy, Deployed, Error, PlanMsg
from blindseg.models import load_named_model
from blindseg.node import Node
from blindseg.plan import Compiled

from . import compile_model, share_weights


async def deploy(cfg: PartyConfig, model_name: str, model_id: str, timeout: float = 300.0,
                 size: int = 64, tenants: list[str] | None = None) -> dict[str, Any]:
    """Compile a bundled model and deploy it through the deployment ``cfg`` belongs to."""
    model, samples, meta = load_named_model(model_name, size)
    comp = compile_model(model, tuple(samples.shape[1:]), "mask", "auto", samples=samples)
    comp.plan.meta.update(meta)
    node = await Node.from_config(cfg).start()
    try:
        return await deploy_compiled(node, comp, model_id, timeout, tenants)
    finally:
        await node.close()


async def deploy_own(cfg: PartyConfig, comp: Compiled, model_id: str, tenants: list[str] | None = None,
                     timeout: float = 300.0) -> dict[str, Any]:
    """Deploy a compiled model (e.g. from :func:`model_owner.own.compile_own`) through ``cfg``'s deployment."""
    node = await Node.from_config(cfg).start()
    try:
        return await deploy_compiled(node, comp, model_id, timeout, tenants)
    finally:
        await node.close()


async def deploy_compiled(node: Node, comp: Compiled, model_id: str, timeout: float = 300.0,
                          tenants: list[str] | None = None) -> dict[str, Any]:
    """Deploy as a new epoch, all or nothing: stage it (plan to the dealer, weight shares to each
    server, both open E), then commit it at both servers and the dealer. Until every party has
    committed, jobs for the old epoch are refused where the new one serves and vice versa (never run
    with mixed masks); a failed staging leaves the old deployment serving. ``tenants``: the data-owner
    identities allowed to use the model (None: every tenant the servers know)."""
    t0 = time.perf_counter()
    ids.check("model", model_id)
    for t in tenants or []:
        ids.check("tenant", t)
    epoch = ids.new_epoch()
    plan = comp.plan.to_dict()
    pairs = server_pairs(node.links)
    if not pairs:
        raise UsageError(f"{node.where}: no server pair (server0, server1) among this party's peers")
    servers = {server_name(i, p) for p in pairs for i in (0, 1)}
    await node.tell("dealer", PlanMsg(model_id, epoch, plan))
    for pair in pairs:  # a fresh split per pair: shares of two pairs never combine to the weights
        for i, shares in enumerate(share_weights(comp)):
            await node.tell(server_name(i, pair), Deploy.of(model_id, epoch, list(tenants or []), plan, shares))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    await _collect(node, Deployed, model_id, epoch, servers, deadline, "stage")
    commit = Commit(model_id, epoch)
    parties = servers | {"dealer"}
    done: set[str] = set()
    while done != parties:  # idempotent at every party: re-sent until all confirm
        for p in sorted(parties - done):
            await node.tell(p, commit)
        done |= await _collect(node, Committed, model_id, epoch, parties - done, min(deadline, loop.time() + 5.0),
                               "commit", partial=loop.time() + 5.0 < deadline)
    return {"model": model_id, "epoch": epoch, "frac_bits": comp.plan.frac_bits, "ops": len(comp.plan.ops),
            "deploy_seconds": time.perf_counter() - t0}


async def _collect(node: Node, kind: type[Deployed] | type[Committed], model: str, epoch: str, want: set[str],
                   deadline: float, what: str, partial: bool = False) -> set[str]:
    """Wait for ``kind`` from every party in ``want``; an Error about this model fails the deploy."""
    loop = asyncio.get_running_loop()
    got: set[str] = set()
    while got != want:
        try:
            sender, msg = await asyncio.wait_for(node.next_control(), max(0.01, deadline - loop.time()))
        except TimeoutError:
            if partial:
                return got
            raise ConnectionLost(f"{', '.join(sorted(want - got))} did not confirm the {what} of {model} "
                                 "in time") from None
        if isinstance(msg, Error) and msg.model in (model, None):
            raise ProtocolError(f"{sender} refused the model: {msg.error}")
        if isinstance(msg, kind) and msg.model == model and msg.epoch == epoch and sender in want:
            got.add(sender)
    return got
