"""Secure instance / group normalisation: two servers in lockstep on the real dealer half's material,
against the layer's fixed-point reference and against torch.nn.functional.group_norm."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from blindseg.circuit import build_circuit
from blindseg.layers import REGISTRY, Calibration, OpMaterial, Runtime
from blindseg.plan import DEFAULT_ARITIES, Op
from blindseg.ring import signed

from .conftest import deal, run_pair, split

CIRC = build_circuit(30, DEFAULT_ARITIES)
NORM = REGISTRY["norm"]


class _Ops:
    def __init__(self, ops: list[Op]) -> None:
        self.ops = ops


def _calibrated(x: np.ndarray, groups: int, f: int, eps: float = 1e-5) -> Op:
    op = Op("norm", (0,), x.shape[1:], {"groups": groups, "eps": eps})
    out = NORM.forward(op, [torch.as_tensor(x)]).numpy()
    cal = Calibration(f, {}, [float(np.abs(x).max()), float(np.abs(out).max())],
                      {1: NORM.observe(op, [x], out)})
    return Op("norm", (0,), x.shape[1:], NORM.calibrate(op, 1, cal, ()))


def _secure(op: Op, xq: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    specs = NORM.specs(op, [op.shape], xq.shape[0], CIRC)
    m0, m1 = deal(specs, _Ops([Op("input", (), op.shape), op]), 1)
    s0, s1 = split(xq, rng)
    log: list = []
    o0, o1 = run_pair(*(NORM.online(Runtime(i, CIRC), 1, op, [s], OpMaterial(m, []))
                        for i, s, m in ((0, s0, m0), (1, s1, m1))), log=log)
    return signed(o0 + o1), len(log)


CASES = [  # (input shape, groups, per-channel scale of the data, mean offset)
    ((2, 4, 16, 16), 4, 1.0, 0.0),  # instance norm, power-of-two group
    ((1, 6, 10, 7), 3, 3.0, 2.0),  # group norm, N = 140: the mean needs its multiplier
    ((1, 3, 6, 5, 4), 3, 0.3, -1.0),  # 3D instance norm
    ((1, 8, 32, 32), 2, 0.05, 0.5),  # small variances: the range reduction's low buckets
]


@pytest.mark.parametrize("shape,groups,spread,offset", CASES, ids=str)
def test_norm_matches_reference_and_torch(rng: np.random.Generator, shape: tuple[int, ...], groups: int,
                                          spread: float, offset: float) -> None:
    f = 10
    chan = rng.uniform(0.2, 1.0, size=(1, shape[1]) + (1,) * (len(shape) - 2)) * spread
    x = rng.normal(size=shape) * chan + offset
    op = _calibrated(x, groups, f)
    xq = np.rint(x * 2**f).astype(np.int64)
    ref = NORM.reference(op, [xq])
    got, rounds = _secure(op, xq, rng)
    assert got.shape == ref.shape == xq.shape
    # the reference truncates by floor, the secure run rounds stochastically: a group's W may fall in the
    # neighbouring bucket, where both compute the same rsqrt to the fixed point's precision
    assert np.max(np.abs(got - ref)) <= 16, f"secure vs fixed-point reference: {np.max(np.abs(got - ref))} LSB"
    want = F.group_norm(torch.as_tensor(xq / 2**f), groups, eps=1e-5).numpy()  # torch on the same fixed-point input
    err = np.abs(got / 2**f - want)
    assert np.max(err) <= 4 * 2.0**-f, f"secure vs torch: max error {np.max(err) * 2**f:.2f} LSB"
    assert np.mean(err) <= 1.0 * 2.0**-f
    assert rounds <= 24


def test_norm_out_of_range_group_is_still_normalised(rng: np.random.Generator) -> None:
    """Calibrated on unit-variance data, then fed a 1.5x wider input (the plan's input margin)."""
    f = 10
    x = rng.normal(size=(1, 2, 16, 16))
    op = _calibrated(x, 2, f)
    xq = np.rint(1.5 * x * 2**f).astype(np.int64)
    got, _ = _secure(op, xq, rng)
    want = F.group_norm(torch.as_tensor(xq / 2**f), 2, eps=1e-5).numpy()
    assert np.max(np.abs(got / 2**f - want)) <= 4 * 2.0**-f


def test_a_bare_norm_module_compiles_through_its_functional_form() -> None:
    """Tracing nn.GroupNorm itself gives F.group_norm (with the affine as graph parameters)."""
    from blindseg import secure_segment

    torch.manual_seed(0)
    mod = torch.nn.GroupNorm(2, 4)
    with torch.no_grad():
        mod.weight.uniform_(0.5, 1.5)
        mod.bias.uniform_(-0.5, 0.5)
    rng = np.random.default_rng(3)
    cal = rng.normal(size=(4, 4, 16, 16)) * rng.uniform(0.2, 2.0, size=(1, 4, 1, 1))
    res = secure_segment(mod, cal[:1], output="logits", calibration=cal)
    with torch.no_grad():
        want = mod(torch.as_tensor(cal[:1], dtype=torch.float32)).numpy()
    assert np.max(np.abs(res.logits - want)) < 0.01
