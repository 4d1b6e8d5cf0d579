"""Shared test helpers: run two servers' sans-IO protocols in lockstep, in memory.

hypothesis is imported up front: on a run of only the service tests its pytest plugin would import it at
the end, where CPython 3.11.7's parser can fail with "AST constructor recursion depth mismatch".
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import hypothesis  # noqa: F401 - see the module docstring
import numpy as np
import pytest

from blindseg.circuit import build_circuit
from blindseg.preprocessing import MatSpec
from blindseg.prg import new_seed


def run_pair(g0: Generator[Any, Any, Any], g1: Generator[Any, Any, Any], log: list[Any] | None = None) -> tuple[Any, Any]:
    """Drive two protocol generators round by round; openings add (arith) or XOR (bool)."""
    v0 = v1 = None
    while True:
        try:
            r0 = g0.send(v0)
        except StopIteration as s0:
            try:
                g1.send(v1)
            except StopIteration as s1:
                return s0.value, s1.value
            raise AssertionError("server 1 wants more rounds than server 0") from None
        r1 = g1.send(v1)
        r0 = r0[1] if isinstance(r0, tuple) else r0
        r1 = r1[1] if isinstance(r1, tuple) else r1
        if log is not None:
            log.append((r0, r1))
        ar = [a + b for a, b in zip(r0.arith, r1.arith, strict=True)]
        bo = [a ^ b for a, b in zip(r0.boolean, r1.boolean, strict=True)]
        v0 = v1 = (ar, bo)


def deal(specs: list[MatSpec], plan: Any = None, op_index: int = 0, masks: Any = None) -> tuple[list[dict], list[dict]]:
    """Material for a list of specs through the real dealer half (the op's layer derives, ``deal_op``
    applies the delivery rule) and the real server expansion. Without a plan: trunc/select material."""
    from blindseg.layers import DealContext
    from blindseg.plan import DEFAULT_ARITIES
    from blindseg.preprocessing import deal_op, derive_material, expand_op

    circ = build_circuit(30, DEFAULT_ARITIES)
    seed0, seed1 = new_seed(), new_seed()
    if plan is None:
        corr = deal_op(specs, seed0, seed1, op_index, lambda ms, rand: derive_material(ms, rand, circ))
    else:
        op = plan.ops[op_index]
        ctx = DealContext(masks or {}, circ)
        corr = deal_op(specs, seed0, seed1, op_index, lambda ms, rand: op.layer.derive(op, op_index, ms, rand, ctx))
    m0 = expand_op(tuple(specs), 0, seed0, op_index, None)
    m1 = expand_op(tuple(specs), 1, seed1, op_index, iter(corr))
    return m0, m1


def split(x: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x).astype(np.int64).astype(np.uint32)
    x0 = rng.integers(0, 1 << 32, size=x.shape, dtype=np.uint64).astype(np.uint32)
    return x0, x - x0


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)

