"""Dealer logic: model masks and bundle generation, streamed op by op (the pool is in ``service.py``).

What each op's material is and how its derived items follow from the random ones is the layer's
business (:meth:`blindseg.layers.Layer.derive`); who receives what is :func:`by_correction`'s. The
dealer only replays both servers' PRG streams (:func:`blindseg.preprocessing.deal_op`).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from blindseg import ids
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
    model_id: str  # the deployment, ``model@epoch`` (:func:`blindseg.ids.key`)
    batch: int
    party: int
    seed: bytes = field(repr=False)
    layout: str = ""

    def announce(self) -> BundleAnnounce:
        model, epoch = ids.split(self.model_id)
        return BundleAnnounce(self.bundle_id, model, epoch, self.batch, self.party, self.seed, self.layout)


class Dealer:
    """Generates model masks and job bundles. Sees no image, weight or output. Models are keyed by
    deployment (``model@epoch``): a redeploy is another key, with its own masks."""

    def __init__(self) -> None:
        self._models: dict[str, tuple[Plan, bytes, bytes, dict[int, np.ndarray]]] = {}

    def __repr__(self) -> str:
        return f"Dealer(deployments={sorted(self._models)})"

    def deploy(self, model_id: str, plan: Plan) -> tuple[bytes, bytes]:
        """New deployment: returns the two mask seeds (one per server); the same ones again if this
        deployment is known already (a repeated plan never draws new masks)."""
        ids.split(model_id)
        if model_id in self._models:
            return self._models[model_id][1], self._models[model_id][2]
        s0, s1 = new_seed(), new_seed()
        self.restore(model_id, plan, s0, s1)
        return s0, s1

    def forget(self, model_id: str) -> None:
        self._models.pop(model_id, None)

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
            raise UsageError(f"unknown deployment {model_id!r}")
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
