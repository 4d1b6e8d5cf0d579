"""``python -m model_owner deploy``: compile, share and deploy a model to a running deployment.

Steps: compile the model to a public plan (calibrating f on the model owner's
own samples) with its preprocessing and class names in the plan metadata;
send the plan to the dealer (which sends the servers their mask seeds) and
each server its plan + weight shares; wait until both servers have opened E.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from blindseg.config import PartyConfig
from blindseg.errors import ConnectionLost, ProtocolError
from blindseg.messages import Deploy, Deployed, Error, PlanMsg
from blindseg.models import load_named_model
from blindseg.node import Node
from blindseg.plan import Compiled

from . import compile_model, share_weights


async def deploy(cfg: PartyConfig, model_name: str, model_id: str, timeout: float = 300.0,
                 size: int = 64) -> dict[str, Any]:
    """Compile a bundled model and deploy it through the deployment ``cfg`` belongs to."""
    model, samples, meta = load_named_model(model_name, size)
    comp = compile_model(model, tuple(samples.shape[1:]), "mask", "auto", samples=samples)
    comp.plan.meta.update(meta)
    node = await Node.from_config(cfg).start()
    try:
        return await deploy_compiled(node, comp, model_id, timeout)
    finally:
        await node.close()


async def deploy_compiled(node: Node, comp: Compiled, model_id: str, timeout: float = 300.0) -> dict[str, Any]:
    """Send the plan to the dealer and each server its weight shares; wait until both opened E."""
    t0 = time.perf_counter()
    plan = comp.plan.to_dict()
    w0, w1 = share_weights(comp)
    await node.tell("dealer", PlanMsg(model_id, plan))
    for i, shares in enumerate((w0, w1)):
        await node.tell(f"server{i}", Deploy.of(model_id, plan, shares))
    done: set[str] = set()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while len(done) < 2:
        try:
            sender, msg = await asyncio.wait_for(node.next_control(), max(0.1, deadline - loop.time()))
        except TimeoutError:
            raise ConnectionLost(f"servers did not confirm the deployment within {timeout:.0f} s") from None
        if isinstance(msg, Error):
            raise ProtocolError(f"{sender} refused the model: {msg.error}")
        if isinstance(msg, Deployed) and msg.model == model_id:
            done.add(sender)
    return {"model": model_id, "frac_bits": comp.plan.frac_bits, "ops": len(comp.plan.ops),
            "deploy_seconds": time.perf_counter() - t0}
