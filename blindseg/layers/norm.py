"""SecNorm: instance / group normalisation (x - mean) / sqrt(var + eps) per sample and group, on shares.

The affine (gamma, beta) of a model's norm layer is not part of this op: the compiler emits it as the
next op, a secret per-channel 1x1 conv, so the model owner's parameters stay secret.

Steps for one group of N = C/G * spatial elements (every ``>>`` is the dealer-assisted, unbiased
truncation of :func:`~blindseg.protocols.trunc`; every product of two secrets is Beaver):

1. mean (x at the input's scale f): s = sum(x >> t) (local after an optional truncation),
   mu = ((s >> j) * m) >> g = s 2^t / N at scale f + e (``e`` extra bits, so the mean's rounding is a
   fraction of x's LSB).
2. y = x 2^e - mu; W = sum(((y >> ys)^2) >> qs) + N eps 2^sv, so W = N (var + eps) 2^sv (W < 2^27).
3. range: b_J = [W >= ceil(2^(J/2))], J = 1..55 (one batch of comparisons per group). With the
   bucket's public P_J = round(2^(28 - J/2)), Q_J = 2^q_J (q_J = (J_ref - J) / 4 rounded down, at
   least 0: it brings y of a narrow group to the widest group's magnitude) and
   H_J = 2^gs sqrt(N 2^sv P_J / 2^28) / Q_J, all linear in the b_J: W' = (W * P) >> (28 - fn) lies in
   [0.7, 1.6) and rsqrt(var + eps) = H_J Q_J 2^-gs rsqrt(W') exactly.
4. rsqrt(W'): linear start 1.3723 - 0.3800 W', then ``iters`` Newton steps z <- z (3 - W' z^2) / 2
   (z^2 and W' z side by side, their truncations, the product, its truncation: 4 rounds each).
   Relative error 1e-8 (2 steps) on [1, sqrt 2], < 1e-4 on [0.7, 1.6), below the fixed point's LSB.
5. out = (((((y * Q) >> yk) * H) >> yt) * z) >> fz at the output's scale; y * Q * H runs beside
   step 4. Every group's y meets H at the same relative precision: a narrow channel is neither pushed
   out of the ring nor a wide one starved of H's bits.

Cost (2 Newton steps): 20 rounds, + 1 for each of the optional truncations (t, m, ys); per input
element 32 B per server online (+4 per optional element truncation); per group 55 comparisons.
Error: the fixed point's own (x at its scale) amplified by 1 / std of the group, plus a few LSB.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import cache
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import protocols as P
from ..circuit import Circuit
from ..errors import ScaleOverflowError
from ..preprocessing import MatSpec, mul_spec, sign_spec, square_spec, trunc_spec
from .base import Calibration, Layer, OpMaterial, Params, Runtime, check

if TYPE_CHECKING:
    import torch

    from ..plan import Op
    from ..protocols import Proto

BUCKETS = 55  # thresholds ceil(2^(J/2)), J = 1..55: every W in [1, 2^28)
KN = 28  # W * P_J ~ 2^28
FA = 14  # scale of z^2 and W' z inside a Newton step
START = (1.3723299, 0.3799748)  # least-squares line through rsqrt on [1, sqrt 2]
START_BITS = 10
MAX_Q = 20  # at most y * 2^20 for the narrowest groups
H_BITS = 12  # bits H keeps at the widest calibrated group
HEADROOM = 2.0  # inputs may exceed the calibrated range by 1.5x (plan.INPUT_MARGIN): sums and ranges x2


@dataclass(frozen=True)
class NormParams(Params):
    """``groups`` (instance norm: one per channel) and ``eps``; the rest is set by calibration."""

    groups: int = 1
    eps: float = 1e-5
    e: int = 0  # extra fraction bits of the mean and of y
    t: int = 0  # x >> t before the group sum
    j: int = 0  # the sum >> j ...
    m: int = 1  # ... then * m >> g (m = 1: no second truncation)
    g: int = 0
    ys: int = 0  # y >> ys before squaring
    qs: int = 0  # squares >> qs before their sum
    sv: int = 0  # W = N (var + eps) 2^sv (negative for very wide groups)
    epsq: int = 1  # N eps 2^sv, at least 1
    gs: int = 12  # fraction bits of h
    fn: int = 13  # fraction bits of W'
    fz: int = 14  # fraction bits of rsqrt(W') after the last Newton step
    iters: int = 2
    jref: int = 0  # the bucket of the widest calibrated group (q_J = 0 from it up)
    yk: int = 0  # (y * Q) >> yk
    yt: int = 0  # (.. * H) >> yt, to the output's scale
    calibrated: bool = False

    def __post_init__(self) -> None:
        check(self.groups >= 1 and 0.0 <= self.eps < 1.0, f"norm groups {self.groups} / eps {self.eps} out of range")
        check(all(0 <= v <= 30 for v in (self.t, self.j, self.g, self.ys, self.qs, self.gs, self.fn))
              and 0 <= self.e <= 8 and 0 <= self.yk <= 30 and 0 <= self.yt <= 30 and 0 <= self.jref <= BUCKETS,
              "norm truncation shifts must be in 0..30")
        check(-40 <= self.sv <= 40 and 1 <= self.epsq < 1 << 27 and 1 <= self.m < 1 << 24,
              f"norm scale sv={self.sv} / epsq={self.epsq} / m={self.m} out of range")
        check(1 <= self.iters <= 4 and self.iters + 4 <= self.fz <= 14 and self.fn + self.fz <= 27,
              f"norm Newton steps {self.iters} / fz {self.fz} / fn {self.fn} out of range")


@cache
def _tables(n: int, sv: int, gs: int, jref: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Thresholds T_J (J = 1..55) and the per-bucket P_J, Q_J, H_J (J = 0..55), all public."""
    thr = np.array([math.ceil(2 ** (k / 2)) for k in range(1, BUCKETS + 1)], dtype=np.int64)
    pj = np.array([round(2 ** (KN - k / 2)) for k in range(BUCKETS + 1)], dtype=np.int64)
    qj = [min(MAX_Q, max(0, (jref - k) // 4)) for k in range(BUCKETS + 1)]
    hj = np.array([round(2**gs * math.sqrt(n * 2.0**sv * float(pp) / 2**KN) / 2.0**q) for pp, q in zip(pj, qj,
                                                                                                        strict=True)],
                  dtype=np.int64)
    return thr, pj, np.array([1 << q for q in qj], dtype=np.int64), hj


def _telescoped(party: int, b: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Shares of table[J] for the bucket J = sum of the bits b (B, G, 55): X_0 + sum_J b_J (X_J - X_J-1)."""
    steps = ((table[1:] - table[:-1]) & 0xFFFFFFFF).astype(np.uint32)
    out = (b * steps).sum(axis=-1, keepdims=True, dtype=np.uint32)
    if party == 0:
        out += np.uint32(int(table[0]) & 0xFFFFFFFF)
    return out


class Norm(Layer):
    scale_mode = "source"
    kind = "norm"
    params = NormParams

    def out_shape(self, op: Op, in_shapes: list[tuple[int, ...]]) -> tuple[int, ...] | None:
        return in_shapes[0] if in_shapes[0][0] % op.params.groups == 0 else None

    # ------------------------------------------------------------ material, in protocol order

    def _steps(self, op: Op, batch: int, circ: Circuit) -> list[tuple[str, MatSpec]]:
        p: NormParams = op.params
        g = p.groups
        n = math.prod(op.shape) // g
        full, grp = (batch, g, n), (batch, g, 1)
        ne, ng = batch * g * n, batch * g
        out: list[tuple[str, MatSpec]] = []
        if p.t:
            out.append(("t", trunc_spec(ne, p.t)))
        out.append(("j", trunc_spec(ng, p.j)))
        if p.m != 1:
            out.append(("g", trunc_spec(ng, p.g)))
        if p.ys:
            out.append(("ys", trunc_spec(ne, p.ys)))
        out.append(("sq", square_spec(full)))
        if p.qs:
            out.append(("qs", trunc_spec(ne, p.qs)))
        out.append(("range", sign_spec(ng * BUCKETS, circ)))
        out += [("wp", mul_spec(grp, grp)), ("wpt", trunc_spec(ng, KN - p.fn)),
                ("z0", trunc_spec(ng, p.fn + START_BITS - (p.fz - p.iters)))]
        for k in range(p.iters):
            sz = p.fz - p.iters + k
            out += [(f"zz{k}", square_spec(grp)), (f"wz{k}", mul_spec(grp, grp)),
                    (f"zzt{k}", trunc_spec(ng, 2 * sz - FA)), (f"wzt{k}", trunc_spec(ng, p.fn + sz - FA)),
                    (f"t{k}", mul_spec(grp, grp)), (f"tt{k}", trunc_spec(ng, 2 * FA - sz))]
        out += [("yq", mul_spec(full, grp)), ("yqt", trunc_spec(ne, p.yk)), ("yh", mul_spec(full, grp)),
                ("yht", trunc_spec(ne, p.yt)), ("nz", mul_spec(full, grp)), ("nzt", trunc_spec(ne, p.fz))]
        return out

    def specs(self, op: Op, in_shapes: list[tuple[int, ...]], batch: int, circ: Circuit) -> list[MatSpec]:
        return [ms for _, ms in self._steps(op, batch, circ)]

    # ------------------------------------------------------------------------ online

    def online(self, rt: Runtime, i: int, op: Op, ins: list[np.ndarray], mat: OpMaterial) -> Proto:
        p: NormParams = op.params
        party = rt.party
        x = ins[0]
        batch = x.shape[0]
        m = {k: mt for (k, _), mt in zip(self._steps(op, batch, rt.circuit), mat.mats, strict=True)}
        x3 = x.reshape(batch, p.groups, -1)
        n = x3.shape[2]
        thr, pj, qj, hj = _tables(n, p.sv, p.gs, p.jref)
        xt = (yield from P.trunc(party, x3, m["t"], p.t)) if p.t else x3
        mu = yield from P.trunc(party, xt.sum(axis=2, keepdims=True, dtype=np.uint32), m["j"], p.j)
        if p.m != 1:
            mu = yield from P.trunc(party, mu * np.uint32(p.m), m["g"], p.g)
        y = (x3 << np.uint32(p.e)) - mu
        yq = (yield from P.trunc(party, y, m["ys"], p.ys)) if p.ys else y
        q = yield from P.square(party, yq, m["sq"])
        if p.qs:
            q = yield from P.trunc(party, q, m["qs"], p.qs)
        w = q.sum(axis=2, keepdims=True, dtype=np.uint32)
        if party == 0:
            w += np.uint32(p.epsq)
        d = np.broadcast_to(w, (batch, p.groups, BUCKETS)).copy()
        if party == 0:
            d -= thr.astype(np.uint32)
        b = yield from P.drelu(party, d, m["range"], rt.circuit)
        scale, q2, h = (_telescoped(party, b, tab) for tab in (pj, qj, hj))
        z, n1 = yield from P.parallel(self._rsqrt(party, w, scale, p, m), self._scaled(party, y, q2, h, m, p))
        out = yield from P.mul(party, n1, z, m["nz"])
        out = yield from P.trunc(party, out, m["nzt"], p.fz)
        return out.reshape(x.shape)

    @staticmethod
    def _scaled(party: int, y: np.ndarray, q2: np.ndarray, h: np.ndarray, m: dict[str, Any], p: NormParams) -> Proto:
        """((y * Q) >> yk) * H >> yt: y normalised by the group's power of two, then its H."""
        yq = yield from P.mul(party, y, q2, m["yq"])
        yq = yield from P.trunc(party, yq, m["yqt"], p.yk)
        yh = yield from P.mul(party, yq, h, m["yh"])
        return (yield from P.trunc(party, yh, m["yht"], p.yt))

    @staticmethod
    def _rsqrt(party: int, w: np.ndarray, scale: np.ndarray, p: NormParams, m: dict[str, Any]) -> Proto:
        """rsqrt(W') at scale fz from W and the bucket's P (both secret, per group)."""
        wp = yield from P.mul(party, w, scale, m["wp"])
        wp = yield from P.trunc(party, wp, m["wpt"], KN - p.fn)
        sz = p.fz - p.iters
        z = np.uint32(0) - wp * np.uint32(round(START[1] * 2**START_BITS))
        if party == 0:
            z += np.uint32(round(START[0] * 2 ** (p.fn + START_BITS)))
        z = yield from P.trunc(party, z, m["z0"], p.fn + START_BITS - sz)
        for k in range(p.iters):
            zz, wz = yield from P.parallel(P.square(party, z, m[f"zz{k}"]), P.mul(party, wp, z, m[f"wz{k}"]))
            a, wz = yield from P.parallel(P.trunc(party, zz, m[f"zzt{k}"], 2 * sz - FA),
                                          P.trunc(party, wz, m[f"wzt{k}"], p.fn + sz - FA))
            t = yield from P.mul(party, wz, a, m[f"t{k}"])
            t = yield from P.trunc(party, t, m[f"tt{k}"], 2 * FA - sz)
            z = np.uint32(3) * z - t  # (3z - W' z^3) / 2 at scale sz + 1
            sz += 1
        return z

    # ------------------------------------------------------------------ references

    def reference(self, op: Op, ins: list[np.ndarray], weights: Any = None) -> np.ndarray:
        p: NormParams = op.params
        x = ins[0]
        x3 = x.reshape(x.shape[0], p.groups, -1).astype(np.int64)
        n = x3.shape[2]
        thr, pj, qj, hj = _tables(n, p.sv, p.gs, p.jref)
        s = (x3 >> p.t).sum(axis=2, keepdims=True)
        mu = s >> p.j
        if p.m != 1:
            mu = (mu * p.m) >> p.g
        y = (x3 << p.e) - mu
        w = (((y >> p.ys) ** 2) >> p.qs).sum(axis=2, keepdims=True) + p.epsq
        bucket = (w >= thr).sum(axis=-1, keepdims=True)
        wp = (w * pj[bucket]) >> (KN - p.fn)
        sz = p.fz - p.iters
        z = (round(START[0] * 2 ** (p.fn + START_BITS)) - wp * round(START[1] * 2**START_BITS)) >> (
            p.fn + START_BITS - sz)
        for _ in range(p.iters):
            a = (z * z) >> (2 * sz - FA)
            wz = (wp * z) >> (p.fn + sz - FA)
            z = 3 * z - ((wz * a) >> (2 * FA - sz))
            sz += 1
        n1 = (((y * qj[bucket]) >> p.yk) * hj[bucket]) >> p.yt
        return ((n1 * z) >> p.fz).reshape(x.shape)

    def forward(self, op: Op, ins: list[torch.Tensor], weights: Any = None) -> torch.Tensor:
        import torch.nn.functional as F

        p: NormParams = op.params
        return F.group_norm(ins[0], p.groups, eps=p.eps)

    def observe(self, op: Op, ins: list[np.ndarray], out: np.ndarray) -> dict[str, float]:
        """Per (sample, group) statistics calibration bounds: largest |mean|, variance, |x - mean|."""
        x = np.asarray(ins[0], dtype=np.float64)
        x3 = x.reshape(x.shape[0], op.params.groups, -1)
        mean = x3.mean(axis=2, keepdims=True)
        y = x3 - mean
        return {"mean": float(np.max(np.abs(mean))), "var": float(np.max(np.mean(y * y, axis=2))),
                "dev": float(np.max(np.abs(y)))}

    def scale_caps(self, op: Op, i: int, maxabs: list[float], stats: dict[int, dict[str, float]]) -> dict[int, int]:
        """y * Q must fit at the input's scale (with e >= 0), and n1 * z at the output's with fz = 12
        (the output's LSB and rsqrt's relative error then cost about the same)."""
        st = stats[i]
        nmax = _nmax(maxabs[i])
        return {op.inputs[0]: math.floor(28 - math.log2(_ymax(st, nmax))),
                i: math.floor(28 - math.log2(nmax)) - 12}

    def calibrate(self, op: Op, i: int, cal: Calibration, ops: tuple[Op, ...]) -> Params:
        """Shifts that keep every sum, square and product below 2^28 with 2x headroom over calibration."""
        p: NormParams = op.params
        f, f_out = cal.scale(op.inputs[0]), cal.scale(i)
        st = cal.stats[i]
        n = math.prod(op.shape) // p.groups
        lg = math.log2
        mean = max(st["mean"], 2.0**-f) * HEADROOM
        dev = max(st["dev"], 2.0**-f) * HEADROOM
        var = max(st["var"], 2.0 ** (-2 * f)) * HEADROOM**2
        nmax = _nmax(cal.maxabs[i])
        e = max(0, min(8, math.floor(28 - f - lg(_ymax(st, nmax))), math.floor(28 - f - lg(mean + dev))))
        t = max(0, math.ceil(lg(n * mean) + f - 28))
        g = min(30, math.floor(28 - f - e - lg(mean)))
        k = lg(n) - t - e
        if k == int(k) and k >= 0:
            j, m, g = int(k), 1, 0
        else:
            j = max(0, math.ceil(12 + lg(n) - t - e - g))
            m = round(2.0 ** (t + j + g + e) / n)
        ys = max(0, math.ceil(f + e + lg(dev) - 14))
        qs = max(0, math.ceil(lg(n * var) + 2 * (f + e - ys) - 27))
        sv = 2 * (f + e - ys) - qs
        epsq = max(1, round(n * p.eps * 2.0**sv))
        jref = min(BUCKETS, max(0, math.floor(2 * lg(max(n * var * 2.0**sv, 1.0)))))
        gs = max(0, H_BITS + math.ceil(lg(math.sqrt(var) * 1.3)))
        yk = max(0, math.ceil(f + e + gs + 1 + lg(nmax) - 28))
        yt = gs + f + e - yk - f_out
        fz = min(14, math.floor(28 - f_out - lg(nmax)))
        if fz < 10 or not 0 <= yt <= 30 or gs > 30:
            raise ScaleOverflowError(f"{op.name}: group norm has too few bits left in the 32-bit ring "
                                     f"(input scale {f}, output scale {f_out}, |n| up to {nmax:.3g}, "
                                     f"variance up to {var:.3g})")
        return replace(p, e=e, t=t, j=j, m=m, g=g, ys=ys, qs=qs, sv=sv, epsq=epsq, gs=gs, fn=min(13, 27 - fz),
                       fz=fz, jref=jref, yk=yk, yt=yt, calibrated=True)


def _nmax(out_maxabs: float) -> float:
    """Bound on |n| sqrt(W') (W' < 1.6) with the calibration headroom."""
    return max(out_maxabs, 1.0) * HEADROOM * 1.3


def _ymax(st: dict[str, float], nmax: float) -> float:
    """Bound on |y| and on |y * Q| (a normalised narrow group) in real units, with headroom."""
    return max(st["dev"] * HEADROOM, nmax * math.sqrt(st["var"]) * HEADROOM * 1.2, 1e-9)
