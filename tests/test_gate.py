"""Attention gates: the secure sigmoid against torch.sigmoid, the broadcast product of two activations,
and MONAI's AttentionUnet end to end (it was refused before)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from blindseg.circuit import build_circuit
from blindseg.layers import REGISTRY, OpMaterial, Runtime
from blindseg.plan import DEFAULT_ARITIES, Op
from blindseg.ring import signed

from .conftest import deal, run_pair, split

CIRC = build_circuit(30, DEFAULT_ARITIES)


class _Ops:
    def __init__(self, ops: list[Op]) -> None:
        self.ops = ops


def _run(op: Op, xs: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    layer = op.layer
    specs = layer.specs(op, [x.shape[1:] for x in xs], xs[0].shape[0], CIRC)
    m0, m1 = deal(specs, _Ops([Op("input", (), x.shape[1:]) for x in xs] + [op]), len(xs))
    shares = [split(x, rng) for x in xs]
    o0, o1 = run_pair(*(layer.online(Runtime(i, CIRC), len(xs), op, [s[i] for s in shares], OpMaterial(m, []))
                        for i, m in ((0, m0), (1, m1))))
    return signed(o0 + o1)


@pytest.mark.parametrize("s_in,s_out", [(8, 12), (12, 14), (4, 10)])
def test_secure_sigmoid_is_within_its_stated_error_of_torch(rng: np.random.Generator, s_in: int, s_out: int) -> None:
    x = np.concatenate([np.linspace(-12, 12, 2001), rng.normal(scale=3, size=999)]).reshape(1, 1, 50, 60)
    xq = np.rint(x * 2**s_in).astype(np.int64)
    op = Op("sigmoid", (0,), (1, 50, 60), {"s_in": s_in, "s_out": s_out, "g": min(26, 28 - s_in)})
    got = _run(op, [xq], rng) / 2**s_out
    want = torch.sigmoid(torch.as_tensor(xq / 2**s_in)).numpy()
    err = np.abs(got - want)
    assert np.max(err) <= 7.5e-4 + 3.4e-4 + 2 * 2.0**-s_out, np.max(err)
    assert np.all(np.diff(got.ravel()[:2001]) >= -2 * 2.0**-s_out)  # monotone up to its rounding


def test_product_broadcasts_a_one_channel_gate(rng: np.random.Generator) -> None:
    a = rng.integers(-(1 << 12), 1 << 12, size=(2, 3, 4, 5))
    g = rng.integers(0, 1 << 12, size=(2, 1, 4, 5))
    op = Op("mul", (0, 1), (3, 4, 5))
    assert np.array_equal(_run(op, [a, g], rng), a * g)
    assert REGISTRY["mul"].out_shape(op, [(3, 4, 5), (2, 4, 5)]) is None  # neither equal nor one channel


def test_monai_attention_unet_runs_faithfully() -> None:
    pytest.importorskip("monai", reason="monai is not installed (pip install monai)")
    from monai.networks.nets import AttentionUnet

    from .test_models import _check, _trained

    net = _trained(AttentionUnet(2, 1, 2, (8, 16), (2,)))
    stats = _check(net)
    assert stats["rounds"] > 0
