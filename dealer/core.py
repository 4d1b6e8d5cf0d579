"""Dealer logic: model masks and bundle generation, streamed op by op (the pool is in ``service.py``).

What each op's material is and how its derived items follow from the random ones is the layer's
business (:meth:`blindseg.layers.Layer.derive`); who receives what is :func:`by_correction`'s. The
dealer only replays both servers' PRG streams (:func:`blindseg.preprocessing.deal_op`).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from blindseg.errors import UsageError
from blindseg.layers import DealContext
from blindseg.layout import Layout, model_mask_shares
from blindseg.messages import BundleAnnounce, BundleOp
from blindseg.plan import Op, Plan
from blindseg.preprocessing import MatSpec, deal_op
from blindseg.prg import new_seed


@dataclass
class Bundle:
    """One server's share of a job's preprocessing: its seed (server 1's corrections stream separately)."""

    bundle_id: str
    model_id: str
    batch: int
    party: int
    seed: bytes
    layout: str = ""

    def announce(self) -> BundleAnnounce:
        return BundleAnnounce(self.bundle_id, self.model_id, self.batch, self.party, self.seed, self.layout)


class Dealer:
    """Generates model masks and job bundles. Sees no image, weight or output."""

    def __init__(self) -> None:
        self._models: dict[str, tuple[Plan, bytes, bytes, dict[int, np.ndarray]]] = {}

    def deploy(self, model_id: str, plan: Plan) -> tuple[bytes, bytes]:
        """New model: returns the two mask seeds (one per server)."""
        s0, s1 = new_seed(), new_seed()
        self.restore(model_id, plan, s0, s1)
        return s0, s1

    def restore(self, model_id: str, plan: Plan, s0: bytes, s1: bytes) -> None:
        """Re-adopt a model deployed earlier (after a dealer restart)."""
        b0, b1 = model_mask_shares(plan, s0), model_mask_shares(plan, s1)
        self._models[model_id] = (plan, s0, s1, {i: b0[i] + b1[i] for i in b0})

    def models(self) -> dict[str, tuple[Plan, bytes, bytes]]:
        """Deployed models: plan and the two mask seeds (what a restart needs)."""
        return {m: (plan, s0, s1) for m, (plan, s0, s1, _) in self._models.items()}

    @staticmethod
    def new_bundle_id() -> str:
        return uuid.uuid4().hex

    def new_bundle(self, model_id: str, batch: int, bundle_id: str | None = None) -> tuple[Bundle, Bundle]:
        """Fresh seeds and id for one job's bundles; corrections come from :meth:`corrections`."""
        if model_id not in self._models:
            raise UsageError(f"unknown model {model_id!r}")
        bid = bundle_id or self.new_bundle_id()
        digest = Layout.of(self._models[model_id][0], batch).digest
        return (Bundle(bid, model_id, batch, 0, new_seed(), digest), Bundle(bid, model_id, batch, 1, new_seed(), digest))

    def corrections(self, b0: Bundle, b1: Bundle) -> Iterator[BundleOp]:
        """Server 1's corrections, op by op (ops with none are skipped); one op in memory at a time."""
        plan, _, _, masks = self._models[b0.model_id]
        layout = Layout.of(plan, b0.batch)
        ctx = DealContext(masks, layout.circuit)
        for i, specs in enumerate(layout.specs):
            op = plan.ops[i]

            def derive(ms: MatSpec, rand: dict[str, np.ndarray], op: Op = op, i: int = i) -> dict[str, np.ndarray]:
                return op.layer.derive(op, i, ms, rand, ctx)

            corr = deal_op(specs, b0.seed, b1.seed, i, derive)
            if corr:
                yield BundleOp(b1.bundle_id, i, tuple(corr))
