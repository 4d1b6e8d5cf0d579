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
from blindseg.models import load_named_model
from blindseg.node import Node
from blindseg.plan import compile_model
from blindseg.wire import decode_frame

from . import share_weights


async def deploy(cfg: PartyConfig, model_name: str, model_id: str, timeout: float = 300.0,
                 size: int = 64) -> dict[str, Any]:
    model, samples, meta = load_named_model(model_name, size)
    comp = compile_model(model, tuple(samples.shape[1:]), "mask", "auto", samples=samples)  # type: ignore[arg-type]
    comp.plan.meta.update(meta)
    plan = comp.plan.to_dict()
    w0, w1 = share_weights(comp)
    node = await Node(cfg).start()
    t0 = time.perf_counter()
    try:
        await node.tell("dealer", "plan", {"model": model_id, "plan": plan})
        for i, shares in enumerate((w0, w1)):
            ops = sorted(shares)
            arrays = []
            for j in ops:
                w, b = shares[j]
                arrays += [w] if b is None else [w, b]
            await node.tell(f"server{i}", "deploy", {"model": model_id, "plan": plan, "ops": ops,
                                                      "bias": [shares[j][1] is not None for j in ops]}, arrays)
        done: set[str] = set()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while len(done) < 2:
            try:
                sender, kind, frame = await asyncio.wait_for(node.next_control(), max(0.1, deadline - loop.time()))
            except TimeoutError:
                raise ConnectionLost(f"servers did not confirm the deployment within {timeout:.0f} s") from None
            h, _ = decode_frame(frame)
            if kind == "error":
                raise ProtocolError(f"{sender} refused the model: {h.get('error')}")
            if kind == "deployed" and h.get("model") == model_id:
                done.add(sender)
    finally:
        await node.close()
    return {"model": model_id, "frac_bits": comp.plan.frac_bits, "ops": len(comp.plan.ops),
            "deploy_seconds": time.perf_counter() - t0}
