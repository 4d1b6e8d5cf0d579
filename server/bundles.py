"""Offline, at a server: take one bundle from a material source into the durable store."""

from __future__ import annotations

import asyncio

import numpy as np

from blindseg import ids
from blindseg.errors import ProtocolError
from blindseg.preprocessing import corrections_of
from blindseg.sources import MaterialSource

from .core import ServerCore
from .store import BundleStore


async def receive_bundle(core: ServerCore, store: BundleStore, source: MaterialSource,
                         timeout: float | None = 600.0) -> tuple[str, int]:
    """Check the announcement against this server's own layout, receive server 1's corrections op by
    op, precompute F_i, store durably. Returns the bundle id and the bytes its op frames took.
    A bundle cut off midway is dropped, never left usable."""
    a = source.announce
    if a.party != core.party or len(a.seed) != 32 or not 1 <= a.batch <= 4096:
        raise ProtocolError("bundle announcement does not fit this server")
    layout = core.layout(a.batch)
    if a.layout != layout.digest:
        raise ProtocolError(f"bundle {a.id[:8]} was made for another layout (dealer {a.layout[:12] or '-'}, "
                            f"this server {layout.digest[:12]}): dealer and server disagree on the plan or circuit")
    writer = store.writer(a.id, ids.key(a.model, a.epoch), a.batch, a.party, a.seed)
    nbytes = 0
    try:
        for i, specs in enumerate(layout.specs):
            corr: list[np.ndarray] = []
            if corrections_of(specs, core.party):
                msg, n = await source.op(i, timeout)
                nbytes += n
                if msg.op != i or msg.id != a.id:
                    raise ProtocolError(f"bundle frame for op {i} is malformed")
                corr = list(msg.arrays)
            if corr or core.plan.ops[i].layer.offline_items:
                await asyncio.to_thread(core.ingest_op, writer, layout, a.seed, i, corr)
        writer.commit()
    except BaseException:
        writer.abort()
        raise
    return a.id, nbytes
