"""Every registered layer against its own fixed-point reference, run by two servers in lockstep on
material from the real dealer half; plus the registry's contracts and a U-Net with the two layers
added through the registry (nearest Upsample, LeakyReLU) end to end."""

from __future__ import annotations

import math

import numpy as np
import pytest

from blindseg.circuit import build_circuit
from blindseg.layers import REGISTRY, ModelShare, OpMaterial, Runtime
from blindseg.layout import Layout
from blindseg.plan import DEFAULT_ARITIES, Op, Plan
from blindseg.ring import signed

from .conftest import deal, run_pair, split

CIRC = build_circuit(30, DEFAULT_ARITIES)
LIM = 1 << 28


def _cases() -> list[tuple[str, tuple[int, ...], dict, int]]:
    """(kind, input shape (N, C, *spatial), params, allowed LSB error) per layer, odd/even, 2D/3D."""
    out = []
    for shp in [(1, 2, 5, 7), (2, 3, 8, 6)]:
        out += [("conv", shp, {"kernel": [3, 3], "stride": s, "padding": p, "dilation": 1, "fw": 6}, 0)
                for s, p in ((1, 1), (2, 0))]
        out.append(("convt", shp, {"kernel": [2, 2], "stride": 2, "fw": 6}, 0))
        out += [("rescale", shp, {"shift": s, "act": a, **({"slope": 0.1, "slope_bits": 8} if a == "leaky" else {})},
                 2 if a == "leaky" else 1) for s in (0, 7) for a in ("none", "relu", "leaky")]
        out += [("rescale", shp, {"shift": 4, "mul": 3, "act": "none"}, 1)]
        out += [("rescale", shp, {"shift": s, "act": "leaky", "slopes": [0.25, 0.5, 0.75][: shp[1]], "slope_bits": 8}, 2)
                for s in (0, 7)]  # PReLU, one slope per channel (negative and > 1: tests/test_models.py)
    out += [("conv", (1, 2, 4, 5, 6), {"kernel": [3, 3, 3], "stride": s, "padding": p, "fw": 6}, 0)
            for s, p in ((1, 1), (2, 0))]  # 3D
    out.append(("convt", (2, 2, 3, 4, 3), {"kernel": [2, 2, 2], "stride": 2, "fw": 6}, 0))
    for shp in [(1, 2, 6, 6), (2, 1, 7, 9), (1, 2, 4, 4, 6)]:
        out += [("maxpool", shp, {"kernel": 2, "stride": 2}, 0), ("avgsum", shp, {"kernel": 2, "stride": 2}, 0),
                ("upsample", shp, {"scale": 2}, 0), ("add", shp, {}, 0), ("concat", shp, {}, 0),
                ("interp", shp, {"scale": 2}, 0), ("interp", shp, {"scale": 4}, 0)]
    out += [("argmax", (2, k, 3, 5), {"classes": k, "bits": (k - 1).bit_length()}, 0) for k in (2, 3, 5)]
    out.append(("argmax", (2, 1, 3, 5), {"classes": 2, "bits": 1, "zero_first": True}, 0))  # sigmoid head
    out.append(("output", (1, 2, 3, 3), {}, 0))
    out += [("sigmoid", shp, {"s_in": 8, "s_out": 12, "g": 20}, 1) for shp in [(1, 2, 5, 7), (1, 1, 3, 4, 5)]]
    out += [("mul", shp, {}, 0) for shp in [(1, 2, 5, 7), (2, 3, 8, 6), (1, 2, 4, 5, 6)]]
    return out


def test_every_registered_kind_is_covered() -> None:
    assert {c[0] for c in _cases()} | {"input", "norm"} == set(REGISTRY)  # norm: tests/test_norm.py


@pytest.mark.parametrize("kind,shape,params,tol", _cases(), ids=lambda v: str(v))
def test_layer_matches_its_reference(rng: np.random.Generator, kind: str, shape: tuple[int, ...], params: dict,
                                     tol: int) -> None:
    layer = REGISTRY[kind]
    n_in = 2 if kind in ("add", "concat", "mul") else 1
    bound = LIM >> (int(params.get("mul", 1)).bit_length() if kind == "rescale" else 0)
    if kind == "argmax":
        bound = 1 << 24
    if kind == "mul":  # the product of two values, each at its own scale, stays below 2^28
        bound = 1 << 13
    if kind == "interp":  # its output carries scale_bits more fraction bits (calibration leaves room for them)
        bound = LIM >> REGISTRY[kind].scale_bits(Op(kind, (0,), shape[1:], params))
    if params.get("act") == "leaky":  # calibration keeps q * |negative part| below 2^29
        bound = 1 << 20
    xs = [rng.integers(-bound, bound, size=shape) for _ in range(n_in)]
    xs[0].reshape(-1)[:3] = [-bound, bound - 1, 0]  # the edges
    src = Op("input", (), shape[1:])
    weights = None
    if layer.weighted:
        cout = 4
        probe = Op(kind, (0,), (cout, *shape[2:]), params)
        out_shape = layer.out_shape(probe, [shape[1:]])
        op = Op(kind, (0,), out_shape, params)
        w = rng.integers(-(1 << 8), 1 << 8, size=layer.weight_shape(op, shape[1]))
        b = rng.integers(-(1 << 12), 1 << 12, size=cout)
        weights = (w.astype(np.uint32), b.astype(np.uint32))
        xs = [rng.integers(-(1 << 12), 1 << 12, size=shape)]
    else:
        in_shapes = [shape[1:]] * n_in
        probe = Op(kind, tuple(range(n_in)), shape[1:], params) if kind != "argmax" else Op(
            kind, (0,), (1, *shape[2:]), params)
        op = Op(kind, tuple(range(n_in)), layer.out_shape(probe, in_shapes) or shape[1:], params)
    ops = [src] * n_in + [op]
    ref = layer.reference(op, [x.astype(np.int64) for x in xs], weights)
    batch = shape[0]
    specs = layer.specs(op, [shape[1:]] * n_in, batch, CIRC)
    masks = {}
    rts = [Runtime(i, CIRC) for i in (0, 1)]
    if layer.weighted:
        bm = rng.integers(0, 1 << 32, size=weights[0].shape, dtype=np.uint64).astype(np.uint32)
        masks = {n_in: bm}
        e = weights[0] - bm
        b0, b1 = split(bm, rng)
        bb0, bb1 = split(weights[1], rng)
        rts = [Runtime(0, CIRC, {n_in: ModelShare(e, b0, bb0)}), Runtime(1, CIRC, {n_in: ModelShare(e, b1 + e, bb1)})]
    m0, m1 = deal(specs, _PlanShim(ops), n_in, masks) if specs else ([], [])
    stored = [[], []]
    if layer.offline_items:
        stored = [layer.precompute(rts[i], n_in, op, m) for i, m in ((0, m0), (1, m1))]
    shares = [split(x, rng) for x in xs]
    gens = [layer.online(rts[i], n_in, op, [s[i] for s in shares], OpMaterial((m0, m1)[i], stored[i])) for i in (0, 1)]
    o0, o1 = run_pair(*gens)
    if kind == "argmax":
        low = (o0.astype(np.uint32) + o1.astype(np.uint32)) & np.uint32((1 << params["bits"]) - 1)
        got = (params["classes"] - 1) - low.astype(np.int64)
    else:
        got = signed(o0 + o1)
    assert got.shape == ref.shape
    diff = got - ref
    assert np.all((diff >= 0) & (diff <= tol)), f"{kind}: errors {np.unique(diff)[:8]}"


class _PlanShim:
    """Just enough of a plan for ``deal``: the ops list."""

    def __init__(self, ops: list[Op]) -> None:
        self.ops = ops


def test_params_round_trip_and_refuse_bad_values() -> None:
    from blindseg.errors import UsageError

    for kind, _, params, _ in _cases():
        p = REGISTRY[kind].params.from_dict(params)
        assert REGISTRY[kind].params.from_dict(p.to_dict()) == p
    with pytest.raises(UsageError, match="unknown parameters"):
        REGISTRY["maxpool"].params.from_dict({"kernel": 2, "stride": 2, "shift": -1})
    with pytest.raises(UsageError, match="must be int"):
        REGISTRY["upsample"].params.from_dict({"scale": "2"})
    with pytest.raises(UsageError, match="act"):
        REGISTRY["rescale"].params.from_dict({"shift": 1, "act": "sigmoid"})


def test_layout_digest_carries_the_circuit() -> None:
    ops = (Op("input", (), (1, 8, 8)), Op("rescale", (0,), (1, 8, 8), {"act": "relu"}),
           Op("output", (1,), (1, 8, 8)))
    a, b = Plan(ops, 8, "logits"), Plan(ops, 8, "logits", arities=(2, 2, 2))
    assert Layout.of(a, 1).digest != Layout.of(b, 1).digest != Layout.of(b, 2).digest
    assert Layout.of(a, 1).digest == Layout.of(Plan.from_dict(a.to_dict()), 1).digest


def _unet_upsample_leaky():
    import torch
    import torch.nn as nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.LeakyReLU(0.1), nn.Conv2d(8, 8, 3, padding=1),
                                     nn.LeakyReLU(0.1))
            self.pool = nn.MaxPool2d(2)
            self.mid = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.LeakyReLU(0.05))
            self.up = nn.Upsample(scale_factor=2, mode="nearest")
            self.dec = nn.Sequential(nn.Conv2d(24, 8, 3, padding=1), nn.ReLU())
            self.head = nn.Conv2d(8, 3, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            e = self.enc(x)
            m = self.up(self.mid(self.pool(e)))
            return self.head(self.dec(torch.cat([e, m], 1)))

    torch.manual_seed(3)
    net = Net()
    from blindseg.models import test_image

    # a little training (intensity bands of the synthetic scans), so predictions are decisive as in a real model
    x = torch.tensor(test_image(16, 32, seed=11), dtype=torch.float32)
    y = torch.bucketize(x[:, 0], torch.tensor([0.5, 1.2]))
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    for _ in range(300):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    return net.eval()


def test_unet_with_upsample_and_leaky_relu_end_to_end() -> None:
    import torch

    from blindseg import secure_segment
    from blindseg.models import test_image

    net = _unet_upsample_leaky()
    x = test_image(4, 32, seed=5)
    res = secure_segment(net, x, calibration=test_image(4, 32, seed=6))
    kinds = [op.kind for op in res.plan.ops]
    assert "upsample" in kinds and any(op.kind == "rescale" and op.params.act == "leaky" for op in res.plan.ops)
    with torch.no_grad():
        logits = net(torch.tensor(x, dtype=torch.float32))
    want = torch.argmax(logits, 1).numpy()
    top2 = torch.topk(logits, 2, dim=1).values
    decisive = (top2[:, 0] - top2[:, 1]).numpy() > 0.05  # near-ties may flip under ±1 LSB rounding
    assert decisive.mean() > 0.95
    assert np.array_equal(res.mask[decisive], want[decisive])
    assert np.mean(res.mask == want) >= 0.995
    assert math.prod(res.mask.shape) == 4 * 32 * 32


def test_maxpool_bound_comes_from_the_relu_before_it_and_is_checked() -> None:
    """Calibration gives each max-pool after a truncating ReLU (shift s) bound_bits = 30 - s; a plan that
    claims a tighter bound than its input op guarantees (a wrong max would follow) is refused on load."""
    from blindseg.compiler import compile_model
    from blindseg.errors import UsageError
    from blindseg.models import build_model

    model = build_model("ref-unet", classes=2, seed=1)
    x = np.random.default_rng(0).normal(size=(1, 1, 32, 32)).astype(np.float32)
    plan = compile_model(model, (1, 32, 32), "mask", "auto", samples=x).plan
    pools = [(i, op) for i, op in enumerate(plan.ops) if op.kind == "maxpool"]
    assert pools
    for _, op in pools:
        src = plan.ops[op.inputs[0]]
        assert src.kind == "rescale" and src.params.act == "relu"
        assert op.params.bound_bits == 30 - src.params.shift < 30
    d = plan.to_dict()
    i = pools[0][0]
    d["ops"][i]["params"]["bound_bits"] -= 1
    with pytest.raises(UsageError, match="bound_bits"):
        Plan.from_dict(d)
    d["ops"][i]["params"]["bound_bits"] = 30  # looser than guaranteed: allowed (the full comparison)
    assert Plan.from_dict(d).ops[i].params.bound_bits == 30
