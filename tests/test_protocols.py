"""Every secure protocol vs its plaintext reference, run by two servers in lockstep.

Bit-exact where no truncation happens; within 1 LSB per truncation otherwise
(the dealer-assisted truncation returns floor or floor + 1, unbiased). Values reach the
ring's documented limits (|x| < 2^30).
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from blindseg import protocols as P
from blindseg.circuit import build_circuit, compare_circuit
from blindseg.layers import REGISTRY, ModelShare, OpMaterial, Runtime
from blindseg.plan import DEFAULT_ARITIES, Op
from blindseg.preprocessing import select_spec, tournament_steps, trunc_spec
from blindseg.ring import signed

from .conftest import deal, run_pair, split

LIM = 1 << 30
CIRC = build_circuit(30, DEFAULT_ARITIES)


def values(rng: np.random.Generator, n: int, bound: int = LIM) -> np.ndarray:
    """Mixed magnitudes including the edges -2^30, 2^30 - 1, 0 and +-1."""
    v = np.concatenate([
        rng.integers(-bound, bound, n),
        rng.integers(-1000, 1000, n),
        np.array([-bound, bound - 1, 0, -1, 1, -bound + 1]),
    ])
    return v.astype(np.int64)


@pytest.mark.parametrize("n", [1, 63, 64, 65, 777])
@pytest.mark.parametrize("s", [0, 1, 8, 13, 15])
def test_trunc(rng: np.random.Generator, n: int, s: int) -> None:
    v = values(rng, n)  # the whole documented domain [-2^30, 2^30)
    m0, m1 = deal([trunc_spec(v.size, s)])
    x0, x1 = split(v, rng)
    o0, o1 = run_pair(P.trunc(0, x0, m0[0], s), P.trunc(1, x1, m1[0], s))
    got = signed(o0 + o1)
    exact = v >> s  # floor
    diff = got - exact
    assert np.all((diff == 0) | (diff == 1)), f"trunc off by {np.unique(diff)}"


@pytest.mark.parametrize("s", [1, 4, 12])
def test_trunc_is_unbiased_stochastic_rounding(rng: np.random.Generator, s: int) -> None:
    """Mean error 0 within 0.05 LSB and mean |error| 2p(1-p) per fraction p, against Python ints."""
    from fractions import Fraction

    base = [int(a) for a in rng.integers(-(1 << 29), 1 << 29, 40)] + [-(1 << 30), (1 << 30) - (1 << s)]
    xs = [b + f for b in base for f in {0, 1, (1 << s) // 3, (1 << s) // 2, (1 << s) - 1}]
    reps = 400
    v = np.array(xs * reps, dtype=np.int64)
    m0, m1 = deal([trunc_spec(v.size, s)])
    x0, x1 = split(v, rng)
    o0, o1 = run_pair(P.trunc(0, x0, m0[0], s), P.trunc(1, x1, m1[0], s))
    got = signed(o0 + o1).reshape(reps, len(xs))
    err = [[float(Fraction(int(g)) - Fraction(x, 1 << s)) for g, x in zip(row, xs, strict=True)] for row in got]
    e = np.array(err)
    assert abs(e.mean()) < 0.05, f"biased: mean error {e.mean():+.3f} LSB"
    assert np.all(np.abs(e) < 1)
    p = np.array([float(Fraction(x, 1 << s) - (x >> s)) for x in xs])
    np.testing.assert_allclose(np.abs(e).mean(axis=0), 2 * p * (1 - p), atol=0.1)  # per value, 400 draws each


def test_select_is_exact_on_its_whole_domain_and_the_limit_is_where_documented(rng: np.random.Generator) -> None:
    """The fused truncation + ReLU decides the sign of what it truncates (z itself for s = 0; for s > 0,
    t = z >> s as the opening rounds it, from bits s..30 only), so every z in [-2^30, 2^30 - 2^s) gets the
    right sign; above it the sign wraps (calibration keeps values below 2^29, a factor 2 inside)."""
    for s in (0, 8, 13):
        top = (1 << 30) - ((1 << s) if s else 0)  # the first value past the domain
        edge = np.array([top - 1, top - 7, -(1 << 30), -(1 << s) if s else -1, -1, 0, 1, (1 << s) + 1, top,
                         (1 << 30) - 1, (1 << 30), (1 << 30) + 5], dtype=np.int64)
        m0, m1 = deal([select_spec(edge.size, s, CIRC)])
        x0, x1 = split(edge, rng)
        o0, o1 = run_pair(P.select(0, x0, m0[0], s, CIRC), P.select(1, x1, m1[0], s, CIRC))
        got = signed(o0 + o1)
        inside = edge < top
        assert np.all(got[inside & (edge < 0)] == 0)
        diff = got[inside & (edge >= 0)] - (edge[inside & (edge >= 0)] >> s)
        assert np.all((diff == 0) | (diff == (1 if s else 0))), (s, diff)
        # [2^30 - 2^s, 2^30): the sign flips where the truncation rounds up to 2^(30-s); from 2^30 on, always
        # (why calibration keeps 2x headroom)
        edge_zone = ~inside & (edge < (1 << 30))
        assert np.all((got[edge_zone] == 0) | (got[edge_zone] == edge[edge_zone] >> s))
        assert np.all(got[edge >= (1 << 30)] == 0)


@pytest.mark.parametrize("n", [1, 64, 129, 1000])
@pytest.mark.parametrize("s", [0, 12])
def test_relu_select(rng: np.random.Generator, n: int, s: int) -> None:
    v = values(rng, n, LIM - (1 << s if s else 0))  # the domain (previous test): [-2^30, 2^30 - 2^s)
    m0, m1 = deal([select_spec(v.size, s, CIRC)])
    x0, x1 = split(v, rng)
    log: list = []
    o0, o1 = run_pair(P.select(0, x0, m0[0], s, CIRC), P.select(1, x1, m1[0], s, CIRC), log)
    got = signed(o0 + o1)
    exact = np.maximum(v >> s, 0)
    diff = got - exact
    if s == 0:
        np.testing.assert_array_equal(got, exact)
    else:
        assert np.all((diff == 0) | (diff == 1))
    # the sign is always exact: negative inputs give exactly 0
    assert np.all(got[v < 0] == 0)
    assert len(log) == 2 + compare_circuit(CIRC, s).rounds <= 4
    assert s < 12 or len(log) == 3  # a ReLU of a truncated value: one AND level (issue #13: <= 3 rounds)


@pytest.mark.parametrize("s", range(1, 25))
def test_relu_of_every_truncation_width(rng: np.random.Generator, s: int) -> None:
    """Every shift's comparison circuit (bit pairs on wide ranges, one AND level over groups of 3-5 bits
    from s = 12 on) gives ReLU(z >> s) within the truncation's 1 LSB, exactly 0 for negative z, and costs
    no more dealer bits than the full-width circuit."""
    circ = compare_circuit(CIRC, s)
    assert circ.lo == s and circ.width == 30 - s and circ.derived_bits <= CIRC.derived_bits
    v = values(rng, 150, LIM - (1 << s))
    m0, m1 = deal([select_spec(v.size, s, CIRC)])
    x0, x1 = split(v, rng)
    log: list = []
    o0, o1 = run_pair(P.select(0, x0, m0[0], s, CIRC), P.select(1, x1, m1[0], s, CIRC), log)
    diff = signed(o0 + o1) - np.maximum(v >> s, 0)
    assert np.all((diff == 0) | ((diff == 1) & (v >= 0))), np.unique(diff)
    assert len(log) == 2 + circ.rounds


@pytest.mark.parametrize("bound", [17, 12, 24])
def test_maxpool_of_bounded_values_is_exact_in_fewer_rounds(rng: np.random.Generator, bound: int) -> None:
    """A max-pool whose inputs are known to lie in [0, 2^bound) (a truncating ReLU's output) compares
    bound bits with the sign at bit `bound`: the exact max (edges 0 and 2^bound - 1 included), and at 18
    bits or fewer one AND level per depth: 2x2 (two depths, the second speculative) in 4 rounds."""
    shape = (1, 4, 8, 8)
    v = rng.integers(0, 1 << bound, size=shape)
    v.reshape(-1)[:4] = [0, (1 << bound) - 1, 0, (1 << bound) - 1]
    op = Op("maxpool", (0,), (4, 4, 4), {"kernel": 2, "stride": 2, "bound_bits": bound})
    pool = REGISTRY["maxpool"]
    specs = pool.specs(op, [shape[1:]], 1, CIRC)
    m0, m1 = deal(specs)
    x0, x1 = split(v, rng)
    log: list = []
    o0, o1 = run_pair(pool.online(Runtime(0, CIRC), 1, op, [x0], OpMaterial(m0, [])),
                      pool.online(Runtime(1, CIRC), 1, op, [x1], OpMaterial(m1, [])), log)
    import torch

    want = torch.nn.functional.max_pool2d(torch.tensor(v, dtype=torch.float64), 2, 2).numpy().astype(np.int64)
    np.testing.assert_array_equal(signed(o0 + o1), want)
    assert len(log) == 3 + compare_circuit(CIRC, 0, bound).rounds
    assert bound > 18 or len(log) == 4


def test_relu_traffic_within_budget(rng: np.random.Generator) -> None:
    n = 64 * 200
    v = values(rng, n)[:n]
    m0, m1 = deal([select_spec(n, 0, CIRC)])
    log: list = []
    run_pair(P.select(0, *split(v, rng)[:1], m0[0], 0, CIRC), P.select(1, split(v, rng)[1], m1[0], 0, CIRC), log)
    sent = sum(a.nbytes for r0, _ in log for a in r0.arith + r0.boolean)
    assert sent / n <= 24, f"ReLU sends {sent / n:.2f} B per element per server"


@pytest.mark.parametrize("shape,k,stride", [((1, 3, 8, 8), 2, 2), ((2, 2, 7, 9), 2, 2), ((1, 1, 9, 9), 3, 3),
                                            ((1, 2, 6, 6), 3, 1)])
def test_maxpool(rng: np.random.Generator, shape: tuple[int, ...], k: int, stride: int) -> None:
    v = rng.integers(-(1 << 29), 1 << 29, size=shape)
    v.reshape(-1)[:3] = [-(1 << 29), (1 << 29) - 1, 0]
    op = Op("maxpool", (0,), (shape[1], (shape[2] - k) // stride + 1, (shape[3] - k) // stride + 1),
            {"kernel": k, "stride": stride})
    pool = REGISTRY["maxpool"]
    specs = pool.specs(op, [shape[1:]], shape[0], CIRC)
    m0, m1 = deal(specs)
    x0, x1 = split(v, rng)
    log: list = []
    o0, o1 = run_pair(pool.online(Runtime(0, CIRC), 1, op, [x0], OpMaterial(m0, [])),
                      pool.online(Runtime(1, CIRC), 1, op, [x1], OpMaterial(m1, [])), log)
    import torch

    want = torch.nn.functional.max_pool2d(torch.tensor(v, dtype=torch.float64), k, stride).numpy().astype(np.int64)
    np.testing.assert_array_equal(signed(o0 + o1), want)
    # levels in pairs, the second speculative: L + 3 rounds a pair, L + 2 a last odd level
    assert len(log) == sum(CIRC.rounds + 1 + len(step) for step in tournament_steps(k * k))
    if k == 2:
        assert len(log) == CIRC.rounds + 3
        sent = sum(a.nbytes for r0, _ in log for a in r0.arith + r0.boolean)
        assert sent / v.size <= 30


@pytest.mark.parametrize("classes", [2, 3, 4, 5])
def test_argmax_with_ties(rng: np.random.Generator, classes: int) -> None:
    z = rng.integers(-(1 << 25), 1 << 25, size=(2, classes, 5, 7))
    z[0, :, 0, 0] = 17  # full tie -> class 0, as torch.argmax
    z[1, 1, 1, 1] = z[1, 0, 1, 1]
    op = Op("argmax", (0,), (1, 5, 7), {"classes": classes, "bits": (classes - 1).bit_length()})
    m0, m1 = deal(REGISTRY["argmax"].specs(op, [(classes, 5, 7)], 2, CIRC))
    x0, x1 = split(z, rng)
    o0, o1 = run_pair(P.argmax(0, classes, op.params.bits, x0, m0, CIRC),
                      P.argmax(1, classes, op.params.bits, x1, m1, CIRC))
    from blindseg.plan import Plan
    from data_owner import reconstruct

    plan = Plan((Op("input", (), (classes, 5, 7)), op), 8, "mask")
    np.testing.assert_array_equal(reconstruct(plan, o0, o1), np.argmax(z, axis=1))
    assert o0.dtype == np.uint8  # only the label bits leave a server


@pytest.mark.parametrize("classes", [2, 3, 5])
def test_argmax_at_a_resolution_is_within_one_lsb(rng: np.random.Generator, classes: int) -> None:
    """``compare`` = c: the comparisons read the lifted logits from bit c up (one AND level at c >= 12,
    two classes in 3 rounds). Exact ties still go to the lowest class; a clear winner (a gap of at
    least 2^(c - bits) in logit units) always wins; otherwise the label is a class whose logit is within
    one such LSB below the maximum per tournament depth (a near-loser can win a depth and then lose the
    next to another near-loser). Logits span the calibrated range (|x| < 2^28 lifted)."""
    bits = (classes - 1).bit_length()
    c = 14
    lsb = 1 << (c - bits)
    shape = (3, classes, 16, 16)
    z = rng.integers(-(1 << (27 - bits)), 1 << (27 - bits), size=shape)
    near = rng.integers(-2 * lsb, 2 * lsb, size=shape)  # near-ties around a common value
    z[1] = z[1, :1] + near[1]
    z[2] = 5  # full ties
    z[2, -1, :4] = 5 + lsb  # a gap of exactly one LSB: a clear winner
    op = Op("argmax", (0,), (1, 16, 16), {"classes": classes, "bits": bits, "compare": c})
    m0, m1 = deal(REGISTRY["argmax"].specs(op, [shape[1:]], shape[0], CIRC))
    x0, x1 = split(z, rng)
    log: list = []
    o0, o1 = run_pair(P.argmax(0, classes, bits, x0, m0, CIRC, c), P.argmax(1, classes, bits, x1, m1, CIRC, c), log)
    from blindseg.plan import Plan
    from data_owner import reconstruct

    plan = Plan((Op("input", (), shape[1:]), op), 8, "mask")
    got = reconstruct(plan, o0, o1)
    top = z.max(axis=1)
    chosen = np.take_along_axis(z, got[:, None].astype(np.int64), axis=1)[:, 0]
    depths = (classes - 1).bit_length()
    assert np.all(top - chosen < depths * lsb)
    runner_up = np.sort(z, axis=1)[:, -2]
    clear = top - runner_up >= lsb
    assert clear[0].mean() > 0.99 and clear[2, :4].all()
    np.testing.assert_array_equal(got[clear], np.argmax(z, axis=1)[clear])
    np.testing.assert_array_equal(got[2, 4:], 0)  # exact ties: the lowest class
    assert len(log) == sum(compare_circuit(CIRC, c).rounds + 1 + len(st) for st in tournament_steps(classes))
    assert classes > 2 or len(log) == 3


def test_beaver_conv_exact(rng: np.random.Generator) -> None:
    from blindseg.preprocessing import beaver_spec

    op = Op("conv", (0,), (4, 6, 5), {"kernel": [3, 3], "stride": 1, "padding": 1, "dilation": 1, "fw": 8})
    x = rng.integers(-(1 << 15), 1 << 15, size=(2, 3, 6, 5))
    w = rng.integers(-(1 << 10), 1 << 10, size=(4, 3, 3, 3))
    b_mask = rng.integers(0, 1 << 32, size=w.shape, dtype=np.uint64).astype(np.uint32)
    from blindseg.plan import Plan

    plan = Plan((Op("input", (), (3, 6, 5)), op), 8, "logits")
    m0, m1 = deal([beaver_spec((2, 3, 6, 5), (2, 4, 6, 5))], plan, 1, {1: b_mask})
    e = w.astype(np.uint32) - b_mask
    conv = REGISTRY["conv"]
    x0, x1 = split(x, rng)
    b0, b1 = split(b_mask, rng)  # the servers' shares of the model mask B
    rts = [Runtime(i, CIRC, {1: ModelShare(e, (b0, b1 + e)[i], None)}) for i in (0, 1)]
    f0, f1 = (conv.precompute(rts[i], 1, op, m) for i, m in ((0, m0), (1, m1)))
    o0, o1 = run_pair(conv.online(rts[0], 1, op, [x0], OpMaterial([m0[0]], f0)),
                      conv.online(rts[1], 1, op, [x1], OpMaterial([m1[0]], f1)))
    import torch

    want = torch.nn.functional.conv2d(torch.tensor(x, dtype=torch.float64), torch.tensor(w, dtype=torch.float64),
                                      padding=1).numpy().astype(np.int64)
    np.testing.assert_array_equal(signed(o0 + o1), want)


def test_openings_uniform_and_independent_of_secret(rng: np.random.Generator) -> None:
    """What a server sees of the ReLU opening c is uniform whatever the secret (chi-square)."""
    n = 40000
    seen = []
    for secret in (np.zeros(n, dtype=np.int64), np.full(n, (1 << 29) - 7), rng.integers(-LIM, LIM, n)):
        m0, m1 = deal([select_spec(n, 0, CIRC)])
        x0, x1 = split(secret, rng)
        log: list = []
        run_pair(P.select(0, x0, m0[0], 0, CIRC), P.select(1, x1, m1[0], 0, CIRC), log)
        c = log[0][0].arith[0] + log[0][1].arith[0]
        counts = np.bincount((c >> np.uint32(26)).astype(np.int64), minlength=64)
        assert stats.chisquare(counts).pvalue > 1e-4
        e_bits = np.unpackbits((log[-1][0].boolean[0] ^ log[-1][1].boolean[0])[:-1].view(np.uint8)).astype(np.int64)
        assert abs(e_bits.mean() - 0.5) < 0.02
        seen.append(counts)
    # the distributions seen for different secrets are indistinguishable
    table = np.stack(seen[:2])
    assert stats.chi2_contingency(table).pvalue > 1e-4


@pytest.mark.parametrize("arities", [(3, 5), (3, 3, 2), (2, 2, 2, 2), (5, 3), (8, 2)])
def test_fused_level_combine_equals_the_plain_numpy_form(rng: np.random.Generator, arities: tuple[int, ...]) -> None:
    """The numba pass over a level (every monomial from the opened d and the dealer's mask products, then
    each node's G and P) gives exactly what the term-by-term numpy reference gives, at both parties."""
    from blindseg.circuit import build_circuit, combine, combine_reference

    circ = build_circuit(30, arities)
    nw = 37  # not a multiple of anything the kernel might assume
    g, p = (rng.integers(0, 2**64, (15, nw), dtype=np.uint64) for _ in range(2))
    for lv in circ.levels:
        d, masks = (rng.integers(0, 2**64, (lv.nvars, nw), dtype=np.uint64) for _ in range(2))
        prods = rng.integers(0, 2**64, (len(lv.subsets), nw), dtype=np.uint64)
        for party in (0, 1):
            got, want = combine(party, lv, g, p, d, masks, prods), combine_reference(party, lv, g, p, d, masks, prods)
            np.testing.assert_array_equal(got[0], want[0])
            np.testing.assert_array_equal(got[1], want[1])
        g, p = want
