"""The whole job's material, per op, as the registry's layers declare it for a plan and batch.

Dealer and servers build the same :class:`Layout` from the public plan; its :meth:`Layout.digest`
travels in every bundle announcement, so a dealer and a server that disagree (plan, batch,
circuit arities, item shapes) fail loudly instead of mis-reading each other's streams.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from .circuit import Circuit
from .errors import UsageError
from .plan import Plan
from .preprocessing import MatSpec, by_correction
from .prg import Prg


@dataclass(frozen=True)
class Layout:
    plan: Plan
    batch: int
    circuit: Circuit
    specs: tuple[tuple[MatSpec, ...], ...]

    @staticmethod
    def of(plan: Plan, batch: int) -> Layout:
        circuit = plan.circuit()
        return Layout(plan, batch, circuit, tuple(
            tuple(op.layer.specs(op, plan.in_shapes(i), batch, circuit)) for i, op in enumerate(plan.ops)))

    def material_bytes(self) -> int:
        """One server's expanded material for the whole job (upper bound: every item, both kinds)."""
        return sum(it.nbytes for op in self.specs for ms in op for it in ms.items)

    def check_budget(self, limit: int) -> int:
        """One server's material bytes for this job; UsageError if over ``limit`` (a plan from a peer
        must not make a role allocate without bound)."""
        need = self.material_bytes()
        if need > limit:
            raise UsageError(f"a job of batch {self.batch} needs {need / 2**30:.1f} GiB of preprocessing material "
                             f"per server, over the configured limit of {limit / 2**30:.1f} GiB (max_job_bytes)")
        return need

    def correction_bytes(self, op: int | None = None) -> int:
        """Bytes of server 1's corrections for one op, or the whole job."""
        ops = self.specs if op is None else (self.specs[op],)
        return sum(it.nbytes for specs in ops for ms in specs for it in ms.items if by_correction(it, 1))

    @cached_property
    def digest(self) -> str:
        """Hash of the circuit and every item (name, kind, shape, width, derived) in stream order."""
        h = hashlib.sha256(f"w{self.plan.width}a{self.plan.arities}b{self.batch}".encode())
        for i, specs in enumerate(self.specs):
            for ms in specs:
                h.update(f"|{i}:{ms.kind}:{ms.n}:{ms.shift}:{ms.bound}:{ms.compare}".encode())
                for it in ms.items:
                    h.update(f";{it.name},{it.kind},{it.shape},{it.width},{int(it.derived)}".encode())
        return h.hexdigest()[:32]


def model_mask_shares(plan: Plan, seed: bytes) -> dict[int, np.ndarray]:
    """A server's share B_i of the model-share masks, expanded from its mask seed (stream = op index),
    shaped as the plan's weights. The dealer expands both servers' streams to know B."""
    out = {}
    for i in plan.weighted_ops():
        op = plan.ops[i]
        out[i] = Prg(seed, stream=i).uint32(op.layer.weight_shape(op, plan.ops[op.inputs[0]].shape[0]))
    return out
